"""Backend dispatch for the fused ops: one signature, three implementations.

`set_backend("torch" | "triton" | "cuda" | "auto")` picks the implementation used by the trainer;
`auto` means Triton on CUDA tensors and the torch reference on CPU. An explicit `triton` on CPU
runs through the Triton interpreter (set TRITON_INTERPRET=1 before `selfdistill.kernels` is first
imported; slow, for tests). `cuda` is the csrc extension (selfdistill.ops.cuda_ext, built on first
use; a CPU path too); it provides every op but the top-K distillation (NotImplementedError naming
ops.backend=triton or torch).
The torch references are importable here under the same names as in `selfdistill.kernels`.
`call_counts()` says which backend's implementation of each op ran (`selfdistill.ops.calls`).
The scorer's contrast family (`gold_decoy_contrast` from hidden states, `clipped_mean_min`,
`gold_decoy_did`, `belief_shift`) has its references in `selfdistill.ops.contrast_reference`.
"""

from __future__ import annotations

import functools
import logging

from torch import Tensor

from selfdistill.ops import contrast_reference, reference
from selfdistill.ops.calls import call_counts, record, reset_call_counts  # noqa: F401  (call_counts, reset: public API)
from selfdistill.ops.contrast_reference import (  # noqa: F401  (public API: the torch references)
    MIN_WEIGHT,
    REWARD_CLIP,
    SHIFT_CLIP,
    Contrast,
    belief_shift,
    clipped_mean_min,
    gold_decoy_contrast,
    gold_decoy_did,
)
from selfdistill.ops.reference import (  # noqa: F401  (public API: the torch references)
    fused_linear_token_logprobs,
    fused_linear_topk_distill,
    kl_penalty,
    policy_loss,
    progressive_token_weights,
    token_logprobs,
    topk_distill,
    topk_divergence,
)

_BACKEND = "auto"
_VALID = ("auto", "torch", "triton", "cuda")
log = logging.getLogger(__name__)
_AUTO_LOGGED: set[str] = set()  # device types whose `auto` resolution has been logged


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in _VALID:
        raise ValueError(f"ops.backend={name!r} is not valid; choose one of {', '.join(_VALID)}")
    _BACKEND = name
    _triton_unusable.cache_clear()
    _AUTO_LOGGED.clear()


def get_backend() -> str:
    return _BACKEND


def resolve(device_type: str) -> str:
    """The implementation `auto` resolves to for tensors on `device_type`; logged once per device
    type (a warning when CUDA tensors fall back to torch, naming why)."""
    if _BACKEND != "auto":
        return _BACKEND
    unusable = _triton_unusable() if device_type == "cuda" else None
    backend = "triton" if device_type == "cuda" and unusable is None else "torch"
    if device_type not in _AUTO_LOGGED:
        _AUTO_LOGGED.add(device_type)
        if unusable is not None:
            log.warning("ops.backend=auto resolved to torch for cuda tensors: %s. The fused kernels are not used; "
                        "set ops.backend=cuda for the csrc extension's", unusable)
        else:
            log.info("ops.backend=auto resolved to %s for %s tensors", backend, device_type)
    return backend


@functools.lru_cache(maxsize=None)
def _triton_unusable() -> str | None:
    """Why the Triton kernels cannot run on CUDA tensors in this process (not importable, or the
    interpreter, which takes CPU tensors only), or None; probed once per `set_backend`."""
    try:
        import selfdistill.kernels as kernels
    except ImportError as e:
        return f"selfdistill.kernels is not importable ({type(e).__name__}: {e})"
    return "TRITON_INTERPRET=1 was set when selfdistill.kernels was imported" if kernels.INTERPRETED else None


def _impl(name: str, device_type: str):
    backend = resolve(device_type)
    if backend == "cuda":  # the csrc extension (CPU path too, for tests)
        from selfdistill.ops import cuda_ext

        if name in cuda_ext.PROVIDED:
            return getattr(cuda_ext, name)
        raise NotImplementedError(f"ops.backend=cuda: the csrc extension has no {name!r} yet "
                                  f"(it provides {', '.join(cuda_ext.PROVIDED)}); use ops.backend=triton or torch")
    if backend == "triton":
        import selfdistill.kernels as kernels

        fn = getattr(kernels, name, None)
        if fn is not None:
            return fn
        raise NotImplementedError(f"ops.backend=triton has no kernel for {name!r} yet; use ops.backend=torch")
    reference_fn = getattr(reference, name, None) or getattr(contrast_reference, name)

    def torch_reference(*args, **kwargs):
        record(name, "torch")
        return reference_fn(*args, **kwargs)

    return torch_reference


def sequence_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, *,
                            bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatched fused-linear log-probs: hidden [N, H], LM head weight [V, H] and bias [V] or None,
    targets [N] -> fp32 (logp [N], entropy [N])."""
    return _impl("fused_linear_token_logprobs", hidden.device.type)(hidden, weight, targets, temperature, bias=bias)


def dispatched_token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Dispatched `token_logprobs`: logits [N, V], targets [N] -> fp32 (logp, entropy)."""
    return _impl("token_logprobs", logits.device.type)(logits, targets, temperature)


def dispatched_policy_loss(*args, **kwargs):
    """Dispatched `policy_loss` (same signature as `reference.policy_loss`)."""
    return _impl("policy_loss", args[0].device.type)(*args, **kwargs)


def dispatched_gold_decoy_contrast(
    gold_hidden: Tensor, decoy_hidden: Tensor | None, weight: Tensor, bias: Tensor | None, gold_ids: Tensor,
    decoy_ids: Tensor, divergent: Tensor, temperature: float = 1.0,
) -> Contrast:
    """Dispatched `gold_decoy_contrast` from the scorer's hidden states at the answer positions
    [R, K, H] and its LM head -> (contrast fp32 [R, K], belief float64 [R]); the first divergent
    position of a row is one dot product with W[gold] - W[decoy] (SPEC section 1)."""
    return _impl("gold_decoy_contrast", gold_hidden.device.type)(gold_hidden, decoy_hidden, weight, bias, gold_ids, decoy_ids,
                                                                 divergent, temperature)


def dispatched_clipped_mean_min(values: Tensor, mask: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT,
                                minus: Tensor | None = None) -> Tensor:
    """Dispatched `clipped_mean_min` over x = values - minus: float64 [R] (PMI's aggregations, gm's reduction)."""
    return _impl("clipped_mean_min", values.device.type)(values, mask, clip, min_weight, minus)


def dispatched_gold_decoy_did(
    contrast_meta: Tensor, contrast_placebo: Tensor, divergent: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT,
) -> Tensor:
    """Dispatched `gold_decoy_did`: gm's x (float64 [R]) from the contrasts after X + M and X + placebo,
    the difference taken inside the row reduction."""
    return dispatched_clipped_mean_min(contrast_meta, divergent, clip, min_weight, minus=contrast_placebo)


def dispatched_belief_shift(belief_open: Tensor, belief_close: Tensor, clip: float = SHIFT_CLIP,
                            eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Dispatched `belief_shift`: PMI-shift's (clip(close - open) float64 [R], flip int8 [R])."""
    return _impl("belief_shift", belief_open.device.type)(belief_open, belief_close, clip, eps)


def sequence_topk_distill(
    hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, temperature: float = 1.0, k: int = 100,
    tail: bool = True, alpha: float = 0.5,
) -> Tensor:
    """Dispatched fused-linear top-K distillation (SPEC section 6): student hidden [N, H] and LM head
    [V, H] (both get gradients), teacher hidden [N, H_T] and LM head [V, H_T] (no gradient; may be
    the student's weight) -> fp32 loss [N] per position; the caller aggregates over its masks.
    No [N, V] logits: one row-chunk tile in the input dtype (`selfdistill.ops.topk_distill_host`)."""
    return _impl("fused_linear_topk_distill", hidden.device.type)(hidden, weight, teacher_hidden, teacher_weight, temperature, k,
                                                                  tail, alpha)


def dispatched_topk_distill(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, k: int = 100, tail: bool = True,
                            alpha: float = 0.5) -> Tensor:
    """Dispatched `topk_distill`: student / teacher logits [N, V] -> fp32 loss [N], grad to the student's logits."""
    return _impl("topk_distill", logits.device.type)(logits, teacher_logits, temperature, k, tail, alpha)
