"""Device checks of the fused ops: every implementation (Triton, csrc) against an fp64 torch
reference on the same inputs, forward and gradients, fp32 and bf16 inputs.

    python tests/gpu_checks.py --device cuda --json out.json   # on a GPU machine (compiled Triton, csrc CUDA)
    python tests/gpu_checks.py --device cpu --json out.json    # here: Triton interpreter, csrc CPU path

The rule for every output and gradient: max abs error vs fp64 <= 4x the error of torch's own fp32
reference (`selfdistill.ops.reference`) on the same inputs, or <= `FLOOR` when that is smaller.
Prints one line per check and exits 1 if any fails. tests/test_gpu_checks.py runs the CPU mode; on
a CUDA machine it runs the CUDA mode too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FLOOR = 2e-5


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before selfdistill.kernels is first imported
    import torch

    import selfdistill.kernels as kernels
    from selfdistill.ops import cuda_ext, reference

    dev = torch.device(args.device)
    small = args.device == "cpu"
    results = []

    def err(a, b):
        return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0

    def check(name, impl, ref, ref64, inputs):
        """impl / ref (torch fp32) / ref64 (fp64 math): fn(*inputs) -> tuple of outputs. Gradients of
        sum_k <out_k, w_k> (fixed random w) w.r.t. every input."""
        outs = {}
        for label, fn, cast in (("impl", impl, None), ("fp32", ref, None), ("fp64", ref64, torch.float64)):
            xs = [(t.detach().to(cast) if cast else t.detach().clone()).requires_grad_(True) for t in inputs]
            y = fn(*xs)
            g = torch.Generator(device="cpu").manual_seed(1)
            loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in y)
            loss.backward()
            outs[label] = ([o.detach() for o in y], [x.grad.detach() for x in xs])
        row = {"check": name, "ok": True, "errors": []}
        for kind, k in (("out", 0), ("grad", 1)):
            for j, (a, b, c) in enumerate(zip(outs["impl"][k], outs["fp32"][k], outs["fp64"][k])):
                ours, theirs = err(a, c), err(b, c)
                ok = ours <= max(4 * theirs, FLOOR)
                row["errors"].append({"what": f"{kind}{j}", "impl": ours, "torch_fp32": theirs, "ok": ok})
                row["ok"] &= ok
        results.append(row)
        worst = max(row["errors"], key=lambda e: e["impl"])
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {name}: worst {worst['what']} {worst['impl']:.2e} (torch fp32 {worst['torch_fp32']:.2e})")

    def lp64(logits, targets, temperature):
        lp = torch.log_softmax(logits.double() / temperature, -1)
        return lp.gather(-1, targets[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=gen) * scale).to(dev, dtype)

    N, V, H = (9, 301, 32) if small else (2048, 32000, 1024)
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        targets = torch.randint(0, V, (N,), generator=gen).to(dev)
        logits = rand(N, V, scale=3.0, dtype=dtype)
        ref = lambda x: reference.token_logprobs(x, targets, 0.7)  # noqa: E731
        ref64 = lambda x: lp64(x, targets, 0.7)  # noqa: E731
        check(f"token_logprobs/triton/{tag}", lambda x: kernels.token_logprobs(x, targets, 0.7), ref, ref64, [logits])
        check(f"token_logprobs/csrc/{tag}", lambda x: cuda_ext.token_logprobs(x, targets, 0.7), ref, ref64, [logits])
        hidden, weight = rand(N, H, dtype=dtype), rand(V, H, scale=H ** -0.5, dtype=dtype)
        check(f"fused_linear/triton/{tag}", lambda h, w: kernels.fused_linear_token_logprobs(h, w, targets, 1.0),
              lambda h, w: reference.fused_linear_token_logprobs(h, w, targets, 1.0),
              lambda h, w: lp64(h @ w.t(), targets, 1.0), [hidden, weight])

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
        for label, impl in (("triton", kernels.policy_loss), ("csrc", cuda_ext.policy_loss)):
            check(f"policy_loss/{label}/{loss_type}", lambda lp, e, impl=impl: run(impl, lp, e),
                  lambda lp, e: run(reference.policy_loss, lp, e), lambda lp, e: run(reference.policy_loss, lp, e),
                  [lp0, ent])

    R, K = (3, 5) if small else (512, 8)
    gold_ids, decoy_ids = torch.randint(0, V, (R, K), generator=gen).to(dev), torch.randint(0, V, (R, K), generator=gen).to(dev)
    divergent = torch.rand(R, K, generator=gen) < 0.7
    divergent[:, 0] = True  # every row scorable (a row without a divergent position has a NaN belief)
    divergent = divergent.to(dev)
    gl, dl = rand(R, K, V, scale=2.0), rand(R, K, V, scale=2.0)

    def contrast64(a, b):  # SPEC section 1 in fp64: first divergent position from the gold row, later ones two passes
        first = divergent & (divergent.long().cumsum(-1) == 1)
        za, zb = a.double(), b.double()
        one_row = za.gather(-1, gold_ids[..., None]).squeeze(-1) - za.gather(-1, decoy_ids[..., None]).squeeze(-1)
        two_pass = (torch.log_softmax(za, -1).gather(-1, gold_ids[..., None]).squeeze(-1)
                    - torch.log_softmax(zb, -1).gather(-1, decoy_ids[..., None]).squeeze(-1))
        c = torch.where(first, one_row, torch.where(divergent, two_pass, torch.zeros_like(one_row)))
        return c, c.sum(-1)

    for label, impl in (("triton", kernels.gold_decoy_contrast), ("csrc", cuda_ext.gold_decoy_contrast)):
        check(f"gold_decoy_contrast/{label}", lambda a, b, impl=impl: impl(a, b, gold_ids, decoy_ids, divergent),
              lambda a, b: reference.gold_decoy_contrast(a, b, gold_ids, decoy_ids, divergent), contrast64, [gl, dl])
    values, members = rand(R, K, scale=2.0), divergent
    for label, impl in (("triton", kernels.clipped_mean_min), ("csrc", cuda_ext.clipped_mean_min)):
        check(f"clipped_mean_min/{label}", lambda x, impl=impl: (impl(x, members),),
              lambda x: (reference.clipped_mean_min(x, members),), lambda x: (reference.clipped_mean_min(x, members),), [values])

    ok = all(r["ok"] for r in results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "torch": torch.__version__, "floor": FLOOR, "ok": ok, "checks": results}, f, indent=1)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
