"""Shared pieces of the meta rewards: the sign gate, the gold/decoy belief, masked reductions.

Every reward is a pure function on tensors (SPEC section 2). The one rule that runs through all of
them: a NaN or +-inf among the values a formula actually uses (positions inside its mask; padding
and unscored positions never count), or in its result, makes the rollout a *non-member* of that
head, which we encode as NaN in the reward. `selfdistill.algo.advantages.group_centered` turns NaN
into "excluded from the group mean, advantage 0", so NaN never reaches a loss.

Rewards are computed in float64 (a few hundred values per batch; the extra precision keeps the
SPEC's worked cases exact) and returned as float64 [R].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

NAN = float("nan")


def as_float64(x: Tensor | float | Sequence[float], name: str) -> Tensor:
    """`x` as a float64 tensor; `name` goes into the error when it is not numeric."""
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor; got dtype {t.dtype}")
    return t.to(torch.float64)


def as_bool(x: Tensor | bool | Sequence[bool], name: str) -> Tensor:
    """`x` as a bool tensor. Accepts bool, or integer/float tensors holding only 0 and 1."""
    t = torch.as_tensor(x)
    if t.dtype == torch.bool:
        return t
    if t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        bad = (t != 0) & (t != 1)
        if bad.any():
            raise ValueError(f"{name} must hold only 0/1 (or bool); got {t[bad][:4].tolist()} among its values")
        return t != 0
    raise TypeError(f"{name} must be bool or 0/1; got dtype {t.dtype}")


def mean_or_zero(x: Tensor) -> float:
    """Mean as a float, 0.0 for an empty set: logged metrics stay finite and every rank logs the
    same keys (a `nan_frac` of 1 says when a head had no member)."""
    return float(x.double().mean()) if x.numel() else 0.0


def check_shape(t: Tensor, shape: tuple[int, ...], name: str, where: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def nonfinite_to_nan(x: Tensor) -> Tensor:
    """Map +-inf to NaN (SPEC section 2: +-inf in a result makes the rollout a non-member)."""
    return torch.where(torch.isfinite(x), x, torch.full_like(x, NAN))


def any_nonfinite(values: Tensor, mask: Tensor) -> Tensor:
    """Per row [R]: is any value inside `mask` NaN or +-inf? Values outside the mask never count."""
    return (~torch.isfinite(values) & mask).any(dim=-1)


def clip(x: Tensor, low: float, high: float) -> Tensor:
    """clip(x, low, high); NaN stays NaN (torch.clamp propagates NaN)."""
    return torch.clamp(x, min=low, max=high)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum over the last dim inside `mask` [R, K] -> [R]; NaN where the mask is empty or a used
    value is non-finite."""
    out = torch.where(mask, values, torch.zeros_like(values)).sum(dim=-1)
    bad = any_nonfinite(values, mask) | ~mask.any(dim=-1)
    return torch.where(bad, torch.full_like(out, NAN), out)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the last dim inside `mask` -> [R]; NaN where empty or a used value is non-finite."""
    count = mask.sum(dim=-1).to(values.dtype)
    return masked_sum(values, mask) / count  # count 0 -> already NaN


def masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Min over the last dim inside `mask` -> [R]; NaN where empty or a used value is non-finite."""
    filled = torch.where(mask, values, torch.full_like(values, float("inf")))
    out = filled.min(dim=-1).values if values.shape[-1] else values.new_full(values.shape[:-1], NAN)
    bad = any_nonfinite(values, mask) | ~mask.any(dim=-1)
    return torch.where(bad, torch.full_like(out, NAN), out)


def gate(x: Tensor | float, correct: Tensor | bool, c: float) -> Tensor:
    """SPEC section 2 sign gate: `clip(x, 0, c)` if correct else `-clip(x, 0, c)`.

    A correct rollout earns only >= 0 and a wrong one only <= 0; the magnitude is the positive part
    of x, capped at c. Non-finite x (NaN or +-inf) gives NaN: the rollout is a non-member, the
    clip must not turn +inf into c.
    """
    if not c > 0:
        raise ValueError(f"gate: cap c={c} must be > 0")
    x = as_float64(x, "x")
    correct = as_bool(correct, "correct")
    mag = clip(nonfinite_to_nan(x), 0.0, c)
    return torch.where(correct, mag, -mag)


def belief(gold_logp: Tensor, decoy_logp: Tensor, divergent_mask: Tensor) -> Tensor:
    """SPEC section 1 belief `B(c) = sum over divergent positions i of [log p(gold_i | c, gold_<i)
    - log p(decoy_i | c, decoy_<i)]`.

    gold_logp, decoy_logp: [R, K] per-position log-probs of the gold / decoy answer tokens
    (`\\boxed{<answer>}` tokenized on its own) teacher-forced after each rollout's context.
    divergent_mask: [R, K] or [K] bool, True where the two tokenizations differ (see
    `divergent_positions`); padding positions False. Returns float64 [R]; NaN where the row has no
    divergent position (pair not scorable) or a log-prob it uses is non-finite.
    """
    g = as_float64(gold_logp, "gold_logp")
    d = as_float64(decoy_logp, "decoy_logp")
    if g.shape != d.shape or g.dim() != 2:
        raise ValueError(f"belief: gold_logp {tuple(g.shape)} and decoy_logp {tuple(d.shape)} must both be [R, K]")
    mask = as_bool(divergent_mask, "divergent_mask").expand_as(g)
    used_bad = any_nonfinite(g, mask) | any_nonfinite(d, mask)
    out = masked_sum(g - d, mask)
    return torch.where(used_bad, torch.full_like(out, NAN), out)


def divergent_positions(gold_ids: Sequence[int], decoy_ids: Sequence[int]) -> Tensor:
    """SPEC section 1 divergent positions of a gold/decoy pair of token id sequences, as bool [K].

    Different lengths -> the pair is not scored: all False of length max(len) (so `belief` and the
    gm/PMI-shift rewards give NaN, and the scorer counts it in `reward/skip_rate`). Equal
    tokenizations also give all False (no divergent position).
    """
    g, d = list(gold_ids), list(decoy_ids)
    if len(g) != len(d):
        return torch.zeros(max(len(g), len(d)), dtype=torch.bool)
    return torch.tensor([a != b for a, b in zip(g, d)], dtype=torch.bool)


def apply_membership(values: Tensor, member: Tensor | Sequence[bool], where: str) -> Tensor:
    """NaN where `member` is False: the scorer's text/token membership rules (SPEC section 2:
    no closed block, blank meta, blank continuation, anti-gaming guards) decide these rows."""
    member = as_bool(member, "member")
    if member.shape != values.shape:
        raise ValueError(f"{where}: member has shape {tuple(member.shape)}, expected {tuple(values.shape)}")
    return torch.where(member, values, torch.full_like(values, NAN))


def group_index(group_ids: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """(unique group ids [G], index of each rollout's group in them [R]). Ids need not be
    contiguous or sorted."""
    gid = torch.as_tensor(group_ids)
    if gid.dim() != 1 or gid.is_floating_point() or gid.dtype == torch.bool:
        raise ValueError(f"{where}: group_ids must be an integer tensor [R]; got dtype {gid.dtype}, shape {tuple(gid.shape)}")
    uniq, inverse = torch.unique(gid, return_inverse=True)
    return uniq, inverse


def arm_counts(correct01: Tensor, with_arm: Tensor, group_ids: Tensor, where: str) -> dict[str, Tensor]:
    """Per-group integer counts of the cf / asym_cf split (SPEC section 2), for exact comparisons.

    Returns long [G] tensors `n_with`, `k_with` (rollouts and correct ones in the with arm),
    `n_without`, `k_without`, plus `inverse` [R] (each rollout's group index) and `correct`,
    `with_arm` as bool [R].
    """
    correct = as_bool(correct01, "correct01")
    arm = as_bool(with_arm, "with_arm")
    if correct.dim() != 1 or arm.shape != correct.shape:
        raise ValueError(f"{where}: correct01 {tuple(correct.shape)} and with_arm {tuple(arm.shape)} must both be [R]")
    uniq, inverse = group_index(group_ids, where)
    if inverse.shape != correct.shape:
        raise ValueError(f"{where}: group_ids has shape {tuple(inverse.shape)}, expected {tuple(correct.shape)}")
    G = uniq.numel()

    def count(x: Tensor) -> Tensor:
        return torch.zeros(G, dtype=torch.long, device=x.device).index_add_(0, inverse, x.long())

    return {
        "n_with": count(arm),
        "k_with": count(arm & correct),
        "n_without": count(~arm),
        "k_without": count(~arm & correct),
        "inverse": inverse,
        "correct": correct,
        "with_arm": arm,
    }


def arm_split_metrics(prefix: str, cnt: dict[str, Tensor]) -> tuple[dict[str, float], list[tuple[int, int, int, int]]]:
    """Accuracy per arm over the batch and groups lacking an arm, for cf-style heads:
    (`<prefix>/acc_with`, `<prefix>/acc_without`, `<prefix>/groups_missing_arm`), plus the
    (k_without, n_without, k_with, n_with) counts of every group that has both arms."""
    groups = list(zip(cnt["k_without"].tolist(), cnt["n_without"].tolist(), cnt["k_with"].tolist(), cnt["n_with"].tolist()))
    both = [(k0, n0, k1, n1) for k0, n0, k1, n1 in groups if n0 > 0 and n1 > 0]
    n_with, n_without = int(cnt["n_with"].sum()), int(cnt["n_without"].sum())
    return {
        f"{prefix}/acc_with": int(cnt["k_with"].sum()) / n_with if n_with else 0.0,
        f"{prefix}/acc_without": int(cnt["k_without"].sum()) / n_without if n_without else 0.0,
        f"{prefix}/groups_missing_arm": float(len(groups) - len(both)),
    }, both


def belief_shift_metrics(beliefs: dict[str, Tensor], before: Tensor, after: Tensor, values: Tensor,
                         eps: float = 0.0) -> dict[str, float]:
    """Belief statistics over a head's members (finite `values`): `belief/<name>_mean` per scored
    context, `belief/shift_mean` = mean(after - before), and the sign flips across +-eps
    (`belief/flips_decoy_to_gold`: before < -eps and after > eps; `flips_gold_to_decoy` reversed)."""
    ok = torch.isfinite(values)
    metrics = {f"belief/{name}_mean": mean_or_zero(b[ok]) for name, b in beliefs.items()}
    metrics["belief/shift_mean"] = mean_or_zero((after - before)[ok])
    metrics["belief/flips_decoy_to_gold"] = float(((before < -eps) & (after > eps) & ok).sum())
    metrics["belief/flips_gold_to_decoy"] = float(((before > eps) & (after < -eps) & ok).sum())
    return metrics
