"""Microbenchmark: per-token log-prob + entropy from logits [N, V] (kernels/token_logprobs.py).

Providers: `torch_naive` (fp32 log_softmax over the whole [N, V], the usual eager code),
`torch_reference` (selfdistill.ops.reference, row-chunked), `torch_compile` (torch.compile of the
naive code), `triton` (selfdistill.kernels), `cuda` (the csrc extension, `ops.backend=cuda`; built
on first use, its CPU path on CPU), `liger` (Liger's cross_entropy with reduction="none":
-logp only, no entropy; a lower bound on the work, shown when installed).
Throughput: bytes the op must move, fwd = N V (read), fwd_bwd = 3 N V (read, read, write grad).

    python benchmarks/bench_token_logprobs.py --json out.json            # real shape on CUDA
    python benchmarks/bench_token_logprobs.py --device cpu --json out.json  # tiny, interpreter
"""

from __future__ import annotations

import torch

from _common import compiled, dtype_of, emit, kernels, liger_functional, measure, open_results, parse_args, shape_label

PRESETS = {
    "real": [dict(N=16384, V=151936, dtype="bf16"), dict(N=4096, V=151936, dtype="bf16"), dict(N=16384, V=32000, dtype="bf16")],
    "small": [dict(N=1024, V=32000, dtype="fp32")],
    "tiny": [dict(N=16, V=1000, dtype="fp32")],
}
PROVIDERS = ["torch_naive", "torch_reference", "torch_compile", "triton", "liger", "cuda"]  # cuda last: its first use may build the extension


def naive(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def provider_fn(name: str):
    if name == "torch_naive":
        return naive
    if name == "torch_reference":
        from selfdistill.ops.reference import token_logprobs

        return token_logprobs
    if name == "torch_compile":
        return compiled(naive)
    if name == "triton":
        return kernels().token_logprobs
    if name == "cuda":
        from selfdistill.ops import cuda_ext

        cuda_ext.extension()  # build (or load) before timing
        return cuda_ext.token_logprobs
    if name == "liger":
        lf = liger_functional()
        if lf is None:
            raise ImportError("liger_kernel is not installed")
        return lambda x, t: (-lf.liger_cross_entropy(x, t, reduction="none"),)
    raise ValueError(name)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], PRESETS, PROVIDERS)
    results = open_results("token_logprobs", args)
    for shape in args.shapes:
        N, V, dtype = shape["N"], shape["V"], dtype_of(shape["dtype"])
        gen = torch.Generator(device=args.device).manual_seed(0)
        logits = (torch.randn(N, V, device=args.device, generator=gen) * 2).to(dtype)
        targets = torch.randint(0, V, (N,), device=args.device, generator=gen)
        upstream = torch.randn(N, device=args.device, generator=gen)
        elt = logits.element_size()
        for provider in args.providers:
            base = dict(shape=shape_label(shape), provider=provider)
            try:
                fn = provider_fn(provider)
            except Exception as e:  # noqa: BLE001
                results.add({**base, "mode": "fwd", "error": f"{type(e).__name__}: {e}"})
                continue

            def fwd():
                with torch.no_grad():
                    return fn(logits, targets)

            def fwd_bwd():
                x = logits.detach().requires_grad_()
                out = fn(x, targets)
                loss = (out[0] * upstream).sum() + (out[1].sum() * 1e-3 if len(out) > 1 else 0.0)
                loss.backward()
                return x.grad

            measure(results, {**base, "mode": "fwd"}, fwd, args, bytes_moved=N * V * elt)
            measure(results, {**base, "mode": "fwd_bwd"}, fwd_bwd, args, bytes_moved=3 * N * V * elt)
    emit(results, args)


if __name__ == "__main__":
    main()
