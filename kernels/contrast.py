"""Gold-vs-decoy contrast from the scorer's hidden states, and the rewards' row reductions (SPEC
sections 1, 2, 8). The formulas are `selfdistill.ops.contrast_reference`; input checks, the position
kinds, autograd and the float64 belief are `selfdistill.ops.contrast_host`, shared with the csrc
extension. Kernels here:

- `_first_position_contrast_kernel`, one program per first divergent position: the gold pass's
  hidden state h [H] (fp32 math on any input dtype) dotted with W[gold] - W[decoy], two weight rows
  read by id (int64 offsets), plus the bias difference, times 1/T. No logits, no vocabulary pass.
  Later divergent positions are the token-logprob kernels (`kernels/token_logprobs.py`) under the
  fused-linear host side.
- `_clipped_mean_min_kernel`, one program per row over K positions: mean(clip(x)) + min_weight *
  min(clip(x)) with x = values - minus, in float64 (gm's difference-in-differences, PMI's
  aggregations); NaN for a row with no masked value or a non-finite x.
- `_belief_shift_kernel`, elementwise over rows in float64: PMI-shift's clip(close - open) and its
  flips at +-eps.
The float64 parameters (clip, eps, min_weight) travel in a float64 tensor, so an eps or clip that
fp32 cannot hold is compared exactly as the float64 reward formulas compare it.

`_row_log_softmax_at` (one row's online log-sum-exp with the log-probs at given indices) is shared
with `kernels/topk_distill.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfdistill.kernels.token_logprobs import TritonLaunchers
from selfdistill.kernels.utils import as_kernel_mask, check_launchable, num_warps_for, tile_max, tile_min, tile_sum, vocab_block
from selfdistill.ops import contrast_host
from selfdistill.ops.contrast_reference import MIN_WEIGHT, REWARD_CLIP, SHIFT_CLIP, Contrast
from selfdistill.ops.logprob_host import unit_column_stride


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
def _first_position_contrast_kernel(
    h_ptr, w_ptr, b_ptr, gold_ids_ptr, decoy_ids_ptr, out_ptr,
    H, V, stride_h, stride_w, inv_temperature,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)
    g = tl.load(gold_ids_ptr + pos).to(tl.int64)
    d = tl.load(decoy_ids_ptr + pos).to(tl.int64)
    ok = (g >= 0) & (g < V) & (d >= 0) & (d < V)  # else NaN: the row fails closed, no stray read
    g = tl.where(ok, g, 0)
    d = tl.where(ok, d, 0)
    h_row = h_ptr + pos * stride_h
    acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        in_row = cols < H
        h = tl.load(h_row + cols, mask=in_row, other=0.0).to(tl.float32)
        w_g = tl.load(w_ptr + g * stride_w + cols, mask=in_row, other=0.0).to(tl.float32)
        w_d = tl.load(w_ptr + d * stride_w + cols, mask=in_row, other=0.0).to(tl.float32)
        acc += h * (w_g - w_d)
    dot = tile_sum(acc)
    if HAS_BIAS:
        dot += tl.load(b_ptr + g).to(tl.float32) - tl.load(b_ptr + d).to(tl.float32)
    tl.store(out_ptr + pos, tl.where(ok, dot * inv_temperature, float("nan")))


@triton.jit
def _clipped_mean_min_kernel(
    x_ptr, minus_ptr, mask_ptr, params_ptr, out_ptr, K,
    HAS_MINUS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    clip = tl.load(params_ptr)  # float64
    min_weight = tl.load(params_ptr + 1)
    zero = tl.full([], 0.0, tl.float64)  # the loop-carried sums keep one type
    total = zero
    count = zero
    bad = zero
    lowest = zero + float("inf")
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        in_row = cols < K
        used = (tl.load(mask_ptr + row * K + cols, mask=in_row, other=0) != 0) & in_row
        x = tl.load(x_ptr + row * K + cols, mask=used, other=0.0).to(tl.float64)
        if HAS_MINUS:
            x = x - tl.load(minus_ptr + row * K + cols, mask=used, other=0.0).to(tl.float64)
        nonfinite = (x != x) | (tl.abs(x) == float("inf"))
        bad += tile_sum((used & nonfinite).to(tl.float64))
        c = tl.minimum(tl.maximum(tl.where(nonfinite, 0.0, x), -clip), clip)
        total += tile_sum(tl.where(used, c, 0.0))
        count += tile_sum(used.to(tl.float64))
        lowest = tl.minimum(lowest, tile_min(tl.where(used, c, float("inf"))))
    result = total / tl.maximum(count, 1.0) + min_weight * tl.where(count > 0.0, lowest, 0.0)  # no 0 * inf
    result = tl.where((bad > 0.0) | (count == 0.0), float("nan"), result)
    tl.store(out_ptr + row, result)


@triton.jit
def _belief_shift_kernel(open_ptr, close_ptr, params_ptr, shift_ptr, flip_ptr, R, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < R
    clip = tl.load(params_ptr)  # float64
    eps = tl.load(params_ptr + 1)
    b_open = tl.load(open_ptr + rows, mask=in_range, other=0.0)
    b_close = tl.load(close_ptr + rows, mask=in_range, other=0.0)
    shift = b_close - b_open
    finite = (b_open == b_open) & (tl.abs(b_open) != float("inf")) & (b_close == b_close) & (tl.abs(b_close) != float("inf"))
    finite = finite & (tl.abs(shift) != float("inf"))
    clipped = tl.where(finite, tl.minimum(tl.maximum(shift, -clip), clip), float("nan"))
    flip = ((b_open < -eps) & (b_close > eps)).to(tl.int8) - ((b_open > eps) & (b_close < -eps)).to(tl.int8)
    tl.store(shift_ptr + rows, clipped, mask=in_range)
    tl.store(flip_ptr + rows, flip, mask=in_range)


def _params(device: torch.device, *values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


class _TritonContrastLaunchers:
    """The launchers `selfdistill.ops.contrast_host` drives (autograd, checks and belief live there)."""

    token_logprobs = TritonLaunchers

    @staticmethod
    def first_position(hidden, weight, bias, gold_ids, decoy_ids, temperature):
        n, H = hidden.shape
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        if n:
            weight = unit_column_stride(weight)
            block = vocab_block(H)
            _first_position_contrast_kernel[(n,)](
                hidden, weight, weight if bias is None else bias, gold_ids, decoy_ids, out,
                H, weight.shape[0], hidden.stride(0), weight.stride(0), 1.0 / temperature,
                HAS_BIAS=bias is not None, BLOCK_H=block, num_warps=num_warps_for(block),
            )
        return out


def gold_decoy_contrast(
    gold_hidden: Tensor, decoy_hidden: Tensor | None, weight: Tensor, bias: Tensor | None, gold_ids: Tensor,
    decoy_ids: Tensor, divergent: Tensor, temperature: float = 1.0,
) -> Contrast:
    """Triton `gold_decoy_contrast` (same contract as `selfdistill.ops.contrast_reference`): from the
    scorer's hidden states [R, K, H] at the answer positions and its LM head, fp32 contrast [R, K]
    and float64 belief [R]. Differentiable w.r.t. the hidden states, the weight and the bias."""
    tensors = [gold_hidden, weight, gold_ids, decoy_ids, divergent] + [t for t in (decoy_hidden, bias) if t is not None]
    check_launchable("gold_decoy_contrast", *tensors)
    return contrast_host.gold_decoy_contrast(_TritonContrastLaunchers, gold_hidden, decoy_hidden, weight, bias, gold_ids,
                                             decoy_ids, divergent, temperature)


def _clipped_mean_min_forward(values: Tensor, mask: Tensor, minus: Tensor | None, clip: float, min_weight: float) -> Tensor:
    R, K = values.shape
    out = torch.empty(R, dtype=torch.float64, device=values.device)
    if R:
        values = values.contiguous()
        _clipped_mean_min_kernel[(R,)](
            values, values if minus is None else minus.contiguous(), as_kernel_mask(mask), _params(values.device, clip, min_weight),
            out, K, HAS_MINUS=minus is not None, BLOCK_K=max(16, min(1024, triton.next_power_of_2(max(K, 1)))),
        )
    return out


def clipped_mean_min(values: Tensor, mask: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT,
                     minus: Tensor | None = None) -> Tensor:
    """Triton `clipped_mean_min` (same contract as the reference): per row of [R, K], with
    x = values - minus, mean(clip(x)) + min_weight * min(clip(x)) over `mask` in float64; NaN for an
    empty row or a non-finite x. Differentiable w.r.t. `values` and `minus`."""
    check_launchable("clipped_mean_min", values, mask, *(() if minus is None else (minus,)))
    return contrast_host.clipped_mean_min(_clipped_mean_min_forward, values, mask, clip, min_weight, minus)


def _belief_shift_forward(belief_open: Tensor, belief_close: Tensor, clip: float, eps: float) -> tuple[Tensor, Tensor]:
    R = belief_open.shape[0]
    shift = torch.empty(R, dtype=torch.float64, device=belief_open.device)
    flip = torch.empty(R, dtype=torch.int8, device=belief_open.device)
    if R:
        block = 256
        _belief_shift_kernel[(triton.cdiv(R, block),)](belief_open, belief_close, _params(belief_open.device, clip, eps),
                                                        shift, flip, R, BLOCK=block)
    return shift, flip


def belief_shift(belief_open: Tensor, belief_close: Tensor, clip: float = SHIFT_CLIP, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Triton `belief_shift` (same contract as the reference): PMI-shift's float64 clip(close - open)
    [R] (NaN where either belief is not finite) and flip int8 [R] (+1 decoy -> gold, -1 gold -> decoy)."""
    check_launchable("belief_shift", belief_open, belief_close)
    return contrast_host.belief_shift(_belief_shift_forward, belief_open, belief_close, clip, eps)
