"""Host side of the fused contrast ops, shared by the Triton kernels (`kernels/contrast.py`) and
the csrc extension (`selfdistill/ops/cuda_ext.py`): input checks, the position kinds, autograd,
the belief, and `clipped_mean_min`'s backward. Each backend supplies only its launchers.

`gold_decoy_contrast` (SPEC sections 1 and 8) classifies the [R, K] answer positions (0 = not
divergent, 1 = first divergent position of its row: one logit row, 2 = later: two vocabulary
passes; `reference.contrast_position_kinds`), runs the backend's forward, and sums the contrast
into the belief (`reference.masked_finite_sum`: NaN for a row with no divergent position or a
non-finite term). The backend's backward turns d contrast into d logits.

`clipped_mean_min` (SPEC section 2) runs the backend's row reduction forward; its gradient is
elementwise and formed here in torch: d out / d x_k = [k used, |x_k| <= clip] * (1 / n_used +
min_weight * [x_k is the row's min] / n_ties), and 0 for rows that are NaN (no member) -- the
gradient torch gives the reference formula.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from selfdistill.ops.calls import backend_of, record
from selfdistill.ops.logprob_host import unit_column_stride
from selfdistill.ops.reference import contrast_position_kinds, masked_finite_sum


class ContrastLaunchers(Protocol):
    """A backend's two launchers. `forward` -> (contrast [R, K] fp32, saved: what its backward needs,
    e.g. each row's log-sum-exp parts); `backward` -> (d gold_logits, d decoy_logits or None)."""

    def forward(self, gold_logits: Tensor, decoy_logits: Tensor | None, gold_ids: Tensor, decoy_ids: Tensor,
                kinds: Tensor, temperature: float) -> tuple[Tensor, Tensor]: ...

    def backward(self, gold_logits: Tensor, decoy_logits: Tensor | None, gold_ids: Tensor, decoy_ids: Tensor,
                 kinds: Tensor, saved: Tensor, dcontrast: Tensor, temperature: float) -> tuple[Tensor, Tensor | None]: ...


def check_contrast_inputs(gold_logits, decoy_logits, gold_ids, decoy_ids, divergent, temperature) -> None:
    if gold_logits.dim() != 3:
        raise ValueError(f"gold_decoy_contrast expects gold_logits [R, K, V]; got {tuple(gold_logits.shape)}")
    R, K, _ = gold_logits.shape
    for name, t in (("gold_ids", gold_ids), ("decoy_ids", decoy_ids), ("divergent", divergent)):
        if t.shape != (R, K):
            raise ValueError(f"gold_decoy_contrast: {name} must be [R={R}, K={K}], got {tuple(t.shape)}")
    if decoy_logits is not None and (decoy_logits.shape != gold_logits.shape or decoy_logits.dtype != gold_logits.dtype):
        raise ValueError(f"gold_decoy_contrast: decoy_logits {tuple(decoy_logits.shape)} {decoy_logits.dtype} must match "
                         f"gold_logits {tuple(gold_logits.shape)} {gold_logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"gold_decoy_contrast: temperature must be > 0, got {temperature!r}")


class _ContrastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launchers, gold_logits, decoy_logits, gold_ids, decoy_ids, kinds, temperature):
        contrast, saved = launchers.forward(gold_logits, decoy_logits, gold_ids, decoy_ids, kinds, temperature)
        ctx.save_for_backward(gold_logits, decoy_logits, gold_ids, decoy_ids, kinds, saved)
        ctx.launchers, ctx.temperature = launchers, temperature
        return contrast

    @staticmethod
    def backward(ctx, dcontrast):
        gold_logits, decoy_logits, gold_ids, decoy_ids, kinds, saved = ctx.saved_tensors
        dgold, ddecoy = ctx.launchers.backward(
            gold_logits, decoy_logits, gold_ids, decoy_ids, kinds, saved, dcontrast.contiguous().float(), ctx.temperature
        )
        return None, dgold, ddecoy, None, None, None, None


def gold_decoy_contrast(
    launchers: ContrastLaunchers, gold_logits: Tensor, decoy_logits: Tensor | None, gold_ids: Tensor, decoy_ids: Tensor,
    divergent: Tensor, temperature: float,
) -> tuple[Tensor, Tensor]:
    """fp32 (contrast [R, K], 0 off `divergent`; belief [R]) through `launchers`; the contract of
    `selfdistill.ops.reference.gold_decoy_contrast`, differentiable w.r.t. the logits."""
    check_contrast_inputs(gold_logits, decoy_logits, gold_ids, decoy_ids, divergent, temperature)
    kinds = contrast_position_kinds(divergent, decoy_logits is not None).to(torch.int8).contiguous()
    record("gold_decoy_contrast", backend_of(launchers))
    contrast = _ContrastFunction.apply(
        launchers, unit_column_stride(gold_logits), None if decoy_logits is None else unit_column_stride(decoy_logits), gold_ids.long().contiguous(),
        decoy_ids.long().contiguous(), kinds, float(temperature),
    )
    return contrast, masked_finite_sum(contrast, divergent.bool())


RowReduction = Callable[[Tensor, Tensor, float, float], Tensor]  # (values, mask, clip, min_weight) -> [R] fp32


class _ClippedMeanMinFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward_fn, values, mask, clip, min_weight):
        out = forward_fn(values, mask, clip, min_weight)
        ctx.save_for_backward(values, mask, out)
        ctx.clip, ctx.min_weight = clip, min_weight
        return out

    @staticmethod
    def backward(ctx, dout):
        values, mask, out = ctx.saved_tensors
        used = mask.bool() & torch.isfinite(values)
        x = values.float()
        c = torch.where(used, x, 0.0).clamp(-ctx.clip, ctx.clip)
        low = torch.where(used, c, float("inf")).amin(-1, keepdim=True)
        is_min = used & (c == low)
        inside = used & (x >= -ctx.clip) & (x <= ctx.clip)
        n = used.sum(-1, keepdim=True).clamp(min=1)
        ties = is_min.sum(-1, keepdim=True).clamp(min=1)
        local = inside.float() / n + ctx.min_weight * (is_min & inside).float() / ties
        g = torch.where(torch.isnan(out), 0.0, dout.float()).unsqueeze(-1)
        return None, (g * local).to(values.dtype), None, None, None


def clipped_mean_min(forward_fn: RowReduction, values: Tensor, mask: Tensor, clip: float, min_weight: float) -> Tensor:
    """Per row of [R, K]: mean(clip(x)) + min_weight * min(clip(x)) over `mask` by the backend's
    `forward_fn`; NaN for an empty row or a non-finite x. Differentiable w.r.t. `values`."""
    if values.dim() != 2 or mask.shape != values.shape:
        raise ValueError(f"clipped_mean_min expects values and mask [R, K]; got {tuple(values.shape)} and {tuple(mask.shape)}")
    record("clipped_mean_min", backend_of(forward_fn))
    return _ClippedMeanMinFunction.apply(forward_fn, values, mask, float(clip), float(min_weight))
