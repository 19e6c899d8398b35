"""Host side of the fused top-K distillation (SPEC sections 6 and 8): input checks, the chunked
forward, autograd. A backend supplies its launchers (`TopKDistillLaunchers`); the Triton ones are
in `kernels/topk_distill.py`. The formula is `selfdistill.ops.reference.topk_distill`.

Forward, per chunk of `chunk_rows` rows: one matmul writes the student's logits tile [chunk_rows,
V] in the input dtype; `torch.topk` picks the student's K indices from it (a constant of the
loss); the backend's vocabulary pass gives the student's full-row log-sum-exp (as row max and log
sum) and log-probs at the K indices; the same tile buffer then takes the teacher's logits for its
log-probs at the same indices. Per row only K + 2 floats and K indices survive. One backend call
over all rows then gives the divergence [N] and its gradient w.r.t. the K student log-probs [N, K].

Backward: `selfdistill.ops.logprob_host.backward` (the tiles recomputed, vocabulary slices when
N < V, row chunks otherwise) with the backend's multi-target backward, which writes

    d loss / d z_j = (g_j - (sum_k g_k) p_j) / T,   g_j = upstream * d div / d logp_j at the K indices, 0 elsewhere

into each tile; its entropy arguments are unused (zeros). A position whose upstream gradient is 0
(masked out by the caller) contributes exactly 0, even where its divergence is infinite.

Memory besides inputs and returned gradients: one [chunk_rows, V] tile in the input dtype (two
when the teacher's dtype differs), N x K int64 indices and about 3 N x K fp32; in the backward the
logprob_host tile plus its fp32 accumulator of min(N, V) x H for bf16/fp16 inputs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from selfdistill.ops.calls import backend_of, record
from selfdistill.ops import logprob_host
from selfdistill.ops.logprob_host import unit_column_stride
from selfdistill.ops.reference import check_fused_linear_topk, check_topk_distill_args, check_topk_logits


class TopKDistillLaunchers(Protocol):
    """A backend's three top-K distillation kernels.

    `logprobs_at(logits [n, V], idx [n, K], temperature)` -> fp32 (log p at idx [n, K], stats [n, 2]
    = the full rows' log-sum-exp parts). `divergence(logp_s [N, K], logp_t [N, K], tail, alpha)` ->
    fp32 (loss [N], d loss / d logp_s [N, K]). `backward` is a `logprob_host.TokenLogprobLaunchers`
    backward whose targets are the [n, K] indices and dlogp their [n, K] gradients (entropy unused).
    """

    def logprobs_at(self, logits: Tensor, idx: Tensor, temperature: float) -> tuple[Tensor, Tensor]: ...

    def divergence(self, logp_s: Tensor, logp_t: Tensor, tail: bool, alpha: float) -> tuple[Tensor, Tensor]: ...

    def backward(self, logits: Tensor, targets: Tensor, stats: Tensor, entropy: Tensor, dlogp: Tensor, dentropy: Tensor,
                 temperature: float, out: Tensor | None) -> Tensor: ...


def _upstream(grad: Tensor, dloss: Tensor) -> Tensor:
    """d loss / d logp_s at the K indices for the upstream gradient `dloss` [N] (0 rows stay exactly 0)."""
    dloss = dloss.float().unsqueeze(1)
    return torch.where(dloss == 0, 0.0, grad * dloss)


class _TopKDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launchers, logits, teacher_logits, temperature, k, tail, alpha):
        idx = logits.topk(k, dim=-1, sorted=False).indices
        logp_s, stats = launchers.logprobs_at(logits, idx, temperature)
        logp_t, _ = launchers.logprobs_at(teacher_logits, idx, temperature)
        loss, grad = launchers.divergence(logp_s, logp_t, tail, alpha)
        ctx.save_for_backward(logits, idx, stats, grad)
        ctx.launchers, ctx.temperature = launchers, temperature
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, idx, stats, grad = ctx.saved_tensors
        unused = grad.new_zeros(grad.shape[0])
        dlogits = ctx.launchers.backward(logits, idx, stats, unused, _upstream(grad, dloss), unused, ctx.temperature, out=None)
        return None, dlogits, None, None, None, None, None


def topk_distill(launchers: TopKDistillLaunchers, logits: Tensor, teacher_logits: Tensor, temperature: float, k: int,
                 tail: bool, alpha: float) -> Tensor:
    """fp32 loss [N] of student / teacher logits [N, V] through `launchers`; the contract of
    `selfdistill.ops.reference.topk_distill`, differentiable w.r.t. the student's logits."""
    check_topk_logits("topk_distill", logits, teacher_logits)
    check_topk_distill_args("topk_distill", logits.shape[1], k, temperature, alpha, chunk_rows=1)
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    record("topk_distill", backend_of(launchers))
    return _TopKDistillFunction.apply(launchers, unit_column_stride(logits), unit_column_stride(teacher_logits.detach()),
                                      float(temperature), int(k), bool(tail), float(alpha))


def forward(launchers: TopKDistillLaunchers, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
            temperature: float, k: int, tail: bool, alpha: float, chunk_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 (loss [N], grad [N, K] = d loss / d logp_s), idx [N, K] and stats [N, 2] by row chunks."""
    N, V = hidden.shape[0], weight.shape[0]
    idx = torch.empty(N, k, dtype=torch.long, device=hidden.device)
    logp_s = torch.empty(N, k, dtype=torch.float32, device=hidden.device)
    logp_t = torch.empty_like(logp_s)
    stats = torch.empty(N, 2, dtype=torch.float32, device=hidden.device)
    tile = torch.empty(min(chunk_rows, N), V, dtype=hidden.dtype, device=hidden.device)
    teacher_tile = tile if teacher_hidden.dtype == hidden.dtype else torch.empty_like(tile, dtype=teacher_hidden.dtype)
    for start in range(0, N, chunk_rows):
        stop = min(start + chunk_rows, N)
        logits = torch.mm(hidden[start:stop], weight.t(), out=tile[: stop - start])
        idx[start:stop] = logits.topk(k, dim=-1, sorted=False).indices
        logp_s[start:stop], stats[start:stop] = launchers.logprobs_at(logits, idx[start:stop], temperature)
        logits = torch.mm(teacher_hidden[start:stop], teacher_weight.t(), out=teacher_tile[: stop - start])
        logp_t[start:stop], _ = launchers.logprobs_at(logits, idx[start:stop], temperature)
    loss, grad = launchers.divergence(logp_s, logp_t, tail, alpha)
    return loss, grad, idx, stats


class _FusedLinearTopKDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launchers, hidden, weight, teacher_hidden, teacher_weight, temperature, k, tail, alpha, chunk_rows):
        loss, grad, idx, stats = forward(launchers, hidden, weight, teacher_hidden, teacher_weight, temperature, k, tail, alpha,
                                         chunk_rows)
        ctx.save_for_backward(hidden, weight, idx, stats, grad)
        ctx.launchers, ctx.temperature, ctx.chunk_rows = launchers, temperature, chunk_rows
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, weight, idx, stats, grad = ctx.saved_tensors
        unused = grad.new_zeros(grad.shape[0])
        dhidden, dweight = logprob_host.backward(
            ctx.launchers, hidden, weight, idx, stats, unused, _upstream(grad, dloss), unused, ctx.temperature, ctx.chunk_rows,
            need_hidden=ctx.needs_input_grad[1], need_weight=ctx.needs_input_grad[2],
        )
        return None, dhidden, dweight, None, None, None, None, None, None, None


def fused_linear_topk_distill(launchers: TopKDistillLaunchers, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor,
                              teacher_weight: Tensor, temperature: float, k: int, tail: bool, alpha: float,
                              chunk_rows: int) -> Tensor:
    """`topk_distill(hidden @ weight.T, teacher_hidden @ teacher_weight.T)` without [N, V] logits;
    the contract of `selfdistill.ops.reference.fused_linear_topk_distill` (module docstring)."""
    check_fused_linear_topk("fused_linear_topk_distill", hidden, weight, teacher_hidden, teacher_weight)
    check_topk_distill_args("fused_linear_topk_distill", weight.shape[0], k, temperature, alpha, chunk_rows)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    record("fused_linear_topk_distill", backend_of(launchers))
    return _FusedLinearTopKDistillFunction.apply(
        launchers, hidden.contiguous(), weight.contiguous(), teacher_hidden.detach().contiguous(),
        teacher_weight.detach().contiguous(), float(temperature), int(k), bool(tail), float(alpha), int(chunk_rows),
    )
