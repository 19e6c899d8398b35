"""Host side of the fused token log-probs, shared by the Triton kernels (`kernels/token_logprobs.py`,
`kernels/fused_linear.py`) and the csrc extension (`selfdistill/ops/cuda_ext.py`): input checks,
chunking, the matmuls, autograd. Each backend supplies its token-logprob launchers
(`TokenLogprobLaunchers`), which `token_logprobs` runs on logits [N, V] and
`fused_linear_token_logprobs` on logits tiles it projects from hidden states.

`logits = hidden @ weight.T` never exists for all N rows at once (SPEC section 8).

Forward: rows in chunks of `chunk_rows`; one matmul writes a [chunk_rows, V] logits tile in the
input dtype, the backend's forward kernel consumes it, and only per-row floats survive (logp,
entropy and the backend's row statistics, e.g. the log-sum-exp as max and log-sum).

Backward: the tiles are recomputed (one extra matmul instead of keeping N x V logits), the
backend's backward kernel overwrites each tile in place with d(loss)/d(logits) (elementwise from
the saved row statistics), and the tile becomes dH = dlogits @ W and dW = dlogits.T @ H. One of
dH, dW must be summed over tiles, in an fp32 accumulator; the loop order picks the smaller one:

- N < V (the usual case: 16k tokens, 152k vocabulary): tiles are [N, cols] vocabulary slices
  (cols = chunk_rows * V / N, the forward's tile size); dW of a slice is one matmul over all rows,
  written straight into dW, and dH sums over slices in fp32 [N, H];
- N >= V: tiles are [chunk_rows, V] row chunks; dH of a chunk is one matmul, and dW sums over
  chunks in fp32 [V, H].

Memory besides inputs and returned gradients: one tile (chunk_rows * V in the input dtype) plus the
fp32 accumulator min(N, V) * H when the inputs are in low precision (fp32 inputs accumulate in the
returned gradient itself). At N=16384, V=151936, H=4096, bf16, chunk_rows=1024: 0.31 GB tile +
0.27 GB accumulator, against 10 GB for fp32 logits (and 2.5 GB for an fp32 dW accumulator).

An optional LM-head bias [V] is added by the tile's matmul (`addmm`); its gradient is the column
sum of d(loss)/d(logits), accumulated in fp32 over the tiles.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from selfdistill.ops.calls import backend_of, record

_FP32_ACCUMULATING_ADDMM: bool | None = None  # whether torch.addmm(..., out_dtype=float32) works here


def unit_column_stride(x: Tensor) -> Tensor:
    """`x` itself when its last dimension is contiguous (the kernels take row strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


class TokenLogprobLaunchers(Protocol):
    """A backend's token-logprob kernels on one logits tile [n, V] (any float dtype, contiguous rows).

    `forward` -> fp32 (logp [n], entropy [n], stats [n, S]): S floats per row for the backward.
    `backward` -> d(loss)/d(logits) [n, V] in the logits' dtype, written into `out` (which may be
    the logits tile itself) or, for out=None, a new tensor; the tile may be a vocabulary slice: `targets` are then shifted by the
    slice's first column (out-of-slice targets never match a column) and `stats` / `entropy` are
    those of the full rows."""

    def forward(self, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]: ...

    def backward(self, logits: Tensor, targets: Tensor, stats: Tensor, entropy: Tensor, dlogp: Tensor, dentropy: Tensor,
                 temperature: float, out: Tensor | None) -> Tensor: ...


def _fp32_accumulating_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(fp32 acc, low-precision a, b, out_dtype=float32)` works here: probed
    once on tiny tensors (the overload is CUDA-only and newer than torch 2.8), so a failure of the
    real call (out of memory, say) is never mistaken for a missing overload."""
    global _FP32_ACCUMULATING_ADDMM
    if _FP32_ACCUMULATING_ADDMM is None:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _FP32_ACCUMULATING_ADDMM = bool(torch.equal(acc, torch.full_like(acc, 3.0)))
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_ACCUMULATING_ADDMM = False
    return _FP32_ACCUMULATING_ADDMM


def addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, accumulating in fp32 even for bf16/fp16 a and b.

    On CUDA, torch's `addmm(out_dtype=float32)` lets cuBLAS add the low-precision product into the
    fp32 accumulator directly; where that overload is missing, the product is formed in the input
    dtype (fp32 accumulation inside the GEMM, one rounding per call) and added.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _fp32_accumulating_addmm(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """hidden @ weight.T (+ bias) written into `out`, in the inputs' dtype."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def forward(launchers: TokenLogprobLaunchers, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
            chunk_rows: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (logp [N], entropy [N], stats [N, S]) by row chunks."""
    N, V = hidden.shape[0], weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp)
    stats = None
    tile = torch.empty(min(chunk_rows, N), V, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        logits = _logits(hidden[start:stop], weight, bias, tile[: stop - start])
        lp, ent, st = launchers.forward(logits, targets[start:stop], temperature)
        if stats is None:
            stats = torch.empty(N, st.shape[1], dtype=torch.float32, device=hidden.device)
        logp[start:stop], entropy[start:stop], stats[start:stop] = lp, ent, st
    return logp, entropy, stats


def backward(launchers: TokenLogprobLaunchers, hidden: Tensor, weight: Tensor, targets: Tensor, stats: Tensor,
             entropy: Tensor, dlogp: Tensor, dentropy: Tensor, temperature: float, chunk_rows: int, need_hidden: bool,
             need_weight: bool, bias: Tensor | None = None,
             need_bias: bool = False) -> tuple[Tensor | None, Tensor | None] | tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(d hidden or None, d weight or None), in the inputs' dtypes (module docstring); with a `bias`,
    (d hidden, d weight, d bias or None)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dlogp, dentropy = dlogp.contiguous().float(), dentropy.contiguous().float()
    low_precision = hidden.dtype != torch.float32
    db_acc = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None and need_bias else None
    if N < V:  # vocabulary slices: dW direct, dH accumulated
        cols = max(1, min(V, chunk_rows * V // N))
        buf = torch.empty(N * cols, dtype=hidden.dtype, device=hidden.device)
        dweight = torch.empty_like(weight) if need_weight else None
        dh_acc = None
        if need_hidden:
            dh_acc = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            w = weight[v0:v1]
            logits = _logits(hidden, w, None if bias is None else bias[v0:v1], buf[: N * (v1 - v0)].view(N, v1 - v0))
            dlogits = launchers.backward(logits, targets - v0, stats, entropy, dlogp, dentropy, temperature, out=logits)
            if dweight is not None:
                torch.mm(dlogits.t(), hidden, out=dweight[v0:v1])
            if dh_acc is not None:
                addmm_fp32_(dh_acc, dlogits, w)
            if db_acc is not None:
                db_acc[v0:v1] = dlogits.float().sum(0)
        dhidden = None if dh_acc is None else (dh_acc.to(hidden.dtype) if low_precision else dh_acc)
        return _with_bias_grad(dhidden, dweight, bias, db_acc)
    # row chunks: dH direct, dW accumulated
    dhidden = torch.empty_like(hidden) if need_hidden else None
    dw_acc = torch.zeros(V, H, dtype=torch.float32, device=weight.device) if need_weight else None
    tile = torch.empty(min(chunk_rows, N), V, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        h = hidden[start:stop]
        logits = _logits(h, weight, bias, tile[: stop - start])
        dlogits = launchers.backward(logits, targets[start:stop], stats[start:stop], entropy[start:stop],
                                     dlogp[start:stop], dentropy[start:stop], temperature, out=logits)
        if dhidden is not None:
            torch.mm(dlogits, weight, out=dhidden[start:stop])
        if dw_acc is not None:
            addmm_fp32_(dw_acc, dlogits.t(), h)
        if db_acc is not None:
            db_acc += dlogits.float().sum(0)
    dweight = None if dw_acc is None else (dw_acc.to(weight.dtype) if low_precision else dw_acc)
    return _with_bias_grad(dhidden, dweight, bias, db_acc)


def _with_bias_grad(dhidden, dweight, bias, db_acc):
    """(dhidden, dweight) without a bias (the callers that never pass one), else with d bias."""
    if bias is None:
        return dhidden, dweight
    return dhidden, dweight, None if db_acc is None else db_acc.to(bias.dtype)


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launchers, logits, targets, temperature):
        logp, entropy, stats = launchers.forward(logits, targets, temperature)
        ctx.save_for_backward(logits, targets, stats, entropy)
        ctx.launchers, ctx.temperature = launchers, temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        logits, targets, stats, entropy = ctx.saved_tensors  # unused outputs get zero grads (materialised)
        dlogits = ctx.launchers.backward(logits, targets, stats, entropy, dlogp.contiguous().float(),
                                         dentropy.contiguous().float(), ctx.temperature, out=None)
        return None, dlogits, None, None


def token_logprobs(launchers: TokenLogprobLaunchers, logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """fp32 (logp [N], entropy [N]) of `logits` [N, V] at `temperature` through `launchers`; the
    contract of `selfdistill.ops.reference.token_logprobs`, differentiable w.r.t. the logits."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs expects logits [N, V] and targets [N]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature!r}")
    record("token_logprobs", backend_of(launchers))
    return _TokenLogprobsFunction.apply(launchers, unit_column_stride(logits), targets.long().contiguous(), float(temperature))


class _FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launchers, hidden, weight, bias, targets, temperature, chunk_rows):
        logp, entropy, stats = forward(launchers, hidden, weight, targets, temperature, chunk_rows, bias)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy)
        ctx.launchers, ctx.temperature, ctx.chunk_rows = launchers, temperature, chunk_rows
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        hidden, weight, bias, targets, stats, entropy = ctx.saved_tensors  # unused outputs get zero grads (materialised)
        grads = backward(
            ctx.launchers, hidden, weight, targets, stats, entropy, dlogp, dentropy, ctx.temperature, ctx.chunk_rows,
            need_hidden=ctx.needs_input_grad[1], need_weight=ctx.needs_input_grad[2], bias=bias,
            need_bias=ctx.needs_input_grad[3],
        )
        dhidden, dweight, dbias = grads if bias is not None else (*grads, None)
        return None, dhidden, dweight, dbias, None, None, None


def check_fused_linear_inputs(op: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """hidden [N, H] and the LM head weight [V, H] (one dtype), bias None or [V] in that dtype."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op} expects hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one so the matmul has one dtype")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"{op}: bias must be [V={weight.shape[0]}] in the weight's dtype {weight.dtype}; got "
                         f"{tuple(bias.shape)} {bias.dtype}")


def fused_linear_token_logprobs(launchers: TokenLogprobLaunchers, hidden: Tensor, weight: Tensor, targets: Tensor,
                                temperature: float, chunk_rows: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, targets)` without [N, V] logits: hidden [N, H], weight
    [V, H] (same dtype), bias None or [V], targets [N] -> fp32 (logp [N], entropy [N]),
    differentiable w.r.t. hidden, weight and bias. `chunk_rows` bounds the logits tile (module docstring)."""
    check_fused_linear_inputs("fused_linear_token_logprobs", hidden, weight, bias)
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_token_logprobs: targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"fused_linear_token_logprobs: chunk_rows must be >= 1, got {chunk_rows}")
    if not temperature > 0:
        raise ValueError(f"fused_linear_token_logprobs: temperature must be > 0, got {temperature!r}")
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    record("fused_linear_token_logprobs", backend_of(launchers))
    return _FusedLinearFunction.apply(launchers, hidden.contiguous(), weight.contiguous(),
                                      None if bias is None else bias.contiguous(), targets.long().contiguous(),
                                      float(temperature), int(chunk_rows))
