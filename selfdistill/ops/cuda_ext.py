"""The `cuda` backend of `selfdistill.ops`: the C++/CUDA extension in `csrc/`, built on first use.

`torch.utils.cpp_extension.load` compiles the `.cpp` files of `csrc/` (CPU paths) and, where torch
sees a GPU, the `_cuda.cu` kernels (with `-DWITH_CUDA`) into the torch extensions cache
(`TORCH_EXTENSIONS_DIR`); later runs reuse the build. It needs a C++ compiler and ninja (the `dev`
extra installs ninja), plus nvcc for the CUDA path.

Ops provided (every op of `selfdistill.ops`): `token_logprobs` and, through it,
`fused_linear_token_logprobs` (the host side `selfdistill.ops.logprob_host`, shared with the
Triton kernels: logits never exist for all rows); `policy_loss` (the csrc row pass under the host side shared
with the Triton kernel, `selfdistill.ops.row_pass_loss`); `gold_decoy_contrast` (from hidden states:
the csrc first-position kernel and these token-logprob kernels), `clipped_mean_min` and
`belief_shift` (csrc launchers under `selfdistill.ops.contrast_host`, shared likewise).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

import torch
from torch import Tensor

from selfdistill.ops import contrast_host, logprob_host
from selfdistill.ops.contrast_reference import MIN_WEIGHT, REWARD_CLIP, SHIFT_CLIP, Contrast
from selfdistill.ops.reference import RAMP_W0, RAMP_W1
from selfdistill.ops.row_pass_loss import KL_ESTIMATORS, fused_policy_loss


log = logging.getLogger(__name__)


def _csrc_dir() -> str:
    """`csrc/` as installed (the package `selfdistill.csrc`: sources as package data)."""
    from importlib.resources import files

    return str(files("selfdistill.csrc"))


PROVIDED = ("token_logprobs", "fused_linear_token_logprobs", "policy_loss", "gold_decoy_contrast", "clipped_mean_min",
            "belief_shift")


def sources(with_cuda: bool) -> list[str]:
    names = ["bindings.cpp", "token_logprobs.cpp", "policy_loss.cpp", "contrast.cpp", "fused_layers.cpp", "decode_step.cpp"]
    names += ["token_logprobs_cuda.cu", "policy_loss_cuda.cu", "contrast_cuda.cu"] if with_cuda else []
    return [os.path.join(_csrc_dir(), n) for n in names]


def _host_simd_flags() -> list[str]:
    """-mavx2 -mfma where this machine has them (the CPU kernels' loops vectorise 8-wide): the build
    is for the machine it runs on, and its name carries the flags (a shared extensions cache serves
    each kind of machine its own build). With -ffp-contract=off: no fused multiply-adds (a product
    is rounded as torch rounds it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module (built once per process, cached on disk across processes)."""
    with_cuda = torch.cuda.is_available()
    missing = [p for p in sources(with_cuda) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"ops.backend=cuda: extension sources {missing} are not installed; reinstall selfdistill")
    from torch.utils.cpp_extension import load

    # torch rebuilds when a listed source changes, not a header: name the build by every file's content
    digest = hashlib.sha1()
    for name in sorted(os.listdir(_csrc_dir())):
        if name.endswith((".cpp", ".cu", ".h", ".cuh")):
            with open(os.path.join(_csrc_dir(), name), "rb") as f:
                digest.update(name.encode() + f.read())
    simd = _host_simd_flags()
    log.info("loading the csrc extension (the first use builds it: about 2 minutes on 2 cores, then cached in "
             "TORCH_EXTENSIONS_DIR)")
    return load(
        name=f"selfdistill_csrc_{'cuda' if with_cuda else 'cpu'}{'_avx2' if simd else ''}_{digest.hexdigest()[:10]}",
        sources=sources(with_cuda),
        # OpenMP: at::parallel_for in the CPU kernels, on torch's own libgomp (already loaded; same soname)
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *simd] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_ldflags=["-lgomp"],
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"] if with_cuda else None,
        verbose=False,
    )


class _CsrcTokenLogprobLaunchers:
    """The csrc kernels as `selfdistill.ops.logprob_host` launchers (stats [n, 2] = (max z, log d))."""

    @staticmethod
    def forward(logits, targets, temperature):
        return extension().token_logprobs_forward(logits, targets, 1.0 / temperature)

    @staticmethod
    def backward(logits, targets, stats, entropy, dlogp, dentropy, temperature, out):
        return extension().token_logprobs_backward(logits, targets, stats, entropy, dlogp, dentropy, 1.0 / temperature, out)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Same contract as `selfdistill.ops.reference.token_logprobs`: fp32 (logp [N], entropy [N])."""
    return logprob_host.token_logprobs(_CsrcTokenLogprobLaunchers, logits, targets, temperature)


def fused_linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                                chunk_rows: int = 1024, *, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, targets)` without [N, V] logits: the chunked host side
    of `selfdistill.ops.logprob_host` (shared with the Triton kernels) over the csrc kernels."""
    return logprob_host.fused_linear_token_logprobs(_CsrcTokenLogprobLaunchers, hidden, weight, targets, temperature,
                                                    chunk_rows, bias)


def _row_pass(logp, old_logp, advantages, loss_mask, lengths, ref_logp, entropy, *, loss_type, clip_low, clip_high,
              dual_clip, kl_coef, kl_estimator, entropy_coef, token_weighting, max_len_norm, need_entropy_grad):
    """The csrc row pass for `selfdistill.ops.row_pass_loss` (fp32 inputs, uint8 mask)."""
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    none = logp.new_zeros(0, dtype=torch.float32)
    coef, coef_ent, rows = extension().policy_loss_row_pass(
        f32(logp), f32(old_logp), f32(advantages), (loss_mask != 0).to(torch.uint8).contiguous(), lengths.long().contiguous(),
        f32(ref_logp) if ref_logp is not None else none, f32(entropy) if entropy is not None else none,
        1.0 - clip_low, 1.0 + clip_high, float(dual_clip or 0.0), kl_coef, entropy_coef, RAMP_W0, RAMP_W1,
        KL_ESTIMATORS[kl_estimator], token_weighting == "ramp", loss_type == "gspo", dual_clip is not None, need_entropy_grad,
    )
    return coef, (coef_ent if coef_ent.numel() == coef.numel() and coef.numel() else None), rows


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, loss_mask: Tensor, lengths: Tensor, *,
    ref_logp: Tensor | None = None, entropy: Tensor | None = None, loss_type: str = "grpo", clip_low: float = 0.2,
    clip_high: float = 0.28, dual_clip: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
    entropy_coef: float = 0.001, token_weighting: str = "uniform", max_len_norm: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Same signature and semantics as `selfdistill.ops.reference.policy_loss` (gradients to logp and
    entropy only)."""
    return fused_policy_loss(
        _row_pass, logp, old_logp, advantages, loss_mask, lengths, ref_logp=ref_logp, entropy=entropy, loss_type=loss_type,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, token_weighting=token_weighting, max_len_norm=max_len_norm,
    )


class _CsrcContrastLaunchers:
    """The csrc launchers `selfdistill.ops.contrast_host` drives; no bias = an empty tensor."""

    token_logprobs = _CsrcTokenLogprobLaunchers

    @staticmethod
    def first_position(hidden, weight, bias, gold_ids, decoy_ids, temperature):
        b = hidden.new_empty(0) if bias is None else bias
        return extension().first_position_contrast_forward(hidden, weight, b, gold_ids, decoy_ids, 1.0 / temperature)


def gold_decoy_contrast(
    gold_hidden: Tensor, decoy_hidden: Tensor | None, weight: Tensor, bias: Tensor | None, gold_ids: Tensor,
    decoy_ids: Tensor, divergent: Tensor, temperature: float = 1.0,
) -> Contrast:
    """Same contract as `selfdistill.ops.contrast_reference.gold_decoy_contrast`: from the scorer's
    hidden states, fp32 contrast [R, K] and float64 belief [R]."""
    return contrast_host.gold_decoy_contrast(_CsrcContrastLaunchers, gold_hidden, decoy_hidden, weight, bias, gold_ids,
                                             decoy_ids, divergent, temperature)


def _clipped_mean_min_forward(values: Tensor, mask: Tensor, minus: Tensor | None, clip: float, min_weight: float) -> Tensor:
    empty = values.new_empty(0)
    return extension().clipped_mean_min_forward(values, (mask != 0).to(torch.uint8), empty if minus is None else minus, clip,
                                                min_weight)


def clipped_mean_min(values: Tensor, mask: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT,
                     minus: Tensor | None = None) -> Tensor:
    """Same contract as `selfdistill.ops.contrast_reference.clipped_mean_min` (float64; differentiable
    w.r.t. `values` and `minus`)."""
    return contrast_host.clipped_mean_min(_clipped_mean_min_forward, values, mask, clip, min_weight, minus)


def _belief_shift_forward(belief_open: Tensor, belief_close: Tensor, clip: float, eps: float) -> tuple[Tensor, Tensor]:
    return extension().belief_shift_forward(belief_open, belief_close, clip, eps)


def belief_shift(belief_open: Tensor, belief_close: Tensor, clip: float = SHIFT_CLIP, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Same contract as `selfdistill.ops.contrast_reference.belief_shift`: PMI-shift's float64
    clip(close - open) [R] and flip int8 [R]."""
    return contrast_host.belief_shift(_belief_shift_forward, belief_open, belief_close, clip, eps)
