"""Microbenchmark: gold-vs-decoy contrast and belief (kernels/contrast.py), forward only (rewards).

Batch: R rows x K answer positions; `first` of them are a row's first divergent position (one
logit row, no vocabulary pass) and `later` need both passes. Providers: `torch_two_pass` (fp32
log_softmax of every gold and decoy row at every divergent position, no first-position shortcut),
`torch_reference` (selfdistill.ops.reference), `torch_compile` (torch.compile of the two-pass
code), `triton` (selfdistill.kernels), `cuda` (the csrc extension, `ops.backend=cuda`; built
before timing). Throughput: bytes the op must read, 2 V per later position.

    python benchmarks/bench_contrast.py --json out.json
    python benchmarks/bench_contrast.py --device cpu --json out.json
"""

from __future__ import annotations

import torch

from _common import compiled, dtype_of, emit, kernels, measure, open_results, parse_args, shape_label

PRESETS = {
    # K=8 answer tokens, divergence from position 3 on (half the positions need both passes)
    "real": [dict(R=512, K=8, V=151936, first_at=3, dtype="bf16"), dict(R=512, K=8, V=151936, first_at=7, dtype="bf16")],
    "small": [dict(R=64, K=8, V=32000, first_at=3, dtype="fp32")],
    "tiny": [dict(R=4, K=6, V=500, first_at=2, dtype="fp32")],
}
PROVIDERS = ["torch_two_pass", "torch_reference", "torch_compile", "triton", "cuda"]


def two_pass(gold_logits, decoy_logits, gold_ids, decoy_ids, divergent, temperature: float = 1.0):
    lg = torch.log_softmax(gold_logits.float() / temperature, -1).gather(-1, gold_ids.unsqueeze(-1)).squeeze(-1)
    ld = torch.log_softmax(decoy_logits.float() / temperature, -1).gather(-1, decoy_ids.unsqueeze(-1)).squeeze(-1)
    contrast = torch.where(divergent, lg - ld, 0.0)
    return contrast, contrast.sum(-1)


def provider_fn(name: str):
    if name == "torch_two_pass":
        return two_pass
    if name == "torch_reference":
        from selfdistill.ops.reference import gold_decoy_contrast

        return gold_decoy_contrast
    if name == "torch_compile":
        return compiled(two_pass)
    if name == "triton":
        return kernels().gold_decoy_contrast
    if name == "cuda":
        from selfdistill.ops import cuda_ext

        cuda_ext.extension()  # build (or load) before timing
        return cuda_ext.gold_decoy_contrast
    raise ValueError(name)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], PRESETS, PROVIDERS)
    results = open_results("gold_decoy_contrast", args)
    for shape in args.shapes:
        R, K, V, dtype = shape["R"], shape["K"], shape["V"], dtype_of(shape["dtype"])
        gen = torch.Generator(device=args.device).manual_seed(0)
        gold = (torch.randn(R, K, V, device=args.device, generator=gen) * 2).to(dtype)
        decoy = (torch.randn(R, K, V, device=args.device, generator=gen) * 2).to(dtype)
        gold_ids = torch.randint(0, V, (R, K), device=args.device, generator=gen)
        decoy_ids = (gold_ids + 1) % V
        divergent = (torch.arange(K, device=args.device) >= shape["first_at"]).expand(R, K).contiguous()
        later = R * (K - shape["first_at"] - 1)
        for provider in args.providers:
            base = dict(shape=shape_label(shape), provider=provider, mode="fwd")
            try:
                fn = provider_fn(provider)
            except Exception as e:  # noqa: BLE001
                results.add({**base, "error": f"{type(e).__name__}: {e}"})
                continue

            def fwd():
                with torch.no_grad():
                    return fn(gold, decoy, gold_ids, decoy_ids, divergent)

            measure(results, base, fwd, args, bytes_moved=2 * later * V * gold.element_size())
    emit(results, args)


if __name__ == "__main__":
    main()
