"""SDFT: the evolved recipe's score vs the baseline's after 30 steps (issue 12, result 1).

For each seed, one SFT run (the tiny model on the synthetic task, `experiment=sdft_baseline`'s SFT);
from that checkpoint `experiment=sdft_baseline` and `experiment=sdft_evolved` each run their 30 SDFT
steps (offline: the frozen SFT teacher reads the row's worked solution and writes completions, the
student learns them from the plain prompt). The score is 1 / (1 + eval token loss) on the frozen
teacher's greedy completions of 50 held-out rows, logged at each of the recipe's evals (every 15
steps for the baseline, every 5 for the evolved recipe); the table shows the last one (step 30).

    python benchmarks/sdft_recipes.py --json sdft.json                  # 3 seeds, both recipes
    python benchmarks/sdft_recipes.py --seeds 0 --smoke --json s.json    # the tiny path only (tests)
    python benchmarks/sdft_recipes.py algo.sdft.mode=online              # extra Hydra overrides for every run
"""

from __future__ import annotations

import json
import os
import tempfile

from _experiments import SMOKE_MODEL, common_overrides, machine, markdown, mean_sd, parse_args, sft_checkpoint, train

RECIPES = ("sdft_baseline", "sdft_evolved")
SMOKE = [*SMOKE_MODEL, "sft.steps=4", "sft.batch_size=8", "sft.warmup_steps=1", "sdft.steps=3", "sdft.batch_size=4",
         "sdft.eval_every=2", "sdft.train_pairs=12", "sdft.eval_prompts=4", "rollout.max_new_tokens=12",
         "data.synthetic.num_train=64", "data.synthetic.num_eval=8", "reward.grader_workers=1"]


def recipe_result(rows: list[dict], seconds: float) -> dict:
    sdft = [r for r in rows if r["stage"] == "sdft"]
    first = sdft[0]["step"] - 1
    evals = [{"step": r["step"] - first, "eval_token_loss": r["sdft/eval_token_loss"], "score": r["sdft/score"]}
             for r in sdft if "sdft/score" in r]
    return {"final_score": evals[-1]["score"], "final_eval_token_loss": evals[-1]["eval_token_loss"], "evals": evals,
            "train_loss_first": sdft[0]["loss"], "train_loss_last": sdft[-1]["loss"], "steps": len(sdft), "wall_s": seconds}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    common = common_overrides(args, SMOKE)
    root = args.out or tempfile.mkdtemp(prefix="sdft_recipes_")
    results: dict[str, dict[int, dict]] = {r: {} for r in RECIPES}
    sft_s = {}
    for seed in args.seeds:
        ckpt, sft_s[seed] = sft_checkpoint([f"experiment={RECIPES[0]}", f"seed={seed}", *common], os.path.join(root, f"sft-{seed}"))
        for recipe in RECIPES:
            rows, seconds = train([f"experiment={recipe}", f"seed={seed}", *common, f"trainer.resume={ckpt}"],
                                  os.path.join(root, f"{recipe}-{seed}"))
            results[recipe][seed] = recipe_result(rows, seconds)
            print(f"[sdft_recipes] seed {seed} {recipe}: score {results[recipe][seed]['final_score']:.4f} ({seconds:.0f} s)", flush=True)

    header = ["recipe", *[f"seed {s}" for s in args.seeds], "mean ± sd", "eval token loss (mean ± sd)", "wall s / run"]
    table = [[r, *[results[r][s]["final_score"] for s in args.seeds], mean_sd([results[r][s]["final_score"] for s in args.seeds]),
              mean_sd([results[r][s]["final_eval_token_loss"] for s in args.seeds]),
              f"{sum(results[r][s]['wall_s'] for s in args.seeds) / len(args.seeds):.0f}"] for r in RECIPES]
    diff = [results["sdft_evolved"][s]["final_score"] - results["sdft_baseline"][s]["final_score"] for s in args.seeds]
    table.append(["evolved - baseline", *diff, mean_sd(diff), "", ""])
    print(f"\nSDFT score 1/(1 + eval token loss) after the last step{' (SMOKE: tiny, meaningless)' if args.smoke else ''}\n")
    print(markdown(header, table))
    print("\nScore at each eval (step: score), per seed")
    for r in RECIPES:
        for s in args.seeds:
            print(f"- {r} seed {s}: " + ", ".join(f"{e['step']}: {e['score']:.4f}" for e in results[r][s]["evals"]))
    if args.json:
        doc = {"benchmark": "sdft_recipes", **machine(), "seeds": args.seeds, "smoke": args.smoke, "overrides": common,
               "runs_dir": root, "sft_wall_s": sft_s, "recipes": results, "evolved_minus_baseline": dict(zip(args.seeds, diff))}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, allow_nan=True)


if __name__ == "__main__":
    main()
