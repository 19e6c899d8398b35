"""Host side of the fused contrast ops, shared by the Triton kernels (`kernels/contrast.py`) and
the csrc extension (`selfdistill/ops/cuda_ext.py`): input checks, the position kinds, the calls of
the backend's launchers, autograd and the float64 belief. Each backend supplies launchers only.

`gold_decoy_contrast` (SPEC sections 1 and 8; the formulas are `contrast_reference`) classifies
the [R, K] answer positions (`contrast_position_kinds`) and reads the scorer's hidden states there:

- first divergent positions: the backend's `first_position` kernel, one dot product
  `h . (W[gold] - W[decoy])` (+ the bias difference) / T per position, reading two weight rows and
  no logits. Its gradient is formed here: d h = g (W[gold] - W[decoy]) / T, and the two weight
  rows (and bias entries) get +- g h / T, accumulated in fp32 over the rows the batch touches.
- later divergent positions: the fused-linear token log-probs of the gold and the decoy pass's
  hidden states in one call (`logprob_host.fused_linear_token_logprobs` over the backend's
  token-logprob kernels: logits tiles, never [N, V]), differentiable through its own autograd.

The belief is the float64 sum of the row's contrasts (`contrast_reference.masked_finite_sum`).

`clipped_mean_min` (SPEC section 2) runs the backend's row reduction forward (float64 accumulation);
its gradient is elementwise and formed here in torch: d out / d x_k = [k used, |x_k| <= clip] *
(1 / n_used + min_weight * [x_k is the row's min] / n_ties), and 0 for rows that are NaN (no member)
-- the gradient torch gives the reference formula; `minus` gets its negative. `belief_shift` runs the
backend's elementwise float64 kernel (no gradient: a reward).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from selfdistill.ops import logprob_host
from selfdistill.ops.calls import backend_of, record
from selfdistill.ops.contrast_reference import Contrast, check_contrast_inputs, contrast_position_kinds, masked_finite_sum
from selfdistill.ops.logprob_host import unit_column_stride


class ContrastLaunchers(Protocol):
    """A backend's contrast launchers: its token-logprob kernels (`logprob_host.TokenLogprobLaunchers`,
    for the later positions) and the first-position kernel: (contrast fp32 [n]) from hidden [n, H]
    (contiguous rows), the weight [V, H], bias [V] or None and the ids [n] (int64)."""

    token_logprobs: logprob_host.TokenLogprobLaunchers

    def first_position(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, gold_ids: Tensor, decoy_ids: Tensor,
                       temperature: float) -> Tensor: ...


def _scatter_rows(grad_rows: Tensor, ids: Tensor, like: Tensor) -> Tensor:
    """A zero gradient shaped like `like` ([V, H] or [V]) with `grad_rows` summed into rows `ids`,
    accumulated in fp32 over the distinct rows only (so gold == decoy cancels exactly)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    acc = torch.zeros((uniq.numel(), *like.shape[1:]), dtype=torch.float32, device=like.device)
    acc.index_add_(0, inverse, grad_rows.float())
    out = torch.zeros_like(like)
    out[uniq] = acc.to(like.dtype)
    return out


class _FirstPositionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launchers, hidden, weight, bias, gold_ids, decoy_ids, temperature):
        contrast = launchers.first_position(hidden, weight, bias, gold_ids, decoy_ids, temperature)
        ctx.save_for_backward(hidden, weight, gold_ids, decoy_ids)
        ctx.temperature, ctx.bias_like = temperature, bias
        return contrast

    @staticmethod
    def backward(ctx, dcontrast):
        hidden, weight, gold_ids, decoy_ids = ctx.saved_tensors
        g = dcontrast.float().unsqueeze(-1) / ctx.temperature  # [n, 1]
        ids = torch.cat([gold_ids, decoy_ids])
        dhidden = dweight = dbias = None
        if ctx.needs_input_grad[1]:
            dhidden = (g * (weight[gold_ids].float() - weight[decoy_ids].float())).to(hidden.dtype)
        if ctx.needs_input_grad[2]:
            rows = g * hidden.float()
            dweight = _scatter_rows(torch.cat([rows, -rows]), ids, weight)
        if ctx.needs_input_grad[3]:
            dbias = _scatter_rows(torch.cat([g, -g]).squeeze(-1), ids, ctx.bias_like)
        return None, dhidden, dweight, dbias, None, None, None


def gold_decoy_contrast(
    launchers: ContrastLaunchers, gold_hidden: Tensor, decoy_hidden: Tensor | None, weight: Tensor, bias: Tensor | None,
    gold_ids: Tensor, decoy_ids: Tensor, divergent: Tensor, temperature: float, chunk_rows: int = 1024,
) -> Contrast:
    """`contrast_reference.gold_decoy_contrast` through `launchers`: fp32 contrast [R, K], float64
    belief [R]; differentiable w.r.t. the hidden states, the weight and the bias."""
    check_contrast_inputs(gold_hidden, decoy_hidden, weight, bias, gold_ids, decoy_ids, divergent, temperature)
    kinds = contrast_position_kinds(divergent, decoy_hidden is not None)
    first, later = kinds == 1, kinds == 2
    record("gold_decoy_contrast", backend_of(launchers))
    contrast = torch.zeros(divergent.shape, dtype=torch.float32, device=gold_hidden.device)
    if bool(first.any()):
        c1 = _FirstPositionFunction.apply(launchers, gold_hidden[first].contiguous(), unit_column_stride(weight),
                                          None if bias is None else bias.contiguous(), gold_ids[first].long().contiguous(),
                                          decoy_ids[first].long().contiguous(), float(temperature))
        contrast = contrast.index_put((first,), c1)
    if bool(later.any()):
        hidden = torch.cat([gold_hidden[later], decoy_hidden[later]])
        targets = torch.cat([gold_ids[later], decoy_ids[later]]).long()
        logp, _ = logprob_host.fused_linear_token_logprobs(launchers.token_logprobs, hidden, weight, targets, temperature,
                                                           chunk_rows, bias)
        n = logp.shape[0] // 2
        contrast = contrast.index_put((later,), logp[:n] - logp[n:])
    return Contrast(contrast, masked_finite_sum(contrast, divergent))


RowReduction = Callable[[Tensor, Tensor, Tensor | None, float, float], Tensor]  # (values, mask, minus, clip, min_weight) -> float64 [R]


class _ClippedMeanMinFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward_fn, values, mask, minus, clip, min_weight):
        out = forward_fn(values, mask, minus, clip, min_weight)
        ctx.save_for_backward(values, mask, minus, out)
        ctx.clip, ctx.min_weight = clip, min_weight
        return out

    @staticmethod
    def backward(ctx, dout):
        values, mask, minus, out = ctx.saved_tensors
        x = values.double() if minus is None else values.double() - minus.double()
        used = mask.bool() & torch.isfinite(x)
        c = torch.where(used, x, 0.0).clamp(-ctx.clip, ctx.clip)
        low = torch.where(used, c, float("inf")).amin(-1, keepdim=True)
        is_min = used & (c == low)
        inside = used & (x >= -ctx.clip) & (x <= ctx.clip)
        n = used.sum(-1, keepdim=True).clamp(min=1)
        ties = is_min.sum(-1, keepdim=True).clamp(min=1)
        local = inside.double() / n + ctx.min_weight * (is_min & inside).double() / ties
        g = torch.where(torch.isnan(out), 0.0, dout.double()).unsqueeze(-1) * local
        dminus = None if minus is None or not ctx.needs_input_grad[3] else (-g).to(minus.dtype)
        return None, g.to(values.dtype), None, dminus, None, None


def clipped_mean_min(forward_fn: RowReduction, values: Tensor, mask: Tensor, clip: float, min_weight: float,
                     minus: Tensor | None = None) -> Tensor:
    """Per row of [R, K], x = values - minus (or values): mean(clip(x)) + min_weight * min(clip(x))
    over `mask` by the backend's `forward_fn`, float64 [R]; NaN for an empty row or a non-finite x.
    Differentiable w.r.t. `values` and `minus`."""
    if values.dim() != 2 or mask.shape != values.shape or (minus is not None and minus.shape != values.shape):
        raise ValueError(f"clipped_mean_min expects values, mask (and minus) [R, K]; got {tuple(values.shape)}, "
                         f"{tuple(mask.shape)}" + ("" if minus is None else f" and {tuple(minus.shape)}"))
    if not clip > 0:
        raise ValueError(f"clipped_mean_min: clip must be > 0 (inf: no clipping), got {clip!r}")
    record("clipped_mean_min", backend_of(forward_fn))
    return _ClippedMeanMinFunction.apply(forward_fn, values, mask, minus, float(clip), float(min_weight))


ShiftKernel = Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]]  # (open, close, clip, eps) -> (float64 [R], int8 [R])


def belief_shift(forward_fn: ShiftKernel, belief_open: Tensor, belief_close: Tensor, clip: float, eps: float) -> tuple[Tensor, Tensor]:
    """`contrast_reference.belief_shift` through the backend's kernel: (clipped shift float64 [R],
    flip int8 [R]), both beliefs taken as float64."""
    if belief_open.dim() != 1 or belief_close.shape != belief_open.shape:
        raise ValueError(f"belief_shift expects belief_open and belief_close [R]; got {tuple(belief_open.shape)} and "
                         f"{tuple(belief_close.shape)}")
    if not clip > 0 or not eps >= 0:
        raise ValueError(f"belief_shift: clip must be > 0 and eps >= 0; got clip={clip!r}, eps={eps!r}")
    record("belief_shift", backend_of(forward_fn))
    with torch.no_grad():
        return forward_fn(belief_open.double().contiguous(), belief_close.double().contiguous(), float(clip), float(eps))
