"""Which implementation of each dispatched op ran: call counts per (op, backend).

The fused backends' host sides (`logprob_host`, `contrast_host`, `row_pass_loss`) record a call
just before they launch a backend's kernels, under the backend that supplied the launchers;
`selfdistill.ops` records its calls of the torch reference. So a test (or a user wondering what
`ops.backend=auto` did) can reset the counts, run, and see which backend's code actually executed:
a dispatch that silently fell back to torch shows up under "torch", not under the chosen backend.
One dict increment per op call.
"""

from __future__ import annotations

from collections import Counter

_COUNTS: Counter[tuple[str, str]] = Counter()


def record(op: str, backend: str) -> None:
    _COUNTS[(op, backend)] += 1


def call_counts() -> dict[tuple[str, str], int]:
    """{(op, backend): calls} since the last `reset_call_counts()` (or process start)."""
    return dict(_COUNTS)


def reset_call_counts() -> None:
    _COUNTS.clear()


def backend_of(launchers: object) -> str:
    """The backend a host side's launchers (a class or function) belong to, from their module:
    "cuda" for the csrc extension's (selfdistill.ops.cuda_ext), "triton" for selfdistill.kernels';
    anything else (a test's stand-in) is named by its module."""
    module = getattr(launchers, "__module__", None) or type(launchers).__module__
    if module == "selfdistill.ops.cuda_ext":
        return "cuda"
    if module.startswith("selfdistill.kernels"):
        return "triton"
    return module
