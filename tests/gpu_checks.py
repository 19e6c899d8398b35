"""Device checks of the fused ops: every implementation (Triton, csrc) against an fp64 torch
reference on the same inputs, forward and gradients, fp32 and bf16 inputs.

    python tests/gpu_checks.py --device cuda --json out.json   # on a GPU machine (compiled Triton, csrc CUDA)
    python tests/gpu_checks.py --device cpu --json out.json    # here: Triton interpreter, csrc CPU path

The rule for every output and gradient: max abs error vs fp64 <= 4x the error of torch's own fp32
reference (`selfdistill.ops.reference`) on the same inputs, or <= `FLOOR` when that is smaller (a
NaN on either side fails it).

Each check stands alone: what it raised is recorded as its failure and the next check runs. The
backends are set up by checks of their own, `triton/import` and `csrc/build` (the extension is
built once); when one fails, that backend's op checks are recorded as failed at once. The checks run
in a worker process: a check that kills it (a segfault, or a CUDA error that leaves the context
unusable, so that every later CUDA call would fail too) is recorded as failed and a fresh worker
goes on with the next. `--json` is rewritten after every check (benchmarks/json_rows.py), so a run
cut short keeps every finished check; `planned` lists them all and `ok` is set at the end.
Prints one line per check and exits 1 if any fails. tests/test_gpu_checks.py runs the CPU mode; on
a CUDA machine it runs the CUDA mode too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from json_rows import JsonRows  # noqa: E402

FLOOR = 2e-5
SETUP = {"triton": "triton/import", "csrc": "csrc/build"}  # a backend's setup check, run before its op checks
BACKEND_ORDER = ("triton", "csrc")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # run the checks (the parent supervises)
    p.add_argument("--die-in", default=None, metavar="CHECK",
                   help="testing aid: the worker kills itself inside CHECK, as a segfault would")
    return p.parse_args()


def max_error(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def compare(impl, ref, ref64, inputs, grad_of=None) -> list[dict]:
    """impl / ref (torch fp32) / ref64 (fp64 math): fn(*inputs) -> tuple of outputs. Errors of every
    output and of the gradients of sum_k <out_k, w_k> (fixed random w) w.r.t. the inputs whose
    indices `grad_of` lists (all by default; () for an op without gradients, e.g. a reward)."""
    import torch

    grad_of = range(len(inputs)) if grad_of is None else grad_of
    outs = {}
    for label, fn, cast in (("impl", impl, None), ("fp32", ref, None), ("fp64", ref64, torch.float64)):
        xs = [(t.detach().to(cast) if cast else t.detach().clone()).requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
        y = fn(*xs)
        if grad_of:
            g = torch.Generator(device="cpu").manual_seed(1)
            loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in y)
            loss.backward()
        outs[label] = ([o.detach() for o in y], [xs[i].grad.detach() for i in grad_of])
    errors = []
    for kind, k in (("out", 0), ("grad", 1)):
        for j, (a, b, c) in enumerate(zip(outs["impl"][k], outs["fp32"][k], outs["fp64"][k])):
            ours, theirs = max_error(a, c), max_error(b, c)
            errors.append({"what": f"{kind}{j}", "impl": ours, "torch_fp32": theirs, "ok": ours <= max(4 * theirs, FLOOR)})
    return errors


def define_checks(device: str) -> list[tuple[str, str | None, Callable[[], list[dict]]]]:
    """(name, backend, run) in order; `run` returns compare()'s error rows. The inputs are made here,
    from fixed seeds, so a restarted worker checks the same numbers."""
    import torch

    from selfdistill.ops import contrast_reference, cuda_ext, reference

    def triton(name):  # imported when a check runs: a failed import fails the Triton checks only
        return getattr(importlib.import_module("selfdistill.kernels"), name)

    def triton_setup():
        kernels = importlib.import_module("selfdistill.kernels")
        if device == "cuda" and kernels.INTERPRETED:
            raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter takes CPU tensors")
        return []

    def csrc_setup():
        cuda_ext.extension()  # the JIT build (CUDA kernels included where torch sees a GPU), cached on disk
        return []

    checks = [("triton/import", "triton", triton_setup), ("csrc/build", "csrc", csrc_setup)]  # run before their backends
    dev = torch.device(device)
    small = device == "cpu"
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=gen) * scale).to(dev, dtype)

    def lp64(logits, targets, temperature):
        lp = torch.log_softmax(logits.double() / temperature, -1)
        return lp.gather(-1, targets[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)

    def add(name, backend, impl, ref, ref64, inputs, grad_of=None):
        checks.append((name, backend, lambda: compare(impl, ref, ref64, inputs, grad_of)))

    N, V, H = (9, 301, 32) if small else (2048, 32000, 1024)
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        targets = torch.randint(0, V, (N,), generator=gen).to(dev)
        logits = rand(N, V, scale=3.0, dtype=dtype)
        ref = lambda x, t=targets: reference.token_logprobs(x, t, 0.7)  # noqa: E731
        ref64 = lambda x, t=targets: lp64(x, t, 0.7)  # noqa: E731
        add(f"token_logprobs/triton/{tag}", "triton", lambda x, t=targets: triton("token_logprobs")(x, t, 0.7), ref, ref64, [logits])
        add(f"token_logprobs/csrc/{tag}", "csrc", lambda x, t=targets: cuda_ext.token_logprobs(x, t, 0.7), ref, ref64, [logits])
        hidden, weight = rand(N, H, dtype=dtype), rand(V, H, scale=H ** -0.5, dtype=dtype)
        add(f"fused_linear/triton/{tag}", "triton", lambda h, w, t=targets: triton("fused_linear_token_logprobs")(h, w, t, 1.0),
            lambda h, w, t=targets: reference.fused_linear_token_logprobs(h, w, t, 1.0),
            lambda h, w, t=targets: lp64(h @ w.t(), t, 1.0), [hidden, weight])

    B, T = (4, 23) if small else (256, 1024)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dev)
    old, adv, ref_lp, ent = rand(B, T, scale=0.5) - 1, rand(B, T), rand(B, T, scale=0.5) - 1, rand(B, T).abs()
    for loss_type in ("grpo", "dapo", "dr_grpo", "gspo"):
        kw = dict(loss_type=loss_type, clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01,
                  token_weighting="ramp", max_len_norm=T)

        def run(impl, lp, e, kw=kw):
            cast = (lambda t: t.to(lp.dtype))
            loss, _ = impl(lp, cast(old), cast(adv), mask, lengths.to(dev), ref_logp=cast(ref_lp), entropy=e, **kw)
            return (loss.reshape(1),)

        # fp64 side: the torch reference fed fp64 tensors (its arithmetic follows the input dtype)
        lp0 = old + 0.1 * rand(B, T)
        for backend, impl in (("triton", lambda *a, **k: triton("policy_loss")(*a, **k)), ("csrc", cuda_ext.policy_loss)):
            add(f"policy_loss/{backend}/{loss_type}", backend, lambda lp, e, impl=impl, run=run: run(impl, lp, e),
                lambda lp, e, run=run: run(reference.policy_loss, lp, e), lambda lp, e, run=run: run(reference.policy_loss, lp, e),
                [lp0, ent])

    # the scorer's contrast from hidden states: the first divergent position one dot product with
    # W[gold] - W[decoy] (+ bias), later ones both passes' fused-linear log-probs
    R, K = (3, 5) if small else (512, 8)
    gold_ids, decoy_ids = torch.randint(0, V, (R, K), generator=gen).to(dev), torch.randint(0, V, (R, K), generator=gen).to(dev)
    divergent = torch.rand(R, K, generator=gen) < 0.7
    divergent[:, 0] = True  # every row scorable (a row without a divergent position has a NaN belief)
    divergent = divergent.to(dev)
    first = divergent & (divergent.long().cumsum(-1) == 1)

    def contrast64(gh, dh, w, b):  # SPEC section 1 in fp64: first divergent position from the gold row, later ones two passes
        def log_softmax_at(h, ids):
            return torch.log_softmax(h.double() @ w.double().t() + b.double(), -1).gather(-1, ids[..., None]).squeeze(-1)

        lg = log_softmax_at(gh, gold_ids)
        ld = torch.where(first, log_softmax_at(gh, decoy_ids), log_softmax_at(dh, decoy_ids))
        c = torch.where(divergent, lg - ld, torch.zeros_like(lg))
        return c, c.sum(-1)

    contrast = {"triton": lambda *a: triton("gold_decoy_contrast")(*a), "csrc": cuda_ext.gold_decoy_contrast}
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        hidden = [rand(R, K, H, dtype=dtype), rand(R, K, H, dtype=dtype), rand(V, H, scale=2 * H ** -0.5, dtype=dtype), rand(V, dtype=dtype)]
        hidden[1] = torch.where(first.unsqueeze(-1), hidden[0], hidden[1])  # the passes agree up to the first divergent position
        for backend, impl in contrast.items():
            add(f"gold_decoy_contrast/{backend}/{tag}", backend,
                lambda gh, dh, w, b, impl=impl: tuple(impl(gh, dh, w, b, gold_ids, decoy_ids, divergent)),
                lambda gh, dh, w, b: tuple(contrast_reference.gold_decoy_contrast(gh, dh, w, b, gold_ids, decoy_ids, divergent)),
                contrast64, hidden)
    # the rewards' float64 row reductions: gm's difference-in-differences, PMI-shift's shift and flips
    values, minus, members = rand(R, K, scale=2.0), rand(R, K), divergent
    reduction = {"triton": lambda *a, **k: triton("clipped_mean_min")(*a, **k), "csrc": cuda_ext.clipped_mean_min}
    for backend, impl in reduction.items():
        add(f"clipped_mean_min/{backend}", backend, lambda x, y, impl=impl: (impl(x, members, minus=y),),
            lambda x, y: (contrast_reference.clipped_mean_min(x, members, minus=y),),
            lambda x, y: (contrast_reference.clipped_mean_min(x, members, minus=y),), [values, minus])
    beliefs = [rand(4 * R, scale=2.0, dtype=torch.float64), rand(4 * R, scale=2.0, dtype=torch.float64)]
    beliefs[0][:3], beliefs[1][:3] = 0.0, torch.tensor([2.0, -2.5, 0.0], dtype=torch.float64)  # ties on the thresholds
    shift = {"triton": lambda *a: triton("belief_shift")(*a), "csrc": cuda_ext.belief_shift}
    for backend, impl in shift.items():
        add(f"belief_shift/{backend}", backend, lambda o, c, impl=impl: impl(o, c), contrast_reference.belief_shift,
            contrast_reference.belief_shift, beliefs, grad_of=())
    # top-K distillation (SPEC section 6; Triton only): student and teacher hidden states and heads
    Nk, Kk = (9, 20) if small else (2048, 100)
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        student = [rand(Nk, H, dtype=dtype), rand(V, H, scale=3 * H ** -0.5, dtype=dtype)]
        teacher = [(student[0].float() + 0.5 * rand(Nk, H)).to(dtype), (student[1].float() + rand(V, H, scale=0.3 * H ** -0.5)).to(dtype)]
        add(f"topk_distill/triton/{tag}", "triton",
            lambda h, w, th, tw: (triton("fused_linear_topk_distill")(h, w, th, tw, 1.0, Kk, True, 0.5),),
            lambda h, w, th, tw: (reference.fused_linear_topk_distill(h, w, th, tw, 1.0, Kk, True, 0.5),),
            lambda h, w, th, tw: (reference.fused_linear_topk_distill(h, w, th, tw, 1.0, Kk, True, 0.5),),
            student + teacher, grad_of=(0, 1))
    # Triton first: the csrc build (a minute or more) comes after them, so a run cut short during it
    # still has every Triton result
    return sorted(checks, key=lambda check: BACKEND_ORDER.index(check[1]))


def device_usable(device: str) -> bool:
    """False after a CUDA error that poisons the context (every later CUDA call would fail)."""
    if device != "cuda":
        return True
    import torch

    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def worker(args) -> int:
    """Run every check not yet in the document, recording each as it ends. Exit 3 when the device is
    left unusable, so the parent goes on in a fresh process."""
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before selfdistill.kernels is first imported
    results = JsonRows(args.json, {}, key="checks", what="worker", append=True)
    checks = define_checks(args.device)
    results.update(planned=[name for name, _, _ in checks])
    done = {row["check"]: row for row in results.rows}
    for name, backend, run in checks:
        if name in done:
            continue
        results.update(running=name)
        start = time.time()
        setup = SETUP.get(backend)
        if setup != name and not done.get(setup, {}).get("ok", False):
            row = {"check": name, "ok": False, "error": f"not run: {setup} failed"}
        else:
            if name == args.die_in:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                errors = run()
                row = {"check": name, "ok": all(e["ok"] for e in errors), "errors": errors}
            except Exception as e:  # noqa: BLE001  (recorded as this check's failure; the next one runs)
                row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
        row["seconds"] = round(time.time() - start, 2)
        done[name] = row
        results.doc["running"] = None
        results.add(row)  # one write: the row and "no check running"
        print_check(row)
        if not row["ok"] and not device_usable(args.device):
            print(f"the {args.device} device is unusable after {name}; continuing in a fresh process", flush=True)
            return 3
    results.finish()
    return 0


def print_check(row: dict) -> None:
    if "errors" in row and row["errors"]:
        worst = max(row["errors"], key=lambda e: e["impl"])
        detail = f"worst {worst['what']} {worst['impl']:.2e} (torch fp32 {worst['torch_fp32']:.2e})"
    else:
        detail = row.get("error", "ran")
    print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']} ({row['seconds']:.1f}s): {detail}", flush=True)


def main() -> int:
    args = parse_args()
    if args.worker:
        return worker(args)
    import torch

    path = args.json or os.path.join(tempfile.mkdtemp(prefix="gpu_checks_"), "checks.json")
    header = {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "floor": FLOOR, "ok": None, "planned": [], "running": None}
    results = JsonRows(path, header, key="checks", what="gpu_checks")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--device", args.device, "--json", path]
    cmd += ["--die-in", args.die_in] if args.die_in else []
    while True:
        proc = subprocess.run(cmd)
        results.reload()
        running = results.doc.get("running")
        if proc.returncode == 0:
            break
        if running is None and proc.returncode == 3:
            continue  # it recorded its check and found the device unusable after it
        if running is None:  # died outside any check (an import, making the inputs): nothing to isolate
            results.add({"check": "worker", "ok": False, "error": f"the worker process exited with {proc.returncode} outside a check"})
            break
        row = {"check": running, "ok": False, "seconds": None,
               "error": f"the worker process died in this check (exit {proc.returncode}: a crash or a signal)"}
        results.doc["running"] = None
        results.add(row)
        print_check({**row, "seconds": 0.0})
    names = {row["check"] for row in results.rows}
    ok = all(row["ok"] for row in results.rows) and set(results.doc["planned"]) <= names
    results.update(ok=ok)
    results.finish()
    failed = [row["check"] for row in results.rows if not row["ok"]]
    print(f"gpu_checks: {len(results.rows) - len(failed)}/{len(results.rows)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
