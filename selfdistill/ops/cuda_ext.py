"""The `cuda` backend of `selfdistill.ops`: the C++/CUDA extension in `csrc/`, built on first use.

`torch.utils.cpp_extension.load` compiles `csrc/token_logprobs.cpp` (CPU path) and, where torch
sees a GPU, `csrc/token_logprobs_cuda.cu` (with `-DWITH_CUDA`) into the torch extensions cache
(`TORCH_EXTENSIONS_DIR`); later runs reuse the build. It needs a C++ compiler and ninja (the `dev`
extra installs ninja), plus nvcc for the CUDA path.

Ops provided: `token_logprobs` and, through it, `fused_linear_token_logprobs` (the projection is
done by chunks of rows with the LM head in the input dtype, then the fused kernel). The other ops
raise NotImplementedError under `ops.backend=cuda`; use `triton` or `torch` for them.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor



def _csrc_dir() -> str:
    """`csrc/` as installed (the package `selfdistill.csrc`: sources as package data)."""
    from importlib.resources import files

    return str(files("selfdistill.csrc"))


PROVIDED = ("token_logprobs", "fused_linear_token_logprobs")


def sources(with_cuda: bool) -> list[str]:
    names = ["token_logprobs.cpp"] + (["token_logprobs_cuda.cu"] if with_cuda else [])
    return [os.path.join(_csrc_dir(), n) for n in names]


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module (built once per process, cached on disk across processes)."""
    missing = [p for p in sources(torch.cuda.is_available()) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"ops.backend=cuda: extension sources {missing} are not installed; reinstall selfdistill")
    from torch.utils.cpp_extension import load

    with_cuda = torch.cuda.is_available()
    return load(
        name="selfdistill_csrc" + ("_cuda" if with_cuda else "_cpu"),
        sources=sources(with_cuda),
        extra_cflags=["-O3"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"] if with_cuda else None,
        verbose=False,
    )


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        logp, entropy, stats = extension().token_logprobs_forward(logits, targets, 1.0 / temperature)
        ctx.save_for_backward(logits, targets, stats, entropy)
        ctx.inv_t = 1.0 / temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        logits, targets, stats, entropy = ctx.saved_tensors
        dlogp = torch.zeros_like(entropy) if dlogp is None else dlogp
        dentropy = torch.zeros_like(entropy) if dentropy is None else dentropy
        dlogits = extension().token_logprobs_backward(logits, targets, stats, entropy, dlogp, dentropy, ctx.inv_t)
        return dlogits, None, None


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Same contract as `selfdistill.ops.reference.token_logprobs`: fp32 (logp [N], entropy [N])."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs expects logits [N, V] and targets [N]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature={temperature} must be > 0")
    return TokenLogprobsFunction.apply(logits, targets.long(), float(temperature))


def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                                chunk_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """`token_logprobs(hidden @ weight.T, targets)` by chunks of rows: [chunk_rows, V] logits in the
    input dtype exist one chunk at a time (autograd keeps each chunk's logits for the backward)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_token_logprobs expects hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    parts = [token_logprobs(hidden[s:s + chunk_rows] @ weight.t(), targets[s:s + chunk_rows], temperature)
             for s in range(0, hidden.shape[0], chunk_rows)]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
