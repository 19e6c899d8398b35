"""Log-prob and entropy straight from hidden states and the LM head (SPEC section 8).

`logits = hidden @ weight.T` is never materialised for all N rows: the chunking, the matmuls and
autograd are `selfdistill.ops.logprob_host` (shared with the csrc extension); this module
supplies the Triton token-logprob kernels as its launchers. Their backward overwrites each
recomputed logits tile in place with d(loss)/d(logits). Memory besides inputs and returned
gradients: one [chunk_rows, V] tile in the input dtype and an fp32 accumulator of min(N, V) x H
(bf16 inputs): 0.58 GB at N=16384, V=151936, H=4096 with chunk_rows=1024.
"""

from __future__ import annotations

from torch import Tensor

from selfdistill.kernels.token_logprobs import TritonLaunchers
from selfdistill.kernels.utils import check_launchable
from selfdistill.ops import logprob_host


def fused_linear_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, chunk_rows: int = 1024, *,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton `fused_linear_token_logprobs`: `token_logprobs(hidden @ weight.T + bias, targets)` without [N, V].

    hidden [N, H], weight [V, H] (same dtype), optional bias [V], targets [N]; returns fp32 (logp [N],
    entropy [N]), differentiable w.r.t. hidden, weight and bias. `chunk_rows` bounds the logits tile.
    """
    check_launchable("fused_linear_token_logprobs", hidden, weight, targets, *(() if bias is None else (bias,)))
    return logprob_host.fused_linear_token_logprobs(TritonLaunchers, hidden, weight, targets, temperature, chunk_rows, bias)
