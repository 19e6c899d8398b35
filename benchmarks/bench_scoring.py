"""Benchmark: the LM-head work of one scoring phase of the belief heads, before and after the contrast kernels.

One batch of R rollouts (64 at the real shape) scored by the pmi_shift arm (contexts open, close)
and the gm arm (meta, placebo): every member's hidden states at its answers' divergent positions,
as the scorer's batched forwards leave them, go through the scorer's own LM-head code
(`selfdistill.rewards.scorer_passes`) and the arm's reward function:

- `before`: the reference path, the scorer as it was before the kernels -- one fused-linear
  log-prob per read (`ops.sequence_token_logprobs`, a vocabulary pass each, the first divergent
  position's decoy read included), then the float64 `meta_fn`;
- `after_<backend>`: the fused path under `ops.backend=<backend>` -- `ops.dispatched_gold_decoy_contrast`
  (the first divergent position one dot product with W[gold] - W[decoy], later ones both passes'
  fused-linear log-probs) and the entry's `fused_fn` on the dispatched float64 row kernels.

The model's forwards are not included (they are the same on both paths). Answers have L tokens;
row i diverges at L-3, odd rows also at L-2, every fourth at L-1 (so 1.75 divergent positions on
average). Each row reports ms, peak memory, `vocab_rows` (rows that went through a vocabulary pass)
and `max_diff` (largest |after - before| over the members; fp32 rounding). The JSON is written row
by row (benchmarks/json_rows.py).

    python benchmarks/bench_scoring.py --json scoring.json                  # real shape on CUDA
    python benchmarks/bench_scoring.py --device cpu --json scoring.json     # tiny, interpreter
"""

from __future__ import annotations

import torch

from selfdistill import ops
from selfdistill.rewards import get_reward
from selfdistill.rewards.registry import call_with_inputs
from selfdistill.rewards.scorer_passes import TokenLogprobs, answer_inputs_fused, answer_inputs_reference

from _common import dtype_of, emit, measure, open_results, parse_args, shape_label

PRESETS = {
    "real": [dict(R=64, L=8, H=4096, V=151936, dtype="bf16")],
    "small": [dict(R=64, L=8, H=512, V=32000, dtype="fp32")],
    "tiny": [dict(R=8, L=6, H=32, V=500, dtype="fp32")],
}
PROVIDERS = ["before", "after_triton", "after_cuda", "after_torch"]
ARMS = ("pmi_shift", "gm")


class _Pair:
    """An answer pair as the scorer's `AnswerPair`: gold / decoy token ids and divergent positions."""

    def __init__(self, gold: list[int], decoy: list[int], divergent: list[int]):
        self.gold, self.decoy, self.divergent = gold, decoy, divergent


def scoring_phase(shape: dict, names: list[str], device: str, gen: torch.Generator):
    """(hidden [reads, H], targets [reads], plans, row pairs) laid out as the scorer registers a belief
    head's reads: per row and context, the gold pass read at every divergent position, the decoy
    token read from the gold pass's row at the first (the same hidden state), the decoy pass read at
    the later ones."""
    R, L, H, V, dtype = shape["R"], shape["L"], shape["H"], shape["V"], dtype_of(shape["dtype"])
    pairs, plans, states, targets = [], {}, [], []

    def read(h: torch.Tensor, target: int) -> int:
        states.append(h)
        targets.append(target)
        return len(states) - 1

    for i in range(R):
        ks = [L - 3] + ([L - 2] if i % 2 else []) + ([L - 1] if i % 4 == 3 else [])
        gold = torch.randint(0, V, (L,), generator=gen).tolist()
        decoy = [(t + 1) % V if k in ks else t for k, t in enumerate(gold)]
        pairs.append(_Pair(gold, decoy, ks))
        for name in names:
            gold_states = torch.randn(len(ks), H, generator=gen)
            gold_reads = [read(gold_states[j], gold[k]) for j, k in enumerate(ks)]
            decoy_reads = [read(gold_states[0], decoy[ks[0]])] + [read(torch.randn(H, generator=gen), decoy[k]) for k in ks[1:]]
            plans.setdefault(i, {})[name] = (gold_reads, decoy_reads)
    hidden = torch.stack(states).to(device=device, dtype=dtype)
    return hidden, torch.tensor(targets, device=device), plans, pairs


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], PRESETS, PROVIDERS)
    results = open_results("scoring", args)
    for shape in args.shapes:
        gen = torch.Generator().manual_seed(0)
        dtype = dtype_of(shape["dtype"])
        weight = (torch.randn(shape["V"], shape["H"], generator=gen) * (2.0 / shape["H"] ** 0.5)).to(args.device, dtype)
        for arm in ARMS:
            spec = get_reward(arm)
            names = [n for n, _ in spec.passes.contexts]
            hidden, targets, plans, pairs = scoring_phase(shape, names, args.device, gen)
            R = shape["R"]
            base_inputs = {"correct": torch.arange(R) % 3 > 0, "member": torch.ones(R, dtype=torch.bool)}
            n_later = sum(len(p.divergent) - 1 for p in pairs) * len(names)

            def before():
                reads = TokenLogprobs(len(targets), weight, None, fused=False)
                reads.take(hidden, torch.arange(len(targets), device=args.device), targets)
                return call_with_inputs(spec.meta_fn, {**answer_inputs_reference(names, reads.out, plans, pairs), **base_inputs})

            def after():
                return call_with_inputs(spec.fused_fn, {**answer_inputs_fused(names, hidden, plans, pairs, weight, None),
                                                        **base_inputs})

            with torch.no_grad():
                want = before()
            for provider in args.providers:
                row = dict(shape=shape_label(shape), arm=arm, provider=provider, mode="fwd", reads=len(targets),
                           vocab_rows=len(targets) if provider == "before" else 2 * n_later)
                backend = "auto" if provider == "before" else provider.removeprefix("after_")
                try:
                    ops.set_backend(backend)
                    if backend == "cuda":
                        from selfdistill.ops import cuda_ext

                        cuda_ext.extension()  # build (or load) before timing
                    with torch.no_grad():
                        got = before() if provider == "before" else after()
                    row["max_diff"] = float((got.cpu() - want.cpu()).abs().nan_to_num(0.0).max())
                    if torch.isnan(got.cpu()).ne(torch.isnan(want.cpu())).any():
                        row["max_diff"] = float("inf")  # a NaN on one path only fails loudly
                    step = before if provider == "before" else after
                    measure(results, row, lambda step=step: _no_grad(step), args)
                except Exception as e:  # noqa: BLE001  (a provider that cannot run is reported, not fatal)
                    results.add({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
                finally:
                    ops.set_backend("auto")
    emit(results, args)


def _no_grad(step):
    with torch.no_grad():
        return step()


if __name__ == "__main__":
    main()
