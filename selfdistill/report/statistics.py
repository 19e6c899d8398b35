"""Paired statistics of two runs on the same problems, spread over seeds, drift and the
stratified meta-vs-no-meta comparison (seed `metacognition-rewards.txt`: same-problem twin
comparisons, Simpson-style stratification; seed `autonomous-post-training-paper.txt`: a baseline
anchor calibrates seed noise, dev gains that do not transfer are drift).

Choices the SPEC leaves open, made here:
- The paired unit of the bootstrap is the problem: each problem's accuracy is the mean of its k
  samples, and problems are resampled with replacement (percentile interval, numpy's default
  generator seeded with `report.bootstrap_seed`), so samples of one problem move together.
- McNemar's exact test pairs sample j of problem i in both runs (evaluation seeds them alike):
  b = arm right and base wrong, c = the reverse, p = two-sided exact binomial on b + c trials,
  min(1, 2 P(X <= min(b, c))). With k > 1 the pairs of one problem are correlated and p is
  optimistic; the bootstrap is the interval to trust then.
- Noise: the anchor is the base arm's held-out accuracy over seeds, its spread max - min. An arm's
  mean gain over base with |gain| <= that spread is "noise"; with fewer than two base seeds there is
  no anchor.
- Drift: held-in gain and held-out gain (arm - base) disagree in sign (both non-zero), or differ by
  more than `report.drift_threshold`.
- Stratified meta gap: per band, accuracy with a meta block minus without, over the bands that have
  both, weighted by the band's sample count; a reversal is a pooled gap of the opposite sign.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np


def problem_accuracy(rows: Sequence[dict]) -> dict[str, float]:
    """problem_id -> mean correctness over its samples."""
    per: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per[r["problem_id"]].append(bool(r["correct"]))
    return {pid: sum(cs) / len(cs) for pid, cs in per.items()}


def paired_differences(arm_rows: Sequence[dict], base_rows: Sequence[dict]) -> np.ndarray:
    """Per shared problem (sorted by id): arm accuracy - base accuracy."""
    arm, base = problem_accuracy(arm_rows), problem_accuracy(base_rows)
    shared = sorted(arm.keys() & base.keys())
    return np.array([arm[p] - base[p] for p in shared], dtype=np.float64)


def paired_bootstrap_ci(diffs: np.ndarray, *, samples: int, seed: int, confidence: float) -> tuple[float, float]:
    """Percentile interval of the mean paired difference, resampling problems with replacement."""
    n = len(diffs)
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def discordant_pairs(arm_rows: Sequence[dict], base_rows: Sequence[dict]) -> tuple[int, int, int]:
    """(b, c, pairs) over the (problem_id, sample) pairs both runs evaluated: b = arm right and base
    wrong, c = base right and arm wrong."""
    base = {(r["problem_id"], r["sample"]): bool(r["correct"]) for r in base_rows}
    b = c = pairs = 0
    for r in arm_rows:
        key = (r["problem_id"], r["sample"])
        if key not in base:
            continue
        pairs += 1
        a, z = bool(r["correct"]), base[key]
        b += a and not z
        c += z and not a
    return b, c, pairs


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def spread(values: Sequence[float]) -> dict:
    """Mean, sample std (0 for one value), min, max and range of per-seed values."""
    v = np.array(values, dtype=np.float64)
    return {"n": len(v), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "range": float(v.max() - v.min())}


def noise_label(gain: float, anchor: Optional[dict]) -> str:
    """"noise" when |gain| lies inside the base arm's seed spread, else "above noise" / "below noise";
    "no anchor" without at least two base seeds."""
    if anchor is None or anchor["n"] < 2:
        return "no anchor"
    if abs(gain) <= anchor["range"]:
        return "noise"
    return "above noise" if gain > 0 else "below noise"


def drift(heldin_gain: Optional[float], heldout_gain: Optional[float], threshold: float) -> dict:
    """Does the held-in gain over base tell the same story as the held-out gain?"""
    if heldin_gain is None or heldout_gain is None:
        return {"flag": None, "reason": "held-in or held-out gain missing"}
    reasons = []
    if heldin_gain * heldout_gain < 0:
        reasons.append("opposite signs")
    if abs(heldin_gain - heldout_gain) > threshold:
        reasons.append(f"|held-in - held-out| = {abs(heldin_gain - heldout_gain):.3f} > {threshold}")
    return {"flag": bool(reasons), "reason": "; ".join(reasons) or "consistent"}


def stratified_meta_gap(bands: dict[str, dict], pooled: dict) -> dict:
    """Pooled accuracy gap (with meta - without) next to the band-stratified one (`cell_stats` cells)."""
    def gap(cell):
        w, wo = cell["with_meta"], cell["without_meta"]
        return w["accuracy"] - wo["accuracy"] if w["n"] and wo["n"] else None

    used = {b: c for b, c in bands.items() if gap(c) is not None}
    weight = sum(c["n"] for c in used.values())
    stratified = sum(c["n"] * gap(c) for c in used.values()) / weight if weight else None
    pooled_gap = gap(pooled)
    reversal = pooled_gap is not None and stratified is not None and pooled_gap * stratified < 0
    return {"pooled_gap": pooled_gap, "stratified_gap": stratified, "bands_used": list(used), "reversal": reversal}
