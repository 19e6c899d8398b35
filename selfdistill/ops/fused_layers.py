"""Fused CPU decoder layers (`ops.fused_layers`): the csrc kernels on the trainer's real path.

On a CPU, a small decoder's step is dominated by memory passes and dispatch, not by its matmuls:
autograd through HF's RMSNorm is ~6 elementwise passes forward and ~12 backward, the rotary
embedding a few more, each a trip through memory for the update's activations; a decode step is
~150 Python-dispatched ops. With `ops.fused_layers` on, a CPU model

- trains through `apply_fused_layers(model)`: the RMSNorm modules and the rotary embedding of
  Qwen3 / Qwen2 / Llama run the one-pass forward and backward kernels of `csrc/fused_layers.cpp`
  (autograd functions below); other modules, other architectures, tensors on another device and
  code traced by torch.compile keep HF's code. SwiGLU's product stays torch's: a one-pass kernel
  with a scalar exp measured slower than torch's vectorised silu followed by a multiply;
- decodes through `csrc/decode_step.cpp` (`selfdistill.rollout.direct_step.DirectDecoder`): one
  C++ call per decode step, the same math as the Python step.

Numerics (SPEC is silent; chosen here): HF's formulas in HF's precision (fp32 math for fp32 / bf16
inputs); RMSNorm's row sums of squares and its backward's row dot products in 8 partial fp32 sums
(vectorised), the weight gradient per thread in fp32 and across threads in float64; the rotary
forward is bitwise HF's in fp32. Results differ from autograd through HF's modules by float
rounding only (tests compare with an fp64 reference and with HF's modules).

Modes (`set_mode`, from `ops.fused_layers`): `auto` (default) uses the kernels when the csrc
extension builds (a C++ compiler and ninja; built once, ~2 minutes on 2 cores, then cached in
`TORCH_EXTENSIONS_DIR`), else HF's code with one warning; `on` requires them (an error names why
they are unavailable); `off` never uses them. CUDA models keep HF's modules (there, fused kernels
are Liger-Kernel's job). `call_counts()` of `selfdistill.ops` counts their calls under the backend
"fused_layers": `("rms_norm" | "rope" | "decode_step", "fused_layers")`.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from typing import Optional

import torch
from torch import Tensor

from selfdistill.ops.calls import record

MODES = ("auto", "on", "off")
_MODE = "auto"
_IN_PATCHED_ATTENTION = threading.local()  # .on: inside the forward of an attention module apply_fused_layers patched
log = logging.getLogger(__name__)


def set_mode(mode) -> None:
    global _MODE
    mode = {"true": "on", "false": "off"}.get(str(mode).lower(), str(mode).lower())  # YAML reads on/off as booleans
    if mode not in MODES:
        raise ValueError(f"ops.fused_layers={mode!r} is not valid; choose one of {', '.join(MODES)}")
    _MODE = mode


def get_mode() -> str:
    return _MODE


@functools.lru_cache(maxsize=None)
def _unavailable() -> Optional[str]:
    """Why the csrc extension cannot serve the fused layers (None when it can); builds it once."""
    try:
        from selfdistill.ops.cuda_ext import extension

        extension()
    except Exception as e:  # no compiler / ninja / headers: auto falls back to HF's code
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def enabled(device: torch.device | str) -> bool:
    """Whether the fused kernels serve tensors on `device` under the current mode."""
    if _MODE == "off" or torch.device(device).type != "cpu":
        return False
    reason = _unavailable()
    if reason is None:
        return True
    if _MODE == "on":
        raise RuntimeError(f"ops.fused_layers=on but the csrc extension is unavailable ({reason}); install a C++ "
                           "compiler and ninja, or set ops.fused_layers=auto/off")
    _warn_once(reason)
    return False


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("ops.fused_layers=auto: the csrc extension is unavailable (%s); CPU models keep HF's layers. "
                "It needs a C++ compiler and ninja (`pip install ninja`, or the dev extra); "
                "ops.fused_layers=off silences this", reason)


def _ext():
    from selfdistill.ops.cuda_ext import extension

    return extension()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = _ext().rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _ext().rms_norm_backward(dy, x, weight, rstd)
        return dx, dw, None


class RoPEFunction(torch.autograd.Function):
    """x [B, H, T, D] -> x * cos + rotate_half(x) * sin, cos/sin [B, T, D] (no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _ext().rope_apply(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy: Tensor):
        cos, sin = ctx.saved_tensors
        return _ext().rope_apply(_last_dim_dense(dy), cos, sin, True), None, None


def _last_dim_dense(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    record("rms_norm", "fused_layers")
    return RMSNormFunction.apply(x, weight, eps)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1) on q [B, H, T, D], k [B, Hkv, T, D]."""
    record("rope", "fused_layers")
    B, T = q.shape[0], q.shape[2]
    cos, sin = _last_dim_dense(cos).expand(B, T, cos.shape[-1]), _last_dim_dense(sin).expand(B, T, sin.shape[-1])
    return RoPEFunction.apply(_last_dim_dense(q), cos, sin), RoPEFunction.apply(_last_dim_dense(k), cos, sin)


def _fits(*tensors: Tensor) -> bool:
    """The mode is not off, nothing is being traced by torch.compile (the compiled decode step fuses
    HF's code itself; an extension call would only break its graph), and the tensors share one CPU
    float dtype (else HF's code runs: its dtype promotion, its device)."""
    first = tensors[0]
    return _MODE != "off" and not torch.compiler.is_compiling() and first.device.type == "cpu" and first.is_floating_point() and all(
        t.device.type == "cpu" and t.dtype == first.dtype for t in tensors)


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    if _fits(hidden_states, self.weight):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _attention_forward(self, *args, **kwargs):
    """A patched model's attention: its class's forward, with the rotary dispatcher switched on (HF
    calls `apply_rotary_pos_emb` from inside it; an activation-checkpointing recompute comes back
    through here too)."""
    before = getattr(_IN_PATCHED_ATTENTION, "on", False)
    _IN_PATCHED_ATTENTION.on = True
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _IN_PATCHED_ATTENTION.on = before


def _rope_dispatch(original):
    """The modeling module's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`, through the
    kernel inside a patched attention module for CPU tensors of one dtype (q/k [B, H, T, D],
    cos/sin [B, T, D]); HF's original for every other call (other models of the architecture)."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (getattr(_IN_PATCHED_ATTENTION, "on", False) and unsqueeze_dim == 1 and cos.dim() == 3 and q.dim() == 4
                and k.dim() == 4 and q.shape[-1] == cos.shape[-1] and q.shape[-1] % 2 == 0 and _fits(q, k, cos, sin)):
            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.selfdistill_fused = True
    return apply_rotary_pos_emb


def unsupported_reason(model) -> Optional[str]:
    from selfdistill.rollout.direct_step import SUPPORTED_ARCHITECTURES  # the decoders both paths know

    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        return f"architecture {name} (fused layers for: {', '.join(SUPPORTED_ARCHITECTURES)})"
    if getattr(model.config, "hidden_act", None) != "silu":
        return f"hidden_act={getattr(model.config, 'hidden_act', None)!r} (fused: 'silu')"
    return None


def apply_fused_layers(model, device: torch.device | str | None = None) -> bool:
    """Route `model`'s RMSNorms and rotary embedding through the fused kernels when the
    mode allows it for its device (checked at each call: a model moved to CUDA keeps HF's code).
    The RMSNorms and attention modules are patched per instance (a deepcopy stays patched, bound to
    its own weights); the rotary embedding is the modeling module's function, replaced once by a
    dispatcher that runs the kernel only inside a patched attention module (else HF's original:
    other models of the architecture are untouched). `device`: where the model will run (default: where
    its parameters are; the trainer passes the engine's, so a model loaded on the CPU for a GPU run
    neither builds the extension nor gets patched). Returns whether anything was patched."""
    device = device if device is not None else next(model.parameters()).device
    reason = unsupported_reason(model)
    if reason is not None or not enabled(device):
        if reason is not None and _MODE == "on":
            log.warning("ops.fused_layers=on: %s keeps HF's layers", reason)
        return False
    import importlib

    modeling = importlib.import_module(type(model).__module__)
    if not getattr(modeling.apply_rotary_pos_emb, "selfdistill_fused", False):
        modeling.apply_rotary_pos_emb = _rope_dispatch(modeling.apply_rotary_pos_emb)
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif kind.endswith("Attention") and hasattr(module, "q_proj"):
            module.forward = types.MethodType(_attention_forward, module)
    return True
