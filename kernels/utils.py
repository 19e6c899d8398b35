"""Launch helpers shared by the kernels: device checks, block sizes, dtype pointers.

The Triton interpreter (TRITON_INTERPRET=1) is fixed when a `@triton.jit` function is *decorated*,
i.e. when `selfdistill.kernels` is first imported, not when a kernel is launched. `INTERPRETED`
records which mode this process got, so a CPU launch can fail with a message instead of a driver
error deep inside Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def _interpreter_on() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED: bool = _interpreter_on()

# Largest vocabulary tile one program holds in registers. On a GPU 4096 fp32 values over 8 warps is
# 16 per thread; under the interpreter a smaller tile keeps numpy temporaries small and makes the
# tests walk several tiles (and a ragged last tile) per row at small V.
MAX_BLOCK_GPU = 4096
MAX_BLOCK_INTERPRETED = 256


def check_launchable(op: str, *tensors: Tensor) -> None:
    """Raise a clear error when `op`'s Triton kernels cannot run on these tensors in this process."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device; got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cuda":
        if INTERPRETED:
            raise RuntimeError(f"{op}: TRITON_INTERPRET=1 was set when selfdistill.kernels was imported; the interpreter takes CPU tensors, got {device}")
        return
    if device.type == "cpu":
        if not INTERPRETED:
            raise RuntimeError(
                f"{op}: Triton kernels on CPU tensors need the interpreter; set TRITON_INTERPRET=1 before "
                "selfdistill.kernels is first imported, or use ops.backend=torch on CPU"
            )
        return
    raise NotImplementedError(f"{op}: Triton kernels run on cuda (or cpu through the interpreter), not on {device}")


def vocab_block(n: int) -> int:
    """Tile width over a dimension of size `n`: a power of two, at most the per-mode maximum."""
    cap = MAX_BLOCK_INTERPRETED if INTERPRETED else MAX_BLOCK_GPU
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def num_warps_for(block: int) -> int:
    return 8 if block >= 2048 else 4


def as_kernel_mask(mask: Tensor) -> Tensor:
    """A contiguous mask Triton can load (bool pointers are stored as bytes)."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# Reductions of a 1-D tile to a scalar. triton.language's tl.sum / tl.max / tl.min (and tl.zeros)
# are themselves @triton.jit functions, decorated when triton is first imported; when that happened
# before TRITON_INTERPRET=1 was set (`import transformers` imports triton), the interpreter cannot
# call them. The kernels therefore use only triton builtins (tl.full, tl.reduce, ...) and these
# helpers, decorated with the kernels so they follow the kernels' mode. They reduce with triton's
# own combine functions where it has them: the compiler inlines those like any jit function, and
# the interpreter recognises them by identity and reduces with numpy (it never calls them), where a
# combine function of ours would be called once per element.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


_SUM = getattr(tl.standard, "_sum_combine", _add)
_MAX = getattr(tl.standard, "_elementwise_max", _maximum)
_MIN = getattr(tl.standard, "_elementwise_min", _minimum)


@triton.jit
def tile_sum(x):
    return tl.reduce(x, 0, _SUM)


@triton.jit
def tile_max(x):
    return tl.reduce(x, 0, _MAX)


@triton.jit
def tile_min(x):
    return tl.reduce(x, 0, _MIN)
