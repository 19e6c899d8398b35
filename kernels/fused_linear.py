"""Log-prob and entropy straight from hidden states and the LM head (SPEC section 8).

`logits = hidden @ weight.T` is never materialised for all N rows. Rows are processed in chunks
of `chunk_rows`: one matmul produces a [chunk_rows, V] logits tile in the input dtype, the
token-logprob kernel consumes it, and only (logp, entropy, lse) survive. The backward recomputes
each chunk's logits (one extra matmul instead of keeping N x V logits alive), overwrites them in
place with d(loss)/d(logits) via the same backward kernel, and turns them into
dH = dlogits @ W and dW += dlogits.T @ H (dW accumulated in fp32).

Memory besides inputs and returned gradients: chunk_rows * V (input dtype) for the tile, 4 N fp32
for the saved row statistics (logp, entropy, row max, log sum), and V * H fp32 for the dW accumulator when the weight is in low
precision: O(N * H + V * H) for a fixed chunk, never O(N * V). At N=16384, V=151936, H=4096 bf16
with chunk_rows=1024 the tile is 0.31 GB against 10 GB for fp32 logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.kernels.token_logprobs import token_logprobs_backward, token_logprobs_forward
from selfdistill.kernels.utils import check_launchable, check_temperature

_FP32_ACCUMULATING_ADDMM: bool | None = None  # whether torch.addmm(..., out_dtype=float32) works here


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, accumulating in fp32 even for bf16/fp16 a and b.

    On CUDA, torch>=2.8's `addmm(out_dtype=float32)` lets cuBLAS add the low-precision product
    into the fp32 accumulator directly; where that overload is missing, the product is formed in
    the input dtype (fp32 accumulation inside the GEMM, one rounding) and added.
    """
    global _FP32_ACCUMULATING_ADDMM
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _FP32_ACCUMULATING_ADDMM is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_ACCUMULATING_ADDMM = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_ACCUMULATING_ADDMM = False
    acc.add_(a @ b)


def fused_linear_token_logprobs_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    N = hidden.shape[0]
    V = weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp)
    lse_parts = torch.empty(2, N, dtype=torch.float32, device=hidden.device)
    tile = torch.empty(min(chunk_rows, N), V, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        logits = torch.mm(hidden[start:stop], weight.t(), out=tile[: stop - start])
        lp, ent, parts = token_logprobs_forward(logits, targets[start:stop], temperature)
        logp[start:stop], entropy[start:stop], lse_parts[:, start:stop] = lp, ent, parts
    return logp, entropy, lse_parts


def fused_linear_token_logprobs_backward(
    hidden: Tensor, weight: Tensor, targets: Tensor, lse_parts: Tensor, entropy: Tensor, dlogp: Tensor, dentropy: Tensor,
    temperature: float, chunk_rows: int, need_hidden: bool, need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    N, H = hidden.shape
    V = weight.shape[0]
    dhidden = torch.empty_like(hidden) if need_hidden else None
    dweight = torch.zeros(V, H, dtype=torch.float32, device=weight.device) if need_weight else None
    tile = torch.empty(min(chunk_rows, N), V, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        h = hidden[start:stop]
        logits = torch.mm(h, weight.t(), out=tile[: stop - start])
        dlogits = token_logprobs_backward(
            logits, targets[start:stop], lse_parts[:, start:stop], entropy[start:stop],
            dlogp[start:stop], dentropy[start:stop], temperature, out=logits,
        )
        if dhidden is not None:
            torch.mm(dlogits, weight, out=dhidden[start:stop])
        if dweight is not None:
            _addmm_fp32_(dweight, dlogits.t(), h)
    if dweight is not None and dweight.dtype != weight.dtype:
        dweight = dweight.to(weight.dtype)
    return dhidden, dweight


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_rows: int):
        logp, entropy, lse_parts = fused_linear_token_logprobs_forward(hidden, weight, targets, temperature, chunk_rows)
        ctx.save_for_backward(hidden, weight, targets, lse_parts, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp: Tensor, dentropy: Tensor):
        hidden, weight, targets, lse_parts, entropy = ctx.saved_tensors
        dhidden, dweight = fused_linear_token_logprobs_backward(
            hidden, weight, targets, lse_parts, entropy, dlogp, dentropy, ctx.temperature, ctx.chunk_rows,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
        )
        return dhidden, dweight, None, None, None


def fused_linear_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, chunk_rows: int = 1024
) -> tuple[Tensor, Tensor]:
    """Triton `fused_linear_token_logprobs`: `token_logprobs(hidden @ weight.T, targets)` without [N, V].

    hidden [N, H], weight [V, H] (same dtype), targets [N]; returns fp32 (logp [N], entropy [N]),
    differentiable w.r.t. hidden and weight. `chunk_rows` bounds the logits tile (module docstring).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_token_logprobs expects hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_token_logprobs: targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_token_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one so the matmul has one dtype")
    if chunk_rows < 1:
        raise ValueError(f"fused_linear_token_logprobs: chunk_rows must be >= 1, got {chunk_rows}")
    check_temperature("fused_linear_token_logprobs", temperature)
    check_launchable("fused_linear_token_logprobs", hidden, weight, targets)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return FusedLinearTokenLogprobsFunction.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(), float(temperature), int(chunk_rows))
