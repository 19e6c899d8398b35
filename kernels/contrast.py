"""Gold-vs-decoy contrast per answer position and its per-row reductions (SPEC sections 1, 2, 8).

Layout: R scored rows, K answer positions (gold and decoy tokenizations have equal length; rows
padded to K), V vocabulary. `gold_logits[r, k]` is the scorer's row predicting answer token k
after context + gold_<k; `decoy_logits` likewise for the decoy pass. Each position is one program
of `_gold_decoy_contrast_fwd_kernel`, by kind:

- 0, not divergent: contrast 0, nothing read;
- 1, first divergent position of its row: the prefixes agree, so the normaliser cancels and the
  contrast is (z[gold] - z[decoy]) / T of the gold row: two loads, no vocabulary pass;
- 2, later divergent positions: logp(gold | gold row) - logp(decoy | decoy row), each with an
  online log-sum-exp over the vocabulary; each LSE is saved for the backward as its two parts
  (row max, log sum), as in token_logprobs, so log p = (z - max) - log sum keeps its precision.

Belief B = sum over divergent positions (NaN when a row has none, or a non-finite contrast).
`clipped_mean_min` is the other reduction the rewards need (gm's difference-in-differences, PMI's
`mean_min` aggregation), one program per row over K positions. Input checks, autograd and the
belief are `selfdistill.ops.contrast_host`, shared with the csrc extension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfdistill.kernels.utils import as_kernel_mask, check_launchable, num_warps_for, tile_max, tile_min, tile_sum, vocab_block
from selfdistill.ops import contrast_host
from selfdistill.ops.reference import MIN_WEIGHT, REWARD_CLIP


@triton.jit
def _row_log_softmax_at(x_row, target, V, inv_temperature, BLOCK_V: tl.constexpr):
    """(log p[target], row max, log sum) of z = x / T over one row, online over tiles."""
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tile_max(z))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite logit yet: no NaN from -inf - -inf
        s = s * tl.exp(m - ref) + tile_sum(tl.exp(z - ref))
        m = m_new
    valid = (target >= 0) & (target < V)
    z_t = tl.load(x_row + target, mask=valid, other=float("nan")).to(tl.float32) * inv_temperature
    log_s = tl.log(s)
    return (z_t - m) - log_s, m, log_s


@triton.jit
def _gold_decoy_contrast_fwd_kernel(
    gold_ptr, decoy_ptr, gold_ids_ptr, decoy_ids_ptr, kind_ptr, contrast_ptr, lse_parts_ptr,
    K, V, stride_g_r, stride_g_k, stride_d_r, stride_d_k, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)
    r = pos // K
    k = pos % K
    kind = tl.load(kind_ptr + pos)
    g = tl.load(gold_ids_ptr + pos).to(tl.int64)
    d = tl.load(decoy_ids_ptr + pos).to(tl.int64)
    gold_row = gold_ptr + r * stride_g_r + k * stride_g_k
    contrast = 0.0
    max_g = 0.0
    log_sum_g = 0.0
    max_d = 0.0
    log_sum_d = 0.0
    if kind == 1:
        ok = (g >= 0) & (g < V) & (d >= 0) & (d < V)
        z_g = tl.load(gold_row + g, mask=ok, other=float("nan")).to(tl.float32)
        z_d = tl.load(gold_row + d, mask=ok, other=float("nan")).to(tl.float32)
        contrast = (z_g - z_d) * inv_temperature
    if kind == 2:
        decoy_row = decoy_ptr + r * stride_d_r + k * stride_d_k
        logp_g, max_g, log_sum_g = _row_log_softmax_at(gold_row, g, V, inv_temperature, BLOCK_V)
        logp_d, max_d, log_sum_d = _row_log_softmax_at(decoy_row, d, V, inv_temperature, BLOCK_V)
        contrast = logp_g - logp_d
    n = tl.num_programs(0).to(tl.int64)
    tl.store(contrast_ptr + pos, contrast)
    tl.store(lse_parts_ptr + pos, max_g)
    tl.store(lse_parts_ptr + n + pos, log_sum_g)
    tl.store(lse_parts_ptr + 2 * n + pos, max_d)
    tl.store(lse_parts_ptr + 3 * n + pos, log_sum_d)


@triton.jit
def _gold_decoy_contrast_bwd_kernel(
    gold_ptr, decoy_ptr, dgold_ptr, ddecoy_ptr, gold_ids_ptr, decoy_ids_ptr, kind_ptr, dcontrast_ptr, lse_parts_ptr,
    K, V, stride_g_r, stride_g_k, stride_d_r, stride_d_k, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    """dgold/ddecoy are contiguous [R, K, V] and zero-initialised; only divergent rows are written."""
    pos = tl.program_id(0).to(tl.int64)
    r = pos // K
    k = pos % K
    kind = tl.load(kind_ptr + pos)
    g = tl.load(gold_ids_ptr + pos).to(tl.int64)
    d = tl.load(decoy_ids_ptr + pos).to(tl.int64)
    grad = tl.load(dcontrast_ptr + pos) * inv_temperature
    dgold_row = dgold_ptr + pos * V
    ddecoy_row = ddecoy_ptr + pos * V
    if kind == 1:
        # d(z_g - z_d): +grad at gold, -grad at decoy, written as one pass so gold == decoy gives 0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            dz = tl.where(cols == g, grad, 0.0) - tl.where(cols == d, grad, 0.0)
            tl.store(dgold_row + cols, dz.to(dgold_ptr.dtype.element_ty), mask=cols < V)
    if kind == 2:
        gold_row = gold_ptr + r * stride_g_r + k * stride_g_k
        decoy_row = decoy_ptr + r * stride_d_r + k * stride_d_k
        n = tl.num_programs(0).to(tl.int64)
        max_g = tl.load(lse_parts_ptr + pos)
        log_sum_g = tl.load(lse_parts_ptr + n + pos)
        max_d = tl.load(lse_parts_ptr + 2 * n + pos)
        log_sum_d = tl.load(lse_parts_ptr + 3 * n + pos)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            z_g = tl.load(gold_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
            z_d = tl.load(decoy_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
            dz_g = tl.where(cols == g, grad, 0.0) - grad * tl.exp((z_g - max_g) - log_sum_g)
            dz_d = grad * tl.exp((z_d - max_d) - log_sum_d) - tl.where(cols == d, grad, 0.0)
            tl.store(dgold_row + cols, dz_g.to(dgold_ptr.dtype.element_ty), mask=in_row)
            tl.store(ddecoy_row + cols, dz_d.to(ddecoy_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _clipped_mean_min_kernel(
    x_ptr, mask_ptr, out_ptr, K, clip, min_weight,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    total = 0.0
    count = 0.0
    lowest = float("inf")
    bad = 0.0
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        used = (tl.load(mask_ptr + row * K + cols, mask=cols < K, other=0) != 0) & (cols < K)
        x = tl.load(x_ptr + row * K + cols, mask=used, other=0.0).to(tl.float32)
        nonfinite = (x != x) | (tl.abs(x) == float("inf"))
        bad += tile_sum((used & nonfinite).to(tl.float32))
        c = tl.minimum(tl.maximum(tl.where(nonfinite, 0.0, x), -clip), clip)
        total += tile_sum(tl.where(used, c, 0.0))
        count += tile_sum(used.to(tl.float32))
        lowest = tl.minimum(lowest, tile_min(tl.where(used, c, float("inf"))))
    result = total / tl.maximum(count, 1.0) + min_weight * lowest
    result = tl.where((bad > 0.0) | (count == 0.0), float("nan"), result)
    tl.store(out_ptr + row, result)


class _TritonLaunchers:
    """The launchers `selfdistill.ops.contrast_host` drives (autograd, checks and belief live there)."""

    @staticmethod
    def forward(gold_logits, decoy_logits, gold_ids, decoy_ids, kinds, temperature):
        R, K, V = gold_logits.shape
        contrast = torch.empty(R, K, dtype=torch.float32, device=gold_logits.device)
        lse_parts = torch.empty(4, R, K, dtype=torch.float32, device=gold_logits.device)  # max, log sum: gold, decoy
        decoy = gold_logits if decoy_logits is None else decoy_logits  # kind 2 never occurs without decoy rows
        if R * K:
            block = vocab_block(V)
            _gold_decoy_contrast_fwd_kernel[(R * K,)](
                gold_logits, decoy, gold_ids, decoy_ids, kinds, contrast, lse_parts,
                K, V, gold_logits.stride(0), gold_logits.stride(1), decoy.stride(0), decoy.stride(1), 1.0 / temperature,
                BLOCK_V=block, num_warps=num_warps_for(block),
            )
        return contrast, lse_parts

    @staticmethod
    def backward(gold_logits, decoy_logits, gold_ids, decoy_ids, kinds, lse_parts, dcontrast, temperature):
        R, K, V = gold_logits.shape
        dgold = torch.zeros(R, K, V, dtype=gold_logits.dtype, device=gold_logits.device)
        decoy = gold_logits if decoy_logits is None else decoy_logits
        ddecoy = torch.zeros(R, K, V, dtype=decoy.dtype, device=decoy.device) if decoy_logits is not None else dgold
        if R * K:
            block = vocab_block(V)
            _gold_decoy_contrast_bwd_kernel[(R * K,)](
                gold_logits, decoy, dgold, ddecoy, gold_ids, decoy_ids, kinds, dcontrast, lse_parts,
                K, V, gold_logits.stride(0), gold_logits.stride(1), decoy.stride(0), decoy.stride(1), 1.0 / temperature,
                BLOCK_V=block, num_warps=num_warps_for(block),
            )
        return dgold, (ddecoy if decoy_logits is not None else None)


def gold_decoy_contrast(
    gold_logits: Tensor, decoy_logits: Tensor | None, gold_ids: Tensor, decoy_ids: Tensor, divergent: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Triton `gold_decoy_contrast`; same contract as `selfdistill.ops.reference.gold_decoy_contrast`.

    Returns fp32 (contrast [R, K], 0 off the divergent positions; belief [R]). Differentiable
    w.r.t. the logits (the rewards call it under no_grad; the backward exists for completeness).
    """
    tensors = (gold_logits, gold_ids, decoy_ids, divergent) + (() if decoy_logits is None else (decoy_logits,))
    check_launchable("gold_decoy_contrast", *tensors)
    return contrast_host.gold_decoy_contrast(_TritonLaunchers, gold_logits, decoy_logits, gold_ids, decoy_ids, divergent, temperature)


def _clipped_mean_min_forward(values: Tensor, mask: Tensor, clip: float, min_weight: float) -> Tensor:
    R, K = values.shape
    out = torch.empty(R, dtype=torch.float32, device=values.device)
    if R:
        _clipped_mean_min_kernel[(R,)](
            values.contiguous(), as_kernel_mask(mask), out, K, float(clip), float(min_weight),
            BLOCK_K=max(16, min(1024, triton.next_power_of_2(max(K, 1)))),
        )
    return out


def clipped_mean_min(values: Tensor, mask: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT) -> Tensor:
    """Triton `clipped_mean_min` (same contract as the reference): per row of [R, K],
    mean(clip(x)) + min_weight * min(clip(x)) over `mask`; NaN for an empty row or a non-finite x.
    Differentiable w.r.t. `values` (the rewards call it under no_grad)."""
    check_launchable("clipped_mean_min", values, mask)
    return contrast_host.clipped_mean_min(_clipped_mean_min_forward, values, mask, clip, min_weight)
