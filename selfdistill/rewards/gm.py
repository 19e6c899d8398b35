"""Gold-minus-decoy difference-in-differences (`gm`, SPEC section 2).

Context X = prompt + completion up to the first `<|meta|>`. The scorer teacher-forces the gold and
the decoy answer strings after X + M (M = the first closed meta block) and after X + placebo. Per
divergent position i:
`did_i = [g_i(M) - g_i(placebo)] - [d_i(M) - d_i(placebo)]`,
`x = mean_i clip(did_i, -2, 2) + 1.0 * min_i clip(did_i, -2, 2)`, `R = gate(x, correct, 2)`.
A decorative block moves gold and decoy together, so did ~ 0 and R ~ 0.

`gm_reward` is the float64 formula on the four log-prob sets; `gm_fused` is the scorer's ops path:
did_i = contrast_i(M) - contrast_i(placebo) (contrast = g - d per position, from the contrast op,
which needs no vocabulary pass at the first divergent position) reduced by the dispatched
`gold_decoy_did` kernel in float64, gated in float64 here; equal to `gm_reward` on the same values
(tests/test_rewards_fused.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.rewards.common import (
    NAN,
    any_nonfinite,
    apply_membership,
    as_bool,
    as_float64,
    belief_shift_metrics,
    clip,
    gate,
    masked_mean,
    masked_min,
)

GM_CAP = 2.0  # the gate's cap c for gm
DID_CLIP = 2.0
MIN_WEIGHT = 1.0


def gm_reward(
    gold_logp_meta: Tensor,
    gold_logp_placebo: Tensor,
    decoy_logp_meta: Tensor,
    decoy_logp_placebo: Tensor,
    divergent_mask: Tensor,
    correct: Tensor,
    *,
    member: Tensor,
) -> Tensor:
    """gm head value per rollout, float64 [R]; NaN for non-members.

    The four log-prob sets are [R, K]: per answer-token position, log p of the gold (resp. decoy)
    token teacher-forced after X + M (`_meta`) or X + placebo (`_placebo`). divergent_mask: [R, K]
    or [K] bool (`common.divergent_positions`; all False when the pair is not scorable -> NaN).
    correct: bool [R]. member: bool [R] from `guards.belief_membership_reason("gm", ...)`.
    A non-finite log-prob at a divergent position -> NaN.
    """
    sets = {
        "gold_logp_meta": as_float64(gold_logp_meta, "gold_logp_meta"),
        "gold_logp_placebo": as_float64(gold_logp_placebo, "gold_logp_placebo"),
        "decoy_logp_meta": as_float64(decoy_logp_meta, "decoy_logp_meta"),
        "decoy_logp_placebo": as_float64(decoy_logp_placebo, "decoy_logp_placebo"),
    }
    shape = sets["gold_logp_meta"].shape
    if len(shape) != 2 or any(t.shape != shape for t in sets.values()):
        raise ValueError(f"gm_reward: the four log-prob sets must share one [R, K] shape; got "
                         + ", ".join(f"{k} {tuple(v.shape)}" for k, v in sets.items()))
    mask = as_bool(divergent_mask, "divergent_mask").expand(shape)
    correct = as_bool(correct, "correct")
    if tuple(correct.shape) != shape[:1]:
        raise ValueError(f"gm_reward: correct has shape {tuple(correct.shape)}, expected ({shape[0]},)")
    g_m, g_p, d_m, d_p = sets.values()
    bad = torch.zeros(shape[0], dtype=torch.bool, device=g_m.device)
    for t in sets.values():
        bad |= any_nonfinite(t, mask)
    did = clip((g_m - g_p) - (d_m - d_p), -DID_CLIP, DID_CLIP)
    x = masked_mean(did, mask) + MIN_WEIGHT * masked_min(did, mask)  # no divergent position -> NaN
    x = torch.where(bad, torch.full_like(x, NAN), x)
    return apply_membership(gate(x, correct, GM_CAP), member, "gm_reward")


def gm_fused(
    contrast_meta: Tensor,
    contrast_placebo: Tensor,
    divergent_mask: Tensor,
    correct: Tensor,
    *,
    member: Tensor,
) -> Tensor:
    """`gm_reward` through `ops.dispatched_gold_decoy_did`. contrast_meta / contrast_placebo: [R, K]
    per-position log p(gold) - log p(decoy) after X + M and after X + placebo (fp32, on the scorer's
    device), divergent_mask [R, K]; correct, member bool [R]. Returns float64 [R] on that device."""
    if contrast_meta.shape != contrast_placebo.shape or contrast_meta.dim() != 2:
        raise ValueError(f"gm_fused: contrast_meta {tuple(contrast_meta.shape)} and contrast_placebo "
                         f"{tuple(contrast_placebo.shape)} must both be [R, K]")
    device = contrast_meta.device
    mask = as_bool(divergent_mask, "divergent_mask").to(device).expand(contrast_meta.shape)
    x = ops.dispatched_gold_decoy_did(contrast_meta, contrast_placebo, mask, DID_CLIP, MIN_WEIGHT)  # empty / non-finite -> NaN
    return apply_membership(gate(x, as_bool(correct, "correct").to(device), GM_CAP), as_bool(member, "member").to(device),
                            "gm_fused")


def gm_metrics(belief_meta: Tensor, belief_placebo: Tensor, values: Tensor) -> dict[str, float]:
    """Belief after X + M and after X + placebo over gm's members; the shift is placebo -> M."""
    return belief_shift_metrics({"meta": belief_meta, "placebo": belief_placebo}, belief_placebo, belief_meta, values)
