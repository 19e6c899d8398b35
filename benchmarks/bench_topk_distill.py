"""Microbenchmark: top-K distillation loss from student and teacher hidden states (kernels/topk_distill.py).

The SPEC section 6 `topk` loss (K=100, tail, alpha=0.5) per position from student hidden [N, H] /
LM head [V, H] and a frozen teacher's hidden [N, H] / LM head [V, H]. Providers: `matmuls` (the
bare GEMMs a fused path contains, in the input dtype, nothing else: fwd = both sides' logits,
fwd_bwd = those, the student's recomputation, dH and dW), `torch_naive` (both sides' full [N, V]
logits, fp32 log_softmax, the divergence in torch), `torch_compile` (torch.compile of the naive
code), `torch_reference` (selfdistill.ops.reference: row chunks under activation checkpointing),
`triton` (selfdistill.kernels: tiled matmuls, torch.topk on the tile, the Triton kernels).
Throughput: model TFLOP/s, fwd = 4 N V H (two logits GEMMs), fwd_bwd = 8 N V H (plus dH and dW;
the chunked paths spend 10 N V H: they recompute the student's logits in the backward). Rows
carry `vs_matmuls` and, for fwd_bwd, `extra_mem_mb` (peak memory above the returned dH and dW).
The JSON file is rewritten after every row, so a run cut short keeps what it measured.

    python benchmarks/bench_topk_distill.py --json out.json                 # real shape on CUDA
    python benchmarks/bench_topk_distill.py --device cpu --json out.json    # tiny, interpreter
"""

from __future__ import annotations

import functools

import torch

from selfdistill.ops.reference import topk_divergence  # torch only: TRITON_INTERPRET is decided in parse_args

from _common import compiled, dtype_of, emit, kernels, measure, open_results, parse_args, shape_label
from bench_fused_linear import add_targets

PRESETS = {
    "real": [dict(N=16384, H=4096, V=151936, K=100, dtype="bf16"), dict(N=4096, H=4096, V=151936, K=100, dtype="bf16")],
    "small": [dict(N=512, H=256, V=8000, K=100, dtype="fp32")],
    "small_bf16": [dict(N=256, H=256, V=8000, K=100, dtype="bf16")],  # CPU: the bf16 memory accounting (extra_mem_mb)
    "tiny": [dict(N=16, H=32, V=500, K=20, dtype="fp32")],
}
PROVIDERS = ["matmuls", "torch_naive", "torch_compile", "torch_reference", "triton"]
TEMPERATURE, TAIL, ALPHA = 1.0, True, 0.5


def naive(hidden, weight, teacher_hidden, teacher_weight, temperature=TEMPERATURE, k=100, tail=TAIL, alpha=ALPHA):
    """The dense formula: whole [N, V] fp32 log-softmax per side."""
    logp_s = torch.log_softmax((hidden @ weight.t()).float() / temperature, dim=-1)
    with torch.no_grad():
        logp_t = torch.log_softmax((teacher_hidden @ teacher_weight.t()).float() / temperature, dim=-1)
        idx = logp_s.topk(k, dim=-1).indices
    return topk_divergence(logp_s.gather(-1, idx), logp_t.gather(-1, idx), tail, alpha)


def bare_matmuls(hidden, weight, teacher_hidden, teacher_weight):
    """The five GEMMs of the chunked forward + backward, with stand-in upstream gradients."""
    logits = hidden @ weight.t()
    teacher_logits = teacher_hidden @ teacher_weight.t()
    dlogits = hidden @ weight.t()  # the backward's recomputation, overwritten by d loss / d logits there
    return logits, teacher_logits, dlogits @ weight, dlogits.t() @ hidden


@functools.lru_cache(maxsize=None)
def provider_fn(name: str):
    if name == "torch_naive":
        return naive
    if name == "torch_compile":
        return compiled(naive)
    if name == "torch_reference":
        from selfdistill.ops.reference import fused_linear_topk_distill

        return fused_linear_topk_distill
    if name == "triton":
        return kernels().fused_linear_topk_distill
    raise ValueError(name)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], PRESETS, PROVIDERS)
    results = open_results("topk_distill", args)
    for shape in args.shapes:
        N, H, V, K, dtype = shape["N"], shape["H"], shape["V"], shape["K"], dtype_of(shape["dtype"])
        gen = torch.Generator(device=args.device).manual_seed(0)
        hidden = torch.randn(N, H, device=args.device, generator=gen).to(dtype)
        weight = (torch.randn(V, H, device=args.device, generator=gen) * (3.0 / H**0.5)).to(dtype)
        teacher_hidden = (hidden.float() + 0.5 * torch.randn(N, H, device=args.device, generator=gen)).to(dtype)
        teacher_weight = (weight.float() + torch.randn(V, H, device=args.device, generator=gen) * (0.3 / H**0.5)).to(dtype)
        upstream = torch.randn(N, device=args.device, generator=gen)
        inputs = (hidden, weight, teacher_hidden, teacher_weight)
        for provider in args.providers:
            base = dict(shape=shape_label(shape), provider=provider)
            if provider == "matmuls":
                measure(results, {**base, "mode": "fwd"}, lambda: (hidden @ weight.t(), teacher_hidden @ teacher_weight.t()), args,
                        flops=4 * N * V * H)
                measure(results, {**base, "mode": "fwd_bwd"}, lambda: bare_matmuls(*inputs), args, flops=8 * N * V * H)
                continue

            # a provider that cannot be built (a torch.compile failure) gives error rows through `measure`
            def fwd():
                with torch.no_grad():
                    return provider_fn(provider)(*inputs, TEMPERATURE, K, TAIL, ALPHA)

            def fwd_bwd():
                h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
                loss = provider_fn(provider)(h, w, teacher_hidden, teacher_weight, TEMPERATURE, K, TAIL, ALPHA)
                (loss * upstream).sum().backward()
                return h.grad, w.grad

            for mode, step, flops in (("fwd", fwd, 4 * N * V * H), ("fwd_bwd", fwd_bwd, 8 * N * V * H)):
                measure(results, {**base, "mode": mode}, step, args, flops=flops)
        grads_mb = (N * H + V * H) * hidden.element_size() / 2**20
        add_targets([r for r in results.rows if r["shape"] == shape_label(shape)], grads_mb)  # earlier runs' too (--append)
        results.save()
    emit(results, args)


if __name__ == "__main__":
    main()
