"""Microbenchmark: gold-vs-decoy contrast and belief from the scorer's hidden states (kernels/contrast.py), forward.

Batch: R rows x K answer positions of hidden states [R, K, H] for the gold and the decoy pass, an
LM head [V, H]; positions from `first_at` on are divergent: the first of them is one dot product
with W[gold] - W[decoy] (no vocabulary pass), the later ones need both passes' fused-linear
log-probs. Providers: `torch_two_pass` (what the scorer did before the kernels: logits of both
passes' rows at every divergent position, fp32 log_softmax, no first-position shortcut),
`torch_reference` (selfdistill.ops.contrast_reference), `torch_compile` (torch.compile of the
two-pass code), `triton` (selfdistill.kernels), `cuda` (the csrc extension, `ops.backend=cuda`;
built before timing). Throughput: model TFLOP/s of the LM-head matmuls the op needs, 2 H per
first position and 2 x 2 V H per later one.

    python benchmarks/bench_contrast.py --json out.json
    python benchmarks/bench_contrast.py --device cpu --json out.json
"""

from __future__ import annotations

import torch

from _common import compiled, dtype_of, emit, kernels, measure, open_results, parse_args, shape_label

PRESETS = {
    # K=8 answer tokens; divergence from position 5 (three divergent positions) or only at the last one
    "real": [dict(R=512, K=8, H=4096, V=151936, first_at=5, dtype="bf16"), dict(R=512, K=8, H=4096, V=151936, first_at=7, dtype="bf16")],
    "small": [dict(R=64, K=8, H=512, V=32000, first_at=5, dtype="fp32")],
    "tiny": [dict(R=4, K=6, H=32, V=500, first_at=2, dtype="fp32")],
}
PROVIDERS = ["torch_two_pass", "torch_reference", "torch_compile", "triton", "cuda"]


def two_pass(gold_hidden, decoy_hidden, weight, bias, gold_ids, decoy_ids, divergent, temperature: float = 1.0):
    """Both passes' logits at every divergent position, fp32 log_softmax, the gold and decoy log-probs."""
    rows = divergent.nonzero(as_tuple=True)
    z_g = (gold_hidden[rows] @ weight.t()).float() / temperature
    z_d = (decoy_hidden[rows] @ weight.t()).float() / temperature
    lg = torch.log_softmax(z_g, -1).gather(-1, gold_ids[rows].unsqueeze(-1)).squeeze(-1)
    ld = torch.log_softmax(z_d, -1).gather(-1, decoy_ids[rows].unsqueeze(-1)).squeeze(-1)
    contrast = torch.zeros(divergent.shape, dtype=torch.float32, device=gold_hidden.device).index_put(rows, lg - ld)
    return contrast, contrast.double().sum(-1)


def provider_fn(name: str):
    if name == "torch_two_pass":
        return two_pass
    if name == "torch_reference":
        from selfdistill.ops.contrast_reference import gold_decoy_contrast

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
        R, K, H, V, dtype = shape["R"], shape["K"], shape["H"], shape["V"], dtype_of(shape["dtype"])
        gen = torch.Generator(device=args.device).manual_seed(0)
        gold = torch.randn(R, K, H, device=args.device, generator=gen).to(dtype)
        decoy = torch.randn(R, K, H, device=args.device, generator=gen).to(dtype)
        weight = (torch.randn(V, H, device=args.device, generator=gen) / H**0.5).to(dtype)
        gold_ids = torch.randint(0, V, (R, K), device=args.device, generator=gen)
        decoy_ids = (gold_ids + 1) % V
        divergent = (torch.arange(K, device=args.device) >= shape["first_at"]).expand(R, K).contiguous()
        later = R * (K - shape["first_at"] - 1)
        flops = 2 * R * 2 * H + 2 * 2 * later * V * H
        for provider in args.providers:
            base = dict(shape=shape_label(shape), provider=provider, mode="fwd")
            try:
                fn = provider_fn(provider)
            except Exception as e:  # noqa: BLE001
                results.add({**base, "error": f"{type(e).__name__}: {e}"})
                continue

            def fwd():
                with torch.no_grad():
                    return fn(gold, decoy, weight, None, gold_ids, decoy_ids, divergent)

            measure(results, base, fwd, args, flops=flops)
    emit(results, args)


if __name__ == "__main__":
    main()
