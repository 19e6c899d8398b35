"""Per-token log-prob and entropy from logits [N, V] (SPEC section 8).

One program per row walks the vocabulary in tiles with an online log-sum-exp in fp32, so the fp32
upcast of a row never exists beyond one tile. The forward keeps, per row, the running max `m`,
`s = sum_j exp(z_j - m)` and `a = sum_j exp(z_j - m) (z_j - m)`; then

    logp   = (z_target - m) - log s
    H      = log s - a / s            (= lse - E_p[z], without the cancellation of lse - sum p z)

with z = logits / temperature. It saves the log-sum-exp as its two parts, m and log s, and H (three
floats per row): log p_j = (z_j - m) - log s keeps the precision of log_softmax when |z| is large,
where z_j - (m + log s) would round at the scale of m. The backward recomputes p_j tile by tile
and writes

    dz_j = g_logp (1[j = target] - p_j) - g_H p_j (log p_j + H),     dlogits = dz / temperature

in the logits' dtype. Memory: O(N) floats besides the input and the gradient it must return.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfdistill.kernels.utils import check_launchable, num_warps_for, tile_max, tile_sum, vocab_block
from selfdistill.ops import logprob_host
from selfdistill.ops.logprob_host import unit_column_stride


@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr, stride_x, targets_ptr, logp_ptr, entropy_ptr, row_max_ptr, log_sum_ptr,
    V, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    target = tl.load(targets_ptr + row).to(tl.int64)

    m = float("-inf")
    s = 0.0
    a = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tile_max(z))
        # until the first finite logit (a leading tile of banned tokens) m_new = -inf: shift by 0
        # instead, so exp(-inf - -inf) never makes a NaN; s and a stay 0 there
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        e = tl.exp(z - ref)
        # -inf logits (padding of the tile, or a banned token) contribute p log p -> 0, not -inf * 0
        zc = tl.where(e > 0.0, z - ref, 0.0)
        # shifting the reference point from m to m_new: sum e'(z - m_new) = alpha (a + (m - m_new) s);
        # before the first finite logit s = 0 and m = -inf, where the product would be -inf * 0
        shift = (tl.where(s > 0.0, m, ref) - ref) * s
        a = alpha * (a + shift) + tile_sum(e * zc)
        s = alpha * s + tile_sum(e)
        m = m_new

    log_s = tl.log(s)
    valid = (target >= 0) & (target < V)
    z_t = tl.load(x_row + target, mask=valid, other=float("nan")).to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, (z_t - m) - log_s)
    tl.store(entropy_ptr + row, log_s - a / s)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)


@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr, stride_x, dx_ptr, stride_dx, targets_ptr, row_max_ptr, log_sum_ptr, entropy_ptr, dlogp_ptr, dentropy_ptr,
    V, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    """dx may alias x (the fused-linear path overwrites its logits chunk in place)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    target = tl.load(targets_ptr + row).to(tl.int64)
    row_max = tl.load(row_max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(dlogp_ptr + row)
    g_ent = tl.load(dentropy_ptr + row)

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(x_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        log_p = (z - row_max) - log_sum
        p = tl.exp(log_p)
        log_p = tl.where(p > 0.0, log_p, 0.0)  # p log p -> 0 for -inf logits, not 0 * -inf
        dz = -g_logp * p - g_ent * p * (log_p + entropy)
        dz = tl.where(cols == target, dz + g_logp, dz)
        tl.store(dx_row + cols, (dz * inv_temperature).to(dx_ptr.dtype.element_ty), mask=in_row)


def token_logprobs_forward(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel on logits [n, V]; returns fp32 (logp [n], entropy [n],
    lse_parts [2, n] = (row max, log sum))."""
    logits, targets = unit_column_stride(logits), targets.contiguous()
    n, V = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse_parts = torch.empty(2, n, dtype=torch.float32, device=logits.device)
    if n:
        block = vocab_block(V)
        _token_logprobs_fwd_kernel[(n,)](
            logits, logits.stride(0), targets, logp, entropy, lse_parts[0], lse_parts[1], V, 1.0 / temperature,
            BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return logp, entropy, lse_parts


def token_logprobs_backward(
    logits: Tensor, targets: Tensor, lse_parts: Tensor, entropy: Tensor, dlogp: Tensor, dentropy: Tensor,
    temperature: float, out: Tensor | None = None,
) -> Tensor:
    """Launch the backward kernel: d(loss)/d(logits) [n, V] in the logits' dtype, written into
    `out` (which may be `logits` itself: the fused-linear path overwrites its tile) or a new tensor."""
    logits, targets = unit_column_stride(logits), targets.contiguous()
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    n, V = logits.shape
    if n:
        block = vocab_block(V)
        _token_logprobs_bwd_kernel[(n,)](
            logits, logits.stride(0), out, out.stride(0), targets, lse_parts[0].contiguous(), lse_parts[1].contiguous(), entropy,
            dlogp.contiguous().float(), dentropy.contiguous().float(), V, 1.0 / temperature,
            BLOCK_V=block, num_warps=num_warps_for(block),
        )
    return out


class TritonLaunchers:
    """These kernels as `selfdistill.ops.logprob_host` launchers (stats [n, 2] = (row max, log sum))."""

    @staticmethod
    def forward(logits, targets, temperature):
        logp, entropy, lse_parts = token_logprobs_forward(logits, targets, temperature)
        return logp, entropy, lse_parts.t()

    @staticmethod
    def backward(logits, targets, stats, entropy, dlogp, dentropy, temperature, out):
        return token_logprobs_backward(logits, targets, stats.t(), entropy, dlogp, dentropy, temperature, out=out)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """Triton `token_logprobs`: fp32 (logp [N], entropy [N]) of `logits` [N, V] at `temperature`.

    Same contract as `selfdistill.ops.reference.token_logprobs`. `chunk_rows` is accepted so the
    two are interchangeable; the kernel needs no row chunking (it never upcasts more than a tile).
    A target outside [0, V) gives logp = NaN (fail closed) instead of an out-of-bounds read.
    """
    check_launchable("token_logprobs", logits, targets)
    return logprob_host.token_logprobs(TritonLaunchers, logits, targets, temperature)
