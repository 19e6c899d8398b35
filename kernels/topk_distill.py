"""Top-K distillation (SPEC sections 6 and 8): the student's top-K(+tail) divergence to a teacher
per position, without fp32 [N, V] logits.

The chunking, the matmuls and autograd are `selfdistill.ops.topk_distill_host` (the backward reuses
`selfdistill.ops.logprob_host`'s vocabulary-slice walk); this module supplies three kernels:

- `_topk_logprobs_kernel`, one program per row of a logits tile [n, V]: the contrast kernels'
  online log-sum-exp over the vocabulary in fp32 (z = logits / T; running max m and
  s = sum exp(z - m)) with the log-probs at the row's K indices, (z_k - m) - log s. Saves
  (m, log s). Run once per side.
- `_topk_divergence_kernel`, one program per row of the [N, K] log-prob pairs (a = student,
  b = teacher): the categories (the K, plus the tail log(-expm1(lse_K)) with lse_K <= -1e-7, or the
  K renormalised), the divergence, and its gradient w.r.t. the student's K log-probs:
      per category  G_c = -q_c (alpha=0),  p_c (a_c - b_c + 1) (alpha=1),  (1-alpha) p_c (a_c - log m_c) (JSD)
      tail          g_k = G_k - G_tail exp(a_k - a_tail)   (0 for the tail term where the clamp engages)
      renormalised  g_k = G_k - p_k sum_j G_j
  with categories of zero probability contributing 0 (0 log 0 = 0), as the reference's formula.
- `_topk_distill_bwd_kernel`, one program per row of a recomputed logits tile (or vocabulary
  slice): d loss / d z_j = (g_j - (sum_k g_k) p_j) / T with g_j the upstream-scaled gradient at the
  K indices and 0 elsewhere, written over the tile in the logits' dtype.

The top-K selection itself is `torch.topk` on the student's logits tile: a streaming Triton top-K
would have to merge a running K-buffer with every vocabulary tile (a bitonic sort of value-index
pairs packed into 64-bit keys per tile) to do what torch's radix select already does on the tile in
memory, for a step that is not differentiated; and torch.topk breaks ties the same way under every
backend, so the torch reference and this path choose the same indices from the same tile.
K (one tile of the divergence and backward kernels) is at most 4096 on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfdistill.kernels.contrast import _row_log_softmax_at
from selfdistill.kernels.utils import INTERPRETED, MAX_BLOCK_GPU, check_launchable, num_warps_for, tile_max, tile_sum, vocab_block
from selfdistill.ops import topk_distill_host
from selfdistill.ops.logprob_host import unit_column_stride
from selfdistill.ops.reference import TAIL_LSE_MAX

MAX_TOPK_GPU = MAX_BLOCK_GPU  # K indices of a row are held in registers in one tile


@triton.jit
def _topk_logprobs_kernel(
    x_ptr, stride_x, idx_ptr, logp_ptr, row_max_ptr, log_sum_ptr,
    V, K, inv_temperature,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    idx = tl.load(idx_ptr + row * K + ks, mask=ks < K, other=-1)
    logp, m, log_s = _row_log_softmax_at(x_ptr + row * stride_x, idx, V, inv_temperature, BLOCK_V)
    tl.store(logp_ptr + row * K + ks, logp, mask=ks < K)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)


@triton.jit
def _logsumexp(x):
    m = tile_max(x)
    ref = tl.where(m == float("-inf"), 0.0, m)
    return ref + tl.log(tile_sum(tl.exp(x - ref)))


@triton.jit
def _tail_logprob(lse_k, tail_lse_max):
    # log(-expm1(lse_K)) with lse_K clamped (SPEC section 6); 1 - exp in fp64 keeps the digits of a
    # tail mass near 1e-7 (libdevice's expm1 does not run in the interpreter)
    x = tl.minimum(lse_k, tail_lse_max).to(tl.float64)
    return tl.log(1.0 - tl.exp(x)).to(tl.float32)


@triton.jit
def _weighted_log_ratio(w, log_x, log_y):
    """w (log_x - log_y) per category, exactly 0 where w = 0: the -inf log-prob of a banned token
    never meets a zero weight (no -inf * 0, no -inf - -inf)."""
    live = w > 0.0
    return tl.where(live, w * (tl.where(live, log_x, 0.0) - tl.where(live, log_y, 0.0)), 0.0)


@triton.jit
def _category_terms(a, b, log_1m_alpha, log_alpha, one_m_alpha, alpha, MODE: tl.constexpr):
    """(loss term, d term / d a) per category of student / teacher log-probs a, b."""
    p = tl.exp(a)
    q = tl.exp(b)
    if MODE == 0:  # KL(T || S) = sum q (b - a)
        loss = _weighted_log_ratio(q, b, a)
        grad = -q
    elif MODE == 1:  # KL(S || T) = sum p (a - b)
        loss = _weighted_log_ratio(p, a, b)
        grad = loss + p
    else:  # (1 - alpha) KL(S || M) + alpha KL(T || M), log m = logaddexp(a + log(1 - alpha), b + log alpha)
        either = (p > 0.0) | (q > 0.0)  # a category neither side weights has log m = -inf: keep it out
        u = tl.where(either, a, 0.0) + log_1m_alpha
        v = tl.where(either, b, 0.0) + log_alpha
        mx = tl.maximum(u, v)
        log_m = mx + tl.log(tl.exp(u - mx) + tl.exp(v - mx))
        grad = one_m_alpha * _weighted_log_ratio(p, a, log_m)
        loss = grad + alpha * _weighted_log_ratio(q, b, log_m)
    return loss, grad


@triton.jit
def _topk_divergence_kernel(
    logp_s_ptr, logp_t_ptr, loss_ptr, grad_ptr,
    K, log_1m_alpha, log_alpha, one_m_alpha, alpha, tail_lse_max,
    TAIL: tl.constexpr, MODE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    in_k = ks < K
    a = tl.load(logp_s_ptr + row * K + ks, mask=in_k, other=float("-inf"))
    b = tl.load(logp_t_ptr + row * K + ks, mask=in_k, other=float("-inf"))
    lse_a = _logsumexp(a)
    if TAIL:
        a_tail = _tail_logprob(lse_a, tail_lse_max)
        b_tail = _tail_logprob(_logsumexp(b), tail_lse_max)
        loss_k, g_k = _category_terms(a, b, log_1m_alpha, log_alpha, one_m_alpha, alpha, MODE)
        loss_tail, g_tail = _category_terms(a_tail, b_tail, log_1m_alpha, log_alpha, one_m_alpha, alpha, MODE)
        # d a_tail / d a_k = -exp(a_k - a_tail) while the clamp is open (torch.clamp passes lse_K = max)
        through_tail = tl.where(lse_a <= tail_lse_max, g_tail, 0.0)
        grad = g_k - through_tail * tl.exp(a - a_tail)
        loss = tile_sum(loss_k) + loss_tail
    else:
        a = a - lse_a
        b = b - _logsumexp(b)
        loss_k, g_k = _category_terms(a, b, log_1m_alpha, log_alpha, one_m_alpha, alpha, MODE)
        grad = g_k - tl.exp(a) * tile_sum(g_k)
        loss = tile_sum(loss_k)
    tl.store(loss_ptr + row, loss)
    tl.store(grad_ptr + row * K + ks, grad, mask=in_k)


@triton.jit
def _topk_distill_bwd_kernel(
    x_ptr, stride_x, dx_ptr, stride_dx, idx_ptr, dlogp_ptr, row_max_ptr, log_sum_ptr,
    V, K, inv_temperature,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx may alias x (the fused-linear path overwrites its recomputed tile in place); idx outside
    [0, V) (the other vocabulary slices' columns) are skipped."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    row_max = tl.load(row_max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    ks = tl.arange(0, BLOCK_K)
    in_k = ks < K
    g = tl.load(dlogp_ptr + row * K + ks, mask=in_k, other=0.0)
    g_sum = tile_sum(g)
    idx = tl.load(idx_ptr + row * K + ks, mask=in_k, other=-1)
    in_slice = (idx >= 0) & (idx < V)
    # the K columns' values are formed before the walk below overwrites them
    z_k = tl.load(x_row + idx, mask=in_slice, other=float("-inf")).to(tl.float32) * inv_temperature
    dz_k = g - g_sum * tl.exp((z_k - row_max) - log_sum)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(x_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        p = tl.exp((z - row_max) - log_sum)
        tl.store(dx_row + cols, (-g_sum * p * inv_temperature).to(dx_ptr.dtype.element_ty), mask=in_row)
    # every thread's dense store above lands before the K columns are overwritten
    tl.debug_barrier()
    tl.store(dx_row + idx, (dz_k * inv_temperature).to(dx_ptr.dtype.element_ty), mask=in_slice)


def _topk_block(K: int) -> int:
    if not INTERPRETED and K > MAX_TOPK_GPU:
        raise ValueError(f"topk_distill: k={K} is above the Triton kernels' limit of {MAX_TOPK_GPU}; use ops.backend=torch")
    return max(16, triton.next_power_of_2(K))


def topk_logprobs_forward(logits: Tensor, idx: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Launch the vocabulary pass on logits [n, V] at the indices idx [n, K]: fp32 (log p [n, K],
    stats [n, 2] = (row max, log sum) of z = logits / T)."""
    logits, idx = unit_column_stride(logits), idx.contiguous()
    (n, V), K = logits.shape, idx.shape[1]
    logp = torch.empty(n, K, dtype=torch.float32, device=logits.device)
    lse_parts = torch.empty(2, n, dtype=torch.float32, device=logits.device)
    if n:
        block = vocab_block(V)
        _topk_logprobs_kernel[(n,)](
            logits, logits.stride(0), idx, logp, lse_parts[0], lse_parts[1], V, K, 1.0 / temperature,
            BLOCK_V=block, BLOCK_K=_topk_block(K), num_warps=num_warps_for(block),
        )
    return logp, lse_parts.t()


def topk_divergence_forward(logp_s: Tensor, logp_t: Tensor, tail: bool, alpha: float) -> tuple[Tensor, Tensor]:
    """Launch the divergence kernel on the [N, K] log-prob pairs: fp32 (loss [N], d loss / d logp_s [N, K])."""
    logp_s, logp_t = logp_s.float().contiguous(), logp_t.float().contiguous()
    N, K = logp_s.shape
    loss = torch.empty(N, dtype=torch.float32, device=logp_s.device)
    grad = torch.empty_like(logp_s)
    if N:
        mode = 0 if alpha == 0.0 else 1 if alpha == 1.0 else 2
        log_1m_alpha = math.log1p(-alpha) if alpha < 1.0 else 0.0  # unused by MODE 0 and 1
        log_alpha = math.log(alpha) if alpha > 0.0 else 0.0
        _topk_divergence_kernel[(N,)](
            logp_s, logp_t, loss, grad, K, log_1m_alpha, log_alpha, 1.0 - alpha, alpha, TAIL_LSE_MAX,
            TAIL=bool(tail), MODE=mode, BLOCK_K=_topk_block(K),
        )
    return loss, grad


def topk_distill_backward(
    logits: Tensor, targets: Tensor, stats: Tensor, entropy: Tensor, dlogp: Tensor, dentropy: Tensor, temperature: float,
    out: Tensor | None = None,
) -> Tensor:
    """Launch the backward kernel: d loss / d logits [n, V] in the logits' dtype from dlogp [n, K] at
    the indices `targets` [n, K] (shifted by a vocabulary slice's first column), written into `out`
    (which may be `logits` itself) or a new tensor. `entropy` / `dentropy` are unused (the
    `logprob_host` launcher signature)."""
    logits, targets = unit_column_stride(logits), targets.contiguous()
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    (n, V), K = logits.shape, targets.shape[1]
    if n:
        block = vocab_block(V)
        _topk_distill_bwd_kernel[(n,)](
            logits, logits.stride(0), out, out.stride(0), targets, dlogp.float().contiguous(), stats[:, 0].contiguous(),
            stats[:, 1].contiguous(), V, K, 1.0 / temperature,
            BLOCK_V=block, BLOCK_K=_topk_block(K), num_warps=num_warps_for(block),
        )
    return out


class TritonTopKDistillLaunchers:
    """These kernels as `selfdistill.ops.topk_distill_host` launchers."""

    logprobs_at = staticmethod(topk_logprobs_forward)
    divergence = staticmethod(topk_divergence_forward)
    backward = staticmethod(topk_distill_backward)


def topk_distill(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, k: int = 100, tail: bool = True,
                 alpha: float = 0.5, chunk_rows: int = 1024) -> Tensor:
    """Triton `topk_distill`: fp32 loss [N] from student / teacher logits [N, V]; same contract as
    `selfdistill.ops.reference.topk_distill` (`chunk_rows` accepted for interchangeability: the
    kernels never upcast more than a tile)."""
    check_launchable("topk_distill", logits, teacher_logits)
    return topk_distill_host.topk_distill(TritonTopKDistillLaunchers, logits, teacher_logits, temperature, k, tail, alpha)


def fused_linear_topk_distill(
    hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, temperature: float = 1.0, k: int = 100,
    tail: bool = True, alpha: float = 0.5, chunk_rows: int = 1024,
) -> Tensor:
    """Triton `fused_linear_topk_distill`: fp32 loss [N] from student hidden [N, H] / LM head [V, H]
    (both get gradients) and teacher hidden [N, H_T] / LM head [V, H_T] (no gradient), without
    [N, V] logits; `chunk_rows` bounds the logits tile (`selfdistill.ops.topk_distill_host`)."""
    check_launchable("fused_linear_topk_distill", hidden, weight, teacher_hidden, teacher_weight)
    return topk_distill_host.fused_linear_topk_distill(TritonTopKDistillLaunchers, hidden, weight, teacher_hidden,
                                                       teacher_weight, temperature, k, tail, alpha, chunk_rows)
