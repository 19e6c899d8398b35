"""Microbenchmark: fused clipped-ratio policy loss with ramp weights (kernels/policy_loss.py).

Config: GRPO aggregation, clip-higher, dual clip 3, k3 KL (coef 0.01), entropy bonus 0.001, ramp
token weights, 70% of tokens in the loss mask. Providers: `torch_reference`
(selfdistill.ops.reference, eager), `torch_compile` (torch.compile of the reference), `triton`
(selfdistill.kernels), `cuda` (the csrc extension). Mode fwd_bwd (the step does both).
Throughput: bytes of the [B, T] inputs read (logp, old, adv, ref, entropy fp32; mask 1 byte) plus the two fp32 gradients written.

    python benchmarks/bench_policy_loss.py --json out.json
    python benchmarks/bench_policy_loss.py --device cpu --json out.json
"""

from __future__ import annotations

import torch

from _common import compiled, emit, kernels, measure, open_results, parse_args, shape_label

PRESETS = {
    "real": [dict(B=16, T=1024), dict(B=256, T=2048), dict(B=64, T=8192)],
    "small": [dict(B=64, T=512)],
    "tiny": [dict(B=4, T=40)],
}
PROVIDERS = ["torch_reference", "torch_compile", "triton", "cuda"]
OPTIONS = dict(loss_type="grpo", dual_clip=3.0, kl_coef=0.01, kl_estimator="k3", entropy_coef=0.001, token_weighting="ramp")


def provider_fn(name: str):
    from selfdistill.ops.reference import policy_loss

    if name == "torch_reference":
        return policy_loss
    if name == "torch_compile":
        return compiled(policy_loss)
    if name == "triton":
        return kernels().policy_loss
    if name == "cuda":
        from selfdistill.ops import cuda_ext

        cuda_ext.extension()  # build (or load) before timing
        return cuda_ext.policy_loss
    raise ValueError(name)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], PRESETS, PROVIDERS)
    results = open_results("policy_loss", args)
    for shape in args.shapes:
        B, T = shape["B"], shape["T"]
        dev = args.device
        gen = torch.Generator(device=dev).manual_seed(0)
        logp = -torch.rand(B, T, device=dev, generator=gen) * 3
        old = logp + 0.2 * torch.randn(B, T, device=dev, generator=gen)
        ref = logp + 0.2 * torch.randn(B, T, device=dev, generator=gen)
        entropy = torch.rand(B, T, device=dev, generator=gen) * 2
        adv = torch.randn(B, T, device=dev, generator=gen)
        mask = torch.rand(B, T, device=dev, generator=gen) < 0.7
        lengths = torch.randint(1, T + 1, (B,), device=dev, generator=gen)
        for provider in args.providers:
            base = dict(shape=shape_label(shape), provider=provider, mode="fwd_bwd")
            try:
                fn = provider_fn(provider)
            except Exception as e:  # noqa: BLE001
                results.add({**base, "error": f"{type(e).__name__}: {e}"})
                continue

            def fwd_bwd():
                lp, ent = logp.detach().requires_grad_(), entropy.detach().requires_grad_()
                loss, _ = fn(lp, old, adv, mask, lengths, ref_logp=ref, entropy=ent, **OPTIONS)
                loss.backward()
                return lp.grad, ent.grad

            measure(results, base, fwd_bwd, args, bytes_moved=B * T * (5 * 4 + 1 + 2 * 4))
    emit(results, args)


if __name__ == "__main__":
    main()
