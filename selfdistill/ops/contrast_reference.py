"""Pure-torch references of the gold-vs-decoy contrast and the rewards' region reductions (SPEC
sections 1, 2 and 8); the Triton kernels (`selfdistill.kernels.contrast`) and the csrc extension
have the same names and signatures.

`gold_decoy_contrast` works from the scorer's hidden states at the answer positions, never from
logits: at a row's first divergent position the gold and decoy prefixes agree, so the softmax
normaliser cancels and the contrast is `(z[gold] - z[decoy]) / T = (h . (W[gold] - W[decoy]) +
b[gold] - b[decoy]) / T`, one dot product (no vocabulary pass, no logits); later divergent positions
need `log p(gold | gold pass) - log p(decoy | decoy pass)`, the fused-linear token log-probs of both
passes (`reference.fused_linear_token_logprobs`: logits tiles, never [N, V] at once).

Numerics: the per-position contrast is fp32 (fp32 accumulation; SPEC section 8). Everything after
it -- the belief, the clipped mean + min of gm and PMI, PMI-shift's shift and flips -- accumulates
and decides in float64 on those fp32 values, which float64 holds exactly. So the reductions make
every threshold decision (a clip at +-2, a flip at +-eps, non-finiteness) exactly as the float64
reward formulas of `selfdistill.rewards` make it on the same per-position values, and their results
differ from those formulas only by the order of float64 additions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from selfdistill.ops.reference import fused_linear_token_logprobs

REWARD_CLIP, MIN_WEIGHT = 2.0, 1.0  # gm / PMI mean_min: mean(clip(x, -2, 2)) + 1.0 * min(clip(x, -2, 2)) (SPEC section 2)
SHIFT_CLIP = 2.0  # PMI-shift: clip(close - open, -2, 2)


class Contrast(NamedTuple):
    """`gold_decoy_contrast`'s result: contrast fp32 [R, K] (0 off the divergent positions) and
    belief float64 [R] (the float64 sum of the row's contrasts; NaN for a row with no divergent
    position or a non-finite contrast)."""

    contrast: Tensor
    belief: Tensor


def contrast_position_kinds(divergent: Tensor, have_decoy_rows: bool) -> Tensor:
    """Classify the [R, K] answer positions for `gold_decoy_contrast`: 0 = not divergent,
    1 = first divergent position of its row (gold and decoy prefixes agree: one dot product, no
    vocabulary pass), 2 = a later divergent position (needs both passes, SPEC section 1)."""
    div = divergent.bool()
    first = div & (div.long().cumsum(-1) == 1)
    kinds = div.long() + (div & ~first).long()
    if not have_decoy_rows and bool((kinds == 2).any()):
        rows = torch.nonzero((kinds == 2).any(-1)).flatten().tolist()
        raise ValueError(
            f"gold_decoy_contrast: decoy_hidden=None but rows {rows[:8]} have more than one divergent position; "
            "positions after the first need the decoy pass's hidden states"
        )
    return kinds


def masked_finite_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row float64 sum of `values` [R, K] over `mask`; NaN (non-member, SPEC section 2) for a row
    with no masked position or with a NaN/inf among its masked values."""
    used = mask.bool()
    x = values.double()
    bad = (used & ~torch.isfinite(x)).any(-1) | ~used.any(-1)
    total = torch.where(used, x, 0.0).sum(-1)
    return torch.where(bad, torch.full_like(total, float("nan")), total)


def check_contrast_inputs(gold_hidden, decoy_hidden, weight, bias, gold_ids, decoy_ids, divergent, temperature) -> None:
    """Shapes and dtypes of `gold_decoy_contrast`'s inputs, named in the error."""
    if gold_hidden.dim() != 3 or weight.dim() != 2 or gold_hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"gold_decoy_contrast expects gold_hidden [R, K, H] and weight [V, H]; got "
                         f"{tuple(gold_hidden.shape)} and {tuple(weight.shape)}")
    R, K, _ = gold_hidden.shape
    for name, t in (("gold_ids", gold_ids), ("decoy_ids", decoy_ids), ("divergent", divergent)):
        if t.shape != (R, K):
            raise ValueError(f"gold_decoy_contrast: {name} must be [R={R}, K={K}], got {tuple(t.shape)}")
    if gold_hidden.dtype != weight.dtype:
        raise ValueError(f"gold_decoy_contrast: hidden states are {gold_hidden.dtype} but the weight is {weight.dtype}; "
                         "cast one so the dot products have one dtype")
    if decoy_hidden is not None and (decoy_hidden.shape != gold_hidden.shape or decoy_hidden.dtype != gold_hidden.dtype):
        raise ValueError(f"gold_decoy_contrast: decoy_hidden {tuple(decoy_hidden.shape)} {decoy_hidden.dtype} must match "
                         f"gold_hidden {tuple(gold_hidden.shape)} {gold_hidden.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"gold_decoy_contrast: bias must be [V={weight.shape[0]}] in the weight's dtype {weight.dtype}; "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    if not temperature > 0:
        raise ValueError(f"gold_decoy_contrast: temperature must be > 0, got {temperature!r}")


def first_position_contrast(hidden: Tensor, weight: Tensor, bias: Tensor | None, gold_ids: Tensor, decoy_ids: Tensor,
                            temperature: float = 1.0) -> Tensor:
    """fp32 `(h . (W[gold] - W[decoy]) + b[gold] - b[decoy]) / T` per row of hidden [n, H]: the
    contrast at first divergent positions. The weight rows are upcast before the subtraction."""
    diff = weight[gold_ids.long()].float() - weight[decoy_ids.long()].float()
    dot = (hidden.float() * diff).sum(-1)
    if bias is not None:
        dot = dot + (bias[gold_ids.long()].float() - bias[decoy_ids.long()].float())
    return dot / temperature


def gold_decoy_contrast(
    gold_hidden: Tensor, decoy_hidden: Tensor | None, weight: Tensor, bias: Tensor | None, gold_ids: Tensor,
    decoy_ids: Tensor, divergent: Tensor, temperature: float = 1.0,
) -> Contrast:
    """Per-position `log p(gold_i | c, gold_<i) - log p(decoy_i | c, decoy_<i)` and the belief B(c).

    gold_hidden [R, K, H]: row (r, k) = the scorer's final hidden state predicting answer token k
    after context r + gold_<k (the gold pass); decoy_hidden likewise for the decoy pass, or None when
    no row has a second divergent position. weight [V, H] and bias [V] or None: the LM head.
    gold_ids, decoy_ids [R, K]: the answer tokens (equal length, rows padded to K; ids off the
    divergent positions are never read). divergent [R, K]: positions where gold and decoy differ.
    Differentiable w.r.t. the hidden states, the weight and the bias.
    """
    check_contrast_inputs(gold_hidden, decoy_hidden, weight, bias, gold_ids, decoy_ids, divergent, temperature)
    kinds = contrast_position_kinds(divergent, decoy_hidden is not None)
    first, later = kinds == 1, kinds == 2
    R, K = divergent.shape
    contrast = torch.zeros(R, K, dtype=torch.float32, device=gold_hidden.device)
    if bool(first.any()):
        c1 = first_position_contrast(gold_hidden[first], weight, bias, gold_ids[first], decoy_ids[first], temperature)
        contrast = contrast.index_put((first,), c1)
    if bool(later.any()):
        hidden = torch.cat([gold_hidden[later], decoy_hidden[later]])
        targets = torch.cat([gold_ids[later], decoy_ids[later]]).long()
        logp, _ = fused_linear_token_logprobs(hidden, weight, targets, temperature, bias=bias)
        n = logp.shape[0] // 2
        contrast = contrast.index_put((later,), logp[:n] - logp[n:])
    return Contrast(contrast, masked_finite_sum(contrast, divergent))


def clipped_mean_min(values: Tensor, mask: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT,
                     minus: Tensor | None = None) -> Tensor:
    """Per row of [R, K], with x = values - minus (or values): mean(clip(x, -clip, clip)) +
    min_weight * min(clip(x, -clip, clip)) over `mask`, in float64 -> float64 [R]. gm's x (x = the
    difference-in-differences), PMI's aggregations (x = a log-prob difference; `mean` is clip=inf,
    min_weight=0). NaN for a row with no masked value or a NaN/inf among them (clipping must not
    turn an inf into a member). Differentiable w.r.t. values and minus."""
    used = mask.bool()
    x = values.double() if minus is None else values.double() - minus.double()
    bad = (used & ~torch.isfinite(x)).any(-1) | ~used.any(-1)
    c = torch.where(used & torch.isfinite(x), x, 0.0).clamp(-clip, clip)
    mean = torch.where(used, c, 0.0).sum(-1) / used.sum(-1).clamp(min=1)
    out = mean
    if min_weight:
        out = out + min_weight * torch.where(used, c, float("inf")).amin(-1)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def gold_decoy_did(contrast_meta: Tensor, contrast_placebo: Tensor, divergent: Tensor, clip: float = REWARD_CLIP,
                   min_weight: float = MIN_WEIGHT) -> Tensor:
    """gm's x (SPEC section 2) from the contrasts after X + M and after X + placebo, float64 [R]:
    did_i = [g_i(M) - g_i(pl)] - [d_i(M) - d_i(pl)] = contrast_i(M) - contrast_i(pl)."""
    return clipped_mean_min(contrast_meta, divergent, clip, min_weight, minus=contrast_placebo)


def belief_shift(belief_open: Tensor, belief_close: Tensor, clip: float = SHIFT_CLIP, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """PMI-shift's shift and flips (SPEC section 2) per row, in float64: (clip(close - open, -clip,
    clip) float64 [R], NaN where open or close is not finite; flip int8 [R]: +1 when open < -eps and
    close > eps (decoy -> gold), -1 when open > eps and close < -eps, else 0)."""
    b_open, b_close = belief_open.double(), belief_close.double()
    shift = b_close - b_open
    ok = torch.isfinite(b_open) & torch.isfinite(b_close) & torch.isfinite(shift)
    clipped = torch.where(ok, shift.clamp(-clip, clip), torch.full_like(shift, float("nan")))
    to_gold = (b_open < -eps) & (b_close > eps)
    to_decoy = (b_open > eps) & (b_close < -eps)
    return clipped, (to_gold.to(torch.int8) - to_decoy.to(torch.int8))
