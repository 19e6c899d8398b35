"""PMI reward (`pmi`, SPEC section 2): does the meta block make the model's own continuation more
likely?

The completion splits into prefix P, the first closed meta block M and continuation C. The scorer
scores every token of C three ways, each context spliced at token level so the arms align position
by position: after P+M (real), after P alone (without), after P+placebo (placebo). Per token
`d_real = logp_real - logp_without`, `d_plac = logp_placebo - logp_without`;
`x = agg(d_real) - agg(d_plac)`, `R = gate(x, correct, 0.1085)`.

`pmi_reward` is the float64 formula; `pmi_fused` is the scorer's ops path: each `agg` by the
dispatched `clipped_mean_min` kernel (x = logp - logp_without inside it, float64), gated in float64
here; equal to `pmi_reward` on the same log-probs (tests/test_rewards_fused.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.rewards.common import (
    NAN,
    any_nonfinite,
    apply_membership,
    as_bool,
    as_float64,
    clip,
    gate,
    masked_mean,
    masked_min,
    masked_sum,
    mean_or_zero,
)

PMI_CAP = 0.1085  # the gate's cap c for PMI
DIFF_CLIP = 2.0  # clip(d_t, -2, 2) in sum_clip / mean_min
MIN_WEIGHT = 1.0  # the 1.0 * min(...) of mean_min
PMI_AGGS = ("mean", "sum_clip", "mean_min")


def pmi_aggregate(d: Tensor, mask: Tensor, agg: str) -> Tensor:
    """`agg` of per-token differences d [R, T] over `mask` -> [R] (SPEC section 2, `reward.agg`):
    mean = mean over tokens; sum_clip = sum of clip(d, -2, 2); mean_min = mean(clip(d, -2, 2)) +
    1.0 * min(clip(d, -2, 2)). NaN for an empty mask or a non-finite used value."""
    if agg == "mean":
        return masked_mean(d, mask)
    # Non-finite d must stay NaN through the clip (clamp would turn +inf into 2).
    dc = clip(torch.where(torch.isfinite(d), d, torch.full_like(d, NAN)), -DIFF_CLIP, DIFF_CLIP)
    if agg == "sum_clip":
        return masked_sum(dc, mask)
    if agg == "mean_min":
        return masked_mean(dc, mask) + MIN_WEIGHT * masked_min(dc, mask)
    raise _bad_agg(agg)


def _bad_agg(agg: str) -> ValueError:
    return ValueError(f"pmi agg {agg!r} is not valid; choose one of {', '.join(PMI_AGGS)} (config reward.agg)")


def pmi_reward(
    logp_real: Tensor,
    logp_without: Tensor,
    logp_placebo: Tensor,
    cont_mask: Tensor,
    correct: Tensor,
    agg: str = "mean",
    *,
    member: Tensor,
) -> Tensor:
    """PMI head value per rollout, float64 [R]; NaN for non-members.

    logp_real / logp_without / logp_placebo: [R, T] scorer log-probs of the continuation tokens C
    after P+M, P, P+placebo, aligned position by position (position t = the t-th token of C).
    cont_mask: bool [R, T], True on C's scored tokens (EOS and padding False); a row with no token
    is a non-member. correct: bool [R]. agg: `reward.agg` (mean | sum_clip | mean_min).
    member: bool [R], the scorer's membership verdict (closed block, non-blank M and C, PMI
    guards: `guards.belief_membership_reason`); False -> NaN.
    A non-finite log-prob at a scored token -> NaN (SPEC section 2).
    """
    real = as_float64(logp_real, "logp_real")
    without = as_float64(logp_without, "logp_without")
    plac = as_float64(logp_placebo, "logp_placebo")
    if not (real.shape == without.shape == plac.shape) or real.dim() != 2:
        raise ValueError(
            f"pmi_reward: logp_real {tuple(real.shape)}, logp_without {tuple(without.shape)} and logp_placebo "
            f"{tuple(plac.shape)} must all be [R, T]"
        )
    mask = as_bool(cont_mask, "cont_mask")
    if mask.shape != real.shape:
        raise ValueError(f"pmi_reward: cont_mask has shape {tuple(mask.shape)}, expected {tuple(real.shape)}")
    correct = as_bool(correct, "correct")
    if tuple(correct.shape) != real.shape[:1]:
        raise ValueError(f"pmi_reward: correct has shape {tuple(correct.shape)}, expected ({real.shape[0]},)")
    bad = any_nonfinite(real, mask) | any_nonfinite(without, mask) | any_nonfinite(plac, mask)
    x = pmi_aggregate(real - without, mask, agg) - pmi_aggregate(plac - without, mask, agg)
    x = torch.where(bad, torch.full_like(x, NAN), x)
    return apply_membership(gate(x, correct, PMI_CAP), member, "pmi_reward")


def _fused_aggregate(logp: Tensor, logp_without: Tensor, mask: Tensor, agg: str) -> Tensor:
    """`pmi_aggregate(logp - logp_without, mask, agg)` by `ops.dispatched_clipped_mean_min` (float64):
    mean = no clip, no min term; sum_clip = the clipped mean times the row's token count."""
    if agg == "mean":
        return ops.dispatched_clipped_mean_min(logp, mask, math.inf, 0.0, minus=logp_without)
    if agg == "sum_clip":
        return ops.dispatched_clipped_mean_min(logp, mask, DIFF_CLIP, 0.0, minus=logp_without) * mask.sum(-1)
    if agg == "mean_min":
        return ops.dispatched_clipped_mean_min(logp, mask, DIFF_CLIP, MIN_WEIGHT, minus=logp_without)
    raise _bad_agg(agg)


def pmi_fused(logp_real: Tensor, logp_without: Tensor, logp_placebo: Tensor, cont_mask: Tensor, correct: Tensor,
              agg: str = "mean", *, member: Tensor) -> Tensor:
    """`pmi_reward` (same parameters) through the dispatched row reductions: the three log-prob sets [R, T] (fp32 fused
    token log-probs, on the scorer's device), cont_mask [R, T], correct and member bool [R].
    Returns float64 [R] on that device."""
    if not (logp_real.shape == logp_without.shape == logp_placebo.shape) or logp_real.dim() != 2:
        raise ValueError(f"pmi_fused: logp_real {tuple(logp_real.shape)}, logp_without {tuple(logp_without.shape)} and "
                         f"logp_placebo {tuple(logp_placebo.shape)} must all be [R, T]")
    device = logp_real.device
    mask = as_bool(cont_mask, "cont_mask").to(device)
    x = _fused_aggregate(logp_real, logp_without, mask, agg) - _fused_aggregate(logp_placebo, logp_without, mask, agg)
    return apply_membership(gate(x, as_bool(correct, "correct").to(device), PMI_CAP), as_bool(member, "member").to(device),
                            "pmi_fused")


def pmi_metrics(logp_real: Tensor, logp_without: Tensor, logp_placebo: Tensor, cont_mask: Tensor,
                values: Tensor) -> dict[str, float]:
    """Over PMI's members: mean per-token `d_real` and `d_plac` (each a row mean over C, then the
    mean over rows) and the mean number of scored tokens of C."""
    ok = torch.isfinite(values)
    mask = as_bool(cont_mask, "cont_mask")
    return {
        "pmi/d_real_mean": mean_or_zero(masked_mean(logp_real - logp_without, mask)[ok]),
        "pmi/d_placebo_mean": mean_or_zero(masked_mean(logp_placebo - logp_without, mask)[ok]),
        "pmi/continuation_len": mean_or_zero(mask.sum(1)[ok]),
    }
