"""Microbenchmark: log-prob + entropy from hidden [N, H] and the LM head [V, H] (kernels/fused_linear.py).

Providers: `matmuls` (the bare GEMMs the fused path contains, in the input dtype, nothing else:
fwd = the logits, fwd_bwd = logits, their recomputation, dH and dW), `torch_naive` (full [N, V]
logits, fp32 log_softmax), `torch_reference` (selfdistill.ops.reference, row-chunked),
`torch_compile` (torch.compile of the naive code), `triton` (selfdistill.kernels: tiled matmuls +
the token-logprob kernel, logits never whole), `cuda` (the csrc kernels under the same host side),
`liger` (Liger's fused-linear cross-entropy, reduction="none": -logp only, when installed).
Throughput: model TFLOP/s, fwd = 2 N V H, fwd_bwd = 6 N V H (the fused paths spend 8 N V H: they
recompute the logits in the backward instead of keeping N x V alive). Each row also has
`vs_matmuls` (its time over the `matmuls` row of the same shape and mode; the issue's target for
the fused fwd_bwd is <= 1.3) and, for fwd_bwd, `extra_mem_mb`: peak memory above the returned
gradients dH and dW (target < 1024 at the real shape).

    python benchmarks/bench_fused_linear.py --json out.json
    python benchmarks/bench_fused_linear.py --device cpu --json out.json
"""

from __future__ import annotations

import torch

from _common import compiled, dtype_of, emit, kernels, liger_functional, measure, open_results, parse_args, shape_label

PRESETS = {
    "real": [dict(N=16384, H=4096, V=151936, dtype="bf16"), dict(N=4096, H=4096, V=151936, dtype="bf16")],
    "small": [dict(N=1024, H=512, V=32000, dtype="fp32")],
    "small_bf16": [dict(N=256, H=512, V=32000, dtype="bf16")],  # CPU: the bf16 memory accounting (extra_mem_mb)
    "tiny": [dict(N=16, H=32, V=500, dtype="fp32")],
}
PROVIDERS = ["matmuls", "torch_naive", "torch_reference", "torch_compile", "triton", "liger", "cuda"]  # cuda last: its first use may build the extension


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    logp_all = torch.log_softmax((hidden @ weight.t()).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def bare_matmuls(hidden: torch.Tensor, weight: torch.Tensor):
    """The four GEMMs of the fused forward + backward, with stand-in upstream gradients."""
    logits = hidden @ weight.t()
    dlogits = hidden @ weight.t()  # the backward's recomputation, overwritten by d loss / d logits there
    return logits, dlogits @ weight, dlogits.t() @ hidden


def add_targets(rows: list[dict], grads_mb: float) -> None:
    """`vs_matmuls` on every timed row of one shape; `extra_mem_mb` on its fwd_bwd rows."""
    bare = {r["mode"]: r["ms"] for r in rows if r["provider"] == "matmuls" and "ms" in r}
    for r in rows:
        if "ms" in r and r["mode"] in bare and r["provider"] != "matmuls":
            r["vs_matmuls"] = r["ms"] / bare[r["mode"]]
        if r["mode"] == "fwd_bwd" and "peak_mem_mb" in r and r["provider"] != "matmuls":
            r["extra_mem_mb"] = r["peak_mem_mb"] - grads_mb


def provider_fn(name: str):
    if name == "torch_naive":
        return naive
    if name == "torch_reference":
        from selfdistill.ops.reference import fused_linear_token_logprobs

        return fused_linear_token_logprobs
    if name == "torch_compile":
        return compiled(naive)
    if name == "triton":
        return kernels().fused_linear_token_logprobs
    if name == "cuda":
        from selfdistill.ops import cuda_ext

        cuda_ext.extension()  # build (or load) before timing
        return cuda_ext.fused_linear_token_logprobs
    if name == "liger":
        lf = liger_functional()
        if lf is None:
            raise ImportError("liger_kernel is not installed")
        return lambda h, w, t: (-lf.liger_fused_linear_cross_entropy(h, w, t, reduction="none"),)
    raise ValueError(name)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], PRESETS, PROVIDERS)
    results = open_results("fused_linear_token_logprobs", args)
    for shape in args.shapes:
        N, H, V, dtype = shape["N"], shape["H"], shape["V"], dtype_of(shape["dtype"])
        gen = torch.Generator(device=args.device).manual_seed(0)
        hidden = torch.randn(N, H, device=args.device, generator=gen).to(dtype)
        weight = (torch.randn(V, H, device=args.device, generator=gen) / H**0.5).to(dtype)
        targets = torch.randint(0, V, (N,), device=args.device, generator=gen)
        upstream = torch.randn(N, device=args.device, generator=gen)
        for provider in args.providers:
            base = dict(shape=shape_label(shape), provider=provider)
            if provider == "matmuls":
                measure(results, {**base, "mode": "fwd"}, lambda: hidden @ weight.t(), args, flops=2 * N * V * H)
                measure(results, {**base, "mode": "fwd_bwd"}, lambda: bare_matmuls(hidden, weight), args, flops=6 * N * V * H)
                continue
            try:
                fn = provider_fn(provider)
            except Exception as e:  # noqa: BLE001
                results.add({**base, "mode": "fwd", "error": f"{type(e).__name__}: {e}"})
                continue

            def fwd():
                with torch.no_grad():
                    return fn(hidden, weight, targets)

            def fwd_bwd():
                h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
                out = fn(h, w, targets)
                loss = (out[0] * upstream).sum() + (out[1].sum() * 1e-3 if len(out) > 1 else 0.0)
                loss.backward()
                return h.grad, w.grad

            measure(results, {**base, "mode": "fwd"}, fwd, args, flops=2 * N * V * H)
            measure(results, {**base, "mode": "fwd_bwd"}, fwd_bwd, args, flops=6 * N * V * H)
        grads_mb = (N * H + V * H) * hidden.element_size() / 2**20
        add_targets([r for r in results.rows if r["shape"] == shape_label(shape)], grads_mb)  # earlier runs' too (--append)
        results.save()
    emit(results, args)


if __name__ == "__main__":
    main()
