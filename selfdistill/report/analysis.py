"""From the runs of a sweep to the numbers of the report: which runs pair up, the held-in curves
and deltas, the held-out comparisons with their statistics, the per-arm summary over seeds and
the breakdowns by domain, data_source and difficulty band.

Runs are keyed by (arm = reward.name, seed). Every run's curves are shown; statistics and
breakdowns use finished runs only, at their compared held-out step (`report.step`, or the last
step an arm run shares with its base twin; base runs use their last held-out step). A partial
sweep (a run failed or still running, an (arm, seed) cell missing) is reported as such.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from selfdistill.eval import cell_stats, group_rows
from selfdistill.report.audit import audit_ledger
from selfdistill.report.runs import HELD_IN, HELD_OUT, Run
from selfdistill.report.statistics import (discordant_pairs, drift, mcnemar_exact, noise_label, paired_bootstrap_ci,
                                           paired_differences, spread, stratified_meta_gap)


def index_runs(runs: list[Run]) -> tuple[dict[tuple[str, int], Run], list[Run]]:
    """({(arm, seed): run}, superseded runs): of several runs of one cell the finished, latest-started wins."""
    cells: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for r in runs:
        cells[(r.arm, r.seed)].append(r)
    chosen, superseded = {}, []
    for key, rs in cells.items():
        rs = sorted(rs, key=lambda r: (r.finished, r.manifest.get("started_at") or ""), reverse=True)
        chosen[key] = rs[0]
        superseded.extend(rs[1:])
    return chosen, superseded


def arm_order(arms, base_arm: str) -> list[str]:
    return sorted(set(arms), key=lambda a: (a != base_arm, a))


def _curve(run: Run, split: str) -> list[dict]:
    return [{"step": s, "accuracy": run.accuracy(split, s), "n": len(run.rows(split, s))} for s in run.steps(split)]


def _mean_by_step(series: list[list[dict]], value: str) -> list[dict]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for points in series:
        for p in points:
            by_step[p["step"]].append(p[value])
    return [{"step": s, value: sum(v) / len(v), "seeds": len(v)} for s, v in sorted(by_step.items())]


def heldin_curves(by_key: dict, arms: list[str]) -> dict:
    out = {}
    for arm in arms:
        runs = [r for (a, _), r in sorted(by_key.items()) if a == arm]
        per_run = {r.name: {"seed": r.seed, "status": r.status, "points": _curve(r, HELD_IN)} for r in runs}
        out[arm] = {"runs": per_run, "mean": _mean_by_step([v["points"] for v in per_run.values()], "accuracy")}
    return out


def heldin_deltas(by_key: dict, arms: list[str], base_arm: str) -> dict:
    """arm - base held-in accuracy at the steps both runs of a seed validated."""
    out = {}
    for arm in arms:
        if arm == base_arm:
            continue
        per_seed = {}
        for (a, seed), run in sorted(by_key.items()):
            base = by_key.get((base_arm, seed))
            if a != arm or base is None:
                continue
            shared = sorted(set(run.steps(HELD_IN)) & set(base.steps(HELD_IN)))
            per_seed[seed] = [{"step": s, "delta": run.accuracy(HELD_IN, s) - base.accuracy(HELD_IN, s)} for s in shared]
        out[arm] = {"seeds": per_seed, "mean": _mean_by_step(list(per_seed.values()), "delta")}
    return out


def final_step(run: Run, step: Optional[int]) -> Optional[int]:
    """The held-out step a run is compared at: `step` if it evaluated it, else its last (when `step` is null)."""
    if step is not None:
        return step if step in run.steps(HELD_OUT) else None
    return run.last_step(HELD_OUT)


def compare_pair(arm: Run, base: Run, cfg, audit_passed: bool) -> dict:
    """Held-out comparison of an arm run with its base twin on the same problems, plus the
    held-in gain at the last validation both share up to that step and the drift flag."""
    entry = {"run": arm.name, "arm": arm.arm, "seed": arm.seed, "base_run": base.name, "audit_passed": audit_passed}
    if not (arm.finished and base.finished):
        return {**entry, "compared": False, "reason": f"base {base.status}, arm {arm.status}"}
    shared = set(arm.steps(HELD_OUT)) & set(base.steps(HELD_OUT))
    step = cfg.step if cfg.step is not None else max(shared, default=None)
    if step is None or step not in shared:
        at = cfg.step if cfg.step is not None else "(any)"
        return {**entry, "compared": False, "reason": f"no shared held-out evaluation at step {at}"}
    ar, br = arm.rows(HELD_OUT, step), base.rows(HELD_OUT, step)
    diffs = paired_differences(ar, br)
    b, c, pairs = discordant_pairs(ar, br)
    gain = float(diffs.mean()) if len(diffs) else None
    lo, hi = paired_bootstrap_ci(diffs, samples=cfg.bootstrap_samples, seed=cfg.bootstrap_seed, confidence=cfg.confidence)
    hi_steps = [s for s in set(arm.steps(HELD_IN)) & set(base.steps(HELD_IN)) if s <= step]
    hi_step = max(hi_steps, default=None)
    hi_gain = arm.accuracy(HELD_IN, hi_step) - base.accuracy(HELD_IN, hi_step) if hi_step is not None else None
    return {**entry, "compared": True, "step": step, "problems": len(diffs), "accuracy": arm.accuracy(HELD_OUT, step),
            "base_accuracy": base.accuracy(HELD_OUT, step), "gain": gain, "ci": [lo, hi],
            "mcnemar": {"b": b, "c": c, "pairs": pairs, "p": mcnemar_exact(b, c)},
            "heldin_step": hi_step, "heldin_gain": hi_gain, "drift": drift(hi_gain, gain, cfg.drift_threshold)}


def compared_rows(by_key: dict, pairs: list[dict], base_arm: str, step: Optional[int]) -> dict[str, list[tuple[Run, int]]]:
    """arm -> [(finished run, its compared held-out step)]."""
    pair_step = {p["run"]: p["step"] for p in pairs if p["compared"]}
    out: dict[str, list[tuple[Run, int]]] = defaultdict(list)
    for (arm, _), run in sorted(by_key.items()):
        s = final_step(run, step) if arm == base_arm else pair_step.get(run.name)
        if run.finished and s is not None:
            out[arm].append((run, s))
    return out


def summarize_arms(arms: list[str], compared: dict, pairs: list[dict], cfg) -> dict:
    """Per arm over seeds: held-out accuracy spread, mean gain over base (with its spread), the
    noise label against the base arm's seed spread (the anchor), held-in gain and drift."""
    base_acc = [run.accuracy(HELD_OUT, s) for run, s in compared.get(cfg.base_arm, [])]
    anchor = spread(base_acc) if base_acc else None
    out = {}
    for arm in arms:
        acc = [run.accuracy(HELD_OUT, s) for run, s in compared.get(arm, [])]
        entry = {"seeds": sorted(run.seed for run, _ in compared.get(arm, [])), "accuracy": spread(acc) if acc else None}
        if arm != cfg.base_arm:
            ps = [p for p in pairs if p["arm"] == arm and p["compared"]]
            gains = [p["gain"] for p in ps if p["gain"] is not None]
            hi = [p["heldin_gain"] for p in ps if p["heldin_gain"] is not None]
            mean_gain = sum(gains) / len(gains) if gains else None
            mean_hi = sum(hi) / len(hi) if hi else None
            entry.update({"gain": spread(gains) if gains else None, "heldin_gain": mean_hi,
                          "noise": noise_label(mean_gain, anchor) if mean_gain is not None else None,
                          "drift": drift(mean_hi, mean_gain, cfg.drift_threshold),
                          "audit_passed": all(p["audit_passed"] for p in pairs if p["arm"] == arm)})
        out[arm] = entry
    return {"anchor": anchor, "arms": out}


def breakdowns(arms: list[str], compared: dict) -> dict:
    """Per arm, pooled over its compared runs: cells by domain, data_source and band; per band the
    with/without-meta split, the pooled one and the stratified gap."""
    out = {"domain": {}, "data_source": {}, "band": {}, "meta": {}}
    for arm in arms:
        rows = [r for run, s in compared.get(arm, []) for r in run.rows(HELD_OUT, s)]
        if not rows:
            continue
        for key in ("domain", "data_source", "band"):
            out[key][arm] = {v: cell_stats(cell) for v, cell in group_rows(rows, key).items()}
        pooled = cell_stats(rows)
        out["meta"][arm] = {"pooled": pooled, **stratified_meta_gap(out["band"][arm], pooled)}
    return out


def sweep_status(by_key: dict, superseded: list[Run], skipped: list, arms: list[str]) -> dict:
    seeds = sorted({s for _, s in by_key})
    missing = [f"{a}/seed{s}" for a in arms for s in seeds if (a, s) not in by_key]
    unfinished = [{"run": r.name, "status": r.status, "path": r.path,
                   "error": (r.manifest.get("error") or {}).get("message")} for r in by_key.values() if not r.finished]
    return {"partial": bool(missing or unfinished), "missing": missing, "unfinished": unfinished,
            "superseded": [r.path for r in superseded], "skipped": [{"path": p, "reason": why} for p, why in skipped]}


def analyze(runs: list[Run], skipped: list, cfg) -> dict:
    by_key, superseded = index_runs(runs)
    arms = arm_order([a for a, _ in by_key], cfg.base_arm)
    ledger = audit_ledger(by_key, cfg.base_arm)
    audit_ok = {e["run"]: e["passed"] for e in ledger}
    pairs = [compare_pair(run, by_key[(cfg.base_arm, seed)], cfg, audit_ok[run.name])
             for (arm, seed), run in sorted(by_key.items()) if arm != cfg.base_arm and (cfg.base_arm, seed) in by_key]
    compared = compared_rows(by_key, pairs, cfg.base_arm, cfg.step)
    return {
        "base_arm": cfg.base_arm, "arms": arms, "seeds": sorted({s for _, s in by_key}),
        "status": sweep_status(by_key, superseded, skipped, arms),
        "runs": [{"run": r.name, "arm": r.arm, "seed": r.seed, "status": r.status, "path": r.path,
                  "heldout_steps": r.steps(HELD_OUT), "heldin_steps": r.steps(HELD_IN),
                  "audit_passed": audit_ok.get(r.name)} for _, r in sorted(by_key.items())],
        "audit": ledger, "heldin_curves": heldin_curves(by_key, arms), "heldin_deltas": heldin_deltas(by_key, arms, cfg.base_arm),
        "comparisons": pairs, "summary": summarize_arms(arms, compared, pairs, cfg), "breakdowns": breakdowns(arms, compared),
    }
