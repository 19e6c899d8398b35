"""PMI-shift (`pmi_shift`, SPEC section 2, the winning arm): the gold-vs-decoy belief before and
after the meta block.

`open = B(prompt + completion up to, not including, the first <|meta|>)`,
`close = B(the same + M through <|/meta|>)`, `shift = close - open`,
`R = scale * clip(shift, -2, 2) + 1[open < -eps and close > eps] - 2[open > eps and close < -eps]`,
scale = 1, eps = 0, so R lies in [-2*scale - 2, 2*scale + 1] = [-4, 3]. Not gated by correctness:
the block is rewarded for moving belief toward gold, with a bonus for crossing from the decoy side
to the gold side and a larger penalty for the reverse flip.

`pmi_shift_reward` is the float64 formula; `pmi_shift_fused` is the scorer's ops path (the shift and
flips by the dispatched `belief_shift` kernel, in float64 on the contrast op's float64 beliefs),
equal to it (tests/test_rewards_fused.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.rewards.common import NAN, apply_membership, as_bool, as_float64, belief_shift_metrics, clip, nonfinite_to_nan

SHIFT_CLIP = 2.0
FLIP_TO_GOLD_BONUS = 1.0
FLIP_TO_DECOY_PENALTY = 2.0
DEFAULT_SCALE = 1.0
DEFAULT_EPS = 0.0


def pmi_shift_reward(
    belief_open: Tensor,
    belief_close: Tensor,
    *,
    member: Tensor,
    scale: float = DEFAULT_SCALE,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """PMI-shift head value per rollout, float64 [R]; NaN for non-members.

    belief_open / belief_close: [R] beliefs from `common.belief` (NaN where the gold/decoy pair is
    not scorable). member: bool [R] from `guards.belief_membership_reason("pmi_shift", ...)`.
    scale, eps: SPEC's parameters (1 and 0). A non-finite open or close -> NaN.
    """
    if eps < 0:
        raise ValueError(f"pmi_shift_reward: eps={eps} must be >= 0")
    b_open = as_float64(belief_open, "belief_open")
    b_close = as_float64(belief_close, "belief_close")
    if b_open.dim() != 1 or b_open.shape != b_close.shape:
        raise ValueError(f"pmi_shift_reward: belief_open {tuple(b_open.shape)} and belief_close {tuple(b_close.shape)} must both be [R]")
    shift = b_close - b_open
    to_gold = (b_open < -eps) & (b_close > eps)
    to_decoy = (b_open > eps) & (b_close < -eps)
    r = (
        scale * clip(shift, -SHIFT_CLIP, SHIFT_CLIP)
        + FLIP_TO_GOLD_BONUS * to_gold.to(shift.dtype)
        - FLIP_TO_DECOY_PENALTY * to_decoy.to(shift.dtype)
    )
    bad = ~torch.isfinite(b_open) | ~torch.isfinite(b_close) | ~torch.isfinite(r)
    r = torch.where(bad, torch.full_like(r, NAN), r)
    return apply_membership(r, member, "pmi_shift_reward")


def pmi_shift_fused(belief_open: Tensor, belief_close: Tensor, *, member: Tensor, scale: float = DEFAULT_SCALE,
                    eps: float = DEFAULT_EPS) -> Tensor:
    """`pmi_shift_reward` (same parameters) through `ops.dispatched_belief_shift` (the backend's float64 kernel: the
    clipped shift and the flips at +-eps); the bonus and penalty are added in float64 here.
    Beliefs [R] on the scorer's device (float64 from `ops.dispatched_gold_decoy_contrast`);
    returns float64 [R] there, NaN for non-members."""
    if eps < 0:
        raise ValueError(f"pmi_shift_fused: eps={eps} must be >= 0")
    clipped, flip = ops.dispatched_belief_shift(as_float64(belief_open, "belief_open"),
                                                as_float64(belief_close, "belief_close"), SHIFT_CLIP, eps)
    r = scale * clipped + FLIP_TO_GOLD_BONUS * (flip > 0).to(clipped.dtype) - FLIP_TO_DECOY_PENALTY * (flip < 0).to(clipped.dtype)
    return apply_membership(nonfinite_to_nan(r), as_bool(member, "member").to(r.device), "pmi_shift_fused")


def pmi_shift_metrics(belief_open: Tensor, belief_close: Tensor, values: Tensor) -> dict[str, float]:
    """Belief at open and close over PMI-shift's members; flips counted across +-eps (0)."""
    return belief_shift_metrics({"open": belief_open, "close": belief_close}, belief_open, belief_close, values,
                                eps=DEFAULT_EPS)
