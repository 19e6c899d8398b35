"""Plumbing shared by the kernel microbenchmarks: device choice, timing, peak memory, table, JSON.

Every script measures a list of providers (eager torch, torch.compile, the selfdistill Triton
kernel, Liger-Kernel when importable) over a list of shapes and writes one row per
(shape, provider, mode) with `ms`, a throughput (`gbps` or `tflops`) and `peak_mem_mb` (memory
allocated above what existed before the call). A provider that cannot run (no Liger, a
torch.compile failure) gives a row with `error` instead of numbers. `--json` is written row by row
(`json_rows.JsonRows`: a run cut by a time limit keeps its finished rows); `--append` adds this
run's rows to an existing file (the GPU session measures torch.compile in a later step).

On CPU (no CUDA) the scripts exist to exercise the benchmark path: tiny shapes, the Triton kernels
through the interpreter (TRITON_INTERPRET=1 is set here before `selfdistill.kernels` is imported),
peak memory from the torch profiler's allocation events.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from json_rows import JsonRows


def parse_args(description: str, presets: dict[str, list[dict]], providers: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(presets), default=None, help="shape list; default: real on cuda, tiny on cpu")
    p.add_argument("--providers", default=",".join(providers), help=f"comma list out of {','.join(providers)}")
    p.add_argument("--exclude", default="", help="comma list of providers to leave out (e.g. torch_compile); names this "
                   "script lacks are ignored, so one list serves every benchmark of a session")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported); default 20 cuda, 3 cpu")
    p.add_argument("--json", default=None, help="write the rows to this file, row by row")
    p.add_argument("--append", action="store_true", help="add the rows to an existing --json file instead of replacing it")
    args = p.parse_args()
    args.preset = args.preset or ("real" if args.device == "cuda" else "tiny")
    args.shapes = presets[args.preset]
    args.providers = [x for x in args.providers.split(",") if x and x not in args.exclude.split(",")]
    unknown = sorted(set(args.providers) - set(providers))
    if unknown:
        p.error(f"unknown providers {unknown}; choose from {providers}")
    args.reps = args.reps or (20 if args.device == "cuda" else 3)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the first import of selfdistill.kernels
    elif not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def kernels():
    import selfdistill.kernels as k

    return k


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn); compilation errors surface on the first call and become an `error` row."""
    return torch.compile(fn, dynamic=False)


def liger_functional():
    """Liger-Kernel's functional API, or None when it is not installed."""
    try:
        import liger_kernel.transformers.functional as lf
    except ImportError:
        return None
    return lf


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory allocated by one call of `fn()` above what was allocated before it, in MB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    # CPU: the profiler's raw allocation / free records in time order (per-op `self` memory would
    # book a free at the start of the op that encloses it, e.g. an autograd Function)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def open_results(kernel: str, args) -> JsonRows:
    """The results of this run: rows written to `--json` as they come (in memory without it)."""
    header = {"kernel": kernel, "device": args.device, "device_name": device_name(args.device), "preset": args.preset,
              "reps": args.reps, "torch": torch.__version__, "triton": _version("triton"), "python": sys.version.split()[0]}
    return JsonRows(args.json, header, what=f"providers={','.join(args.providers)}", append=args.append)


def measure(results: JsonRows, base: dict, fn: Callable[[], object], args, *, bytes_moved: float = 0.0, flops: float = 0.0) -> None:
    """Time `fn`, record its peak memory and throughput into a new row (or an `error` row)."""
    row = dict(base)
    try:
        ms = time_ms(fn, args.device, args.reps)
        row["ms"] = ms
        row["peak_mem_mb"] = peak_memory_mb(fn, args.device)
        if bytes_moved:
            row["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
        if flops:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001  (a provider that cannot run is reported, not fatal)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if args.device == "cuda":
        torch.cuda.empty_cache()
    results.add(row)


def emit(results: JsonRows, args) -> None:
    """Print the table of every row in the results and mark this run complete."""
    rows = results.rows
    cols = [c for c in ("shape", "arm", "provider", "mode", "ms", "gbps", "tflops", "peak_mem_mb", "vs_matmuls", "extra_mem_mb",
                        "vocab_rows", "max_diff", "error")
            if any(c in r for r in rows)]
    print(f"# {results.doc['kernel']} on {args.device} ({device_name(args.device)}), preset {args.preset}, median of {args.reps}")
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:>14.3f}" if isinstance(v, float) else f"{str(v):>14}")
        print(" | ".join(cells))
    results.finish()


def shape_label(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()


def dtype_of(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"
