"""SDPO vs GRPO (`base`) from the same SFT checkpoint (issue 12, result 2), and teacher=frozen vs ema.

For each seed, one SFT run of the demo recipe; from that checkpoint three arms run the same rollouts
per step (16 prompts x 8 at T=0.6) for the same steps (80): `experiment=base` (GRPO),
`experiment=sdpo` (frozen teacher, pure distillation) and `experiment=sdpo algo.distill.teacher=ema`
(tau 0.05; the SDPO notes report teacher collapse with an EMA teacher). Reported: held-out accuracy
after SFT and after RL (greedy, 300 rows), the entropy trajectory (mean of the first / last 10 steps,
and every step in the JSON), the meta emission rate likewise, train accuracy of the last 10 steps and,
for SDPO, the teacher-student KL (teacher collapse drives it to 0) and the share of rollouts that had
a teacher.

    python benchmarks/sdpo_vs_grpo.py --json sdpo.json                  # 3 seeds x 3 arms
    python benchmarks/sdpo_vs_grpo.py --seeds 0 --smoke --json s.json    # the tiny path only (tests)
    python benchmarks/sdpo_vs_grpo.py --arms grpo,sdpo_frozen algo.distill.feedback=true
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from _experiments import SMOKE_MODEL, common_overrides, machine, markdown, mean_sd, parse_args, sft_checkpoint, train

ARMS = {
    "grpo": ["experiment=base"],
    "sdpo_frozen": ["experiment=sdpo", "algo.distill.teacher=frozen"],
    "sdpo_ema": ["experiment=sdpo", "algo.distill.teacher=ema"],
}
WINDOW = 10  # steps averaged at the start and the end of a trajectory
SMOKE = [*SMOKE_MODEL, "sft.steps=4", "sft.batch_size=8", "sft.warmup_steps=1", "grpo.steps=3", "grpo.batch_size=2",
         "sdpo.steps=3", "sdpo.batch_size=2", "rollout.n=4", "rollout.max_new_tokens=16", "eval.max_new_tokens=16",
         "data.synthetic.num_train=64", "data.synthetic.num_eval=8", "reward.grader_workers=1"]
SERIES = {"entropy": "entropy", "emission": "meta/emission_rate", "accuracy": "accuracy",
          "teacher_student_kl": "self_distillation/teacher_student_kl", "teacher_fraction": "self_distillation/teacher_fraction"}


def arm_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list out of {','.join(ARMS)}")


def window_mean(values: list[float], last: bool) -> float:
    values = values[-WINDOW:] if last else values[:WINDOW]
    return statistics.mean(values) if values else float("nan")


def arm_result(rows: list[dict], seconds: float) -> dict:
    evals = {r["after"]: r["heldout/accuracy"] for r in rows if r["stage"] == "eval"}
    steps = [r for r in rows if r["stage"] in ("grpo", "sdpo")]
    out = {"heldout_after_sft": evals.get("sft", float("nan")),
           "heldout_after_rl": evals.get(steps[0]["stage"], float("nan")) if steps else float("nan"),
           "steps": len(steps), "wall_s": seconds}
    for name, key in SERIES.items():
        series = [r[key] for r in steps if key in r]
        if series:
            out[name] = series
            out[f"{name}_first"], out[f"{name}_last"] = window_mean(series, last=False), window_mean(series, last=True)
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], arm_option)
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {','.join(ARMS)}")
    common = common_overrides(args, SMOKE)
    root = args.out or tempfile.mkdtemp(prefix="sdpo_vs_grpo_")
    results: dict[str, dict[int, dict]] = {a: {} for a in args.arms}
    sft_s = {}
    for seed in args.seeds:
        ckpt, sft_s[seed] = sft_checkpoint(["experiment=base", f"seed={seed}", *common], os.path.join(root, f"sft-{seed}"))
        for arm in args.arms:
            rows, seconds = train([*ARMS[arm], f"seed={seed}", *common, f"trainer.resume={ckpt}"], os.path.join(root, f"{arm}-{seed}"))
            results[arm][seed] = r = arm_result(rows, seconds)
            print(f"[sdpo_vs_grpo] seed {seed} {arm}: held-out {r['heldout_after_sft']:.3f} -> {r['heldout_after_rl']:.3f} "
                  f"({seconds:.0f} s)", flush=True)

    def col(arm, key):
        return mean_sd([results[arm][s].get(key, float("nan")) for s in args.seeds])

    header = ["arm", "held-out after SFT", "held-out after RL", f"entropy first/last {WINDOW}", f"emission first/last {WINDOW}",
              f"train acc last {WINDOW}", f"teacher-student KL first/last {WINDOW}", "teacher fraction", "wall s / run"]
    table = [[arm, col(arm, "heldout_after_sft"), col(arm, "heldout_after_rl"),
              f"{col(arm, 'entropy_first')} / {col(arm, 'entropy_last')}",
              f"{col(arm, 'emission_first')} / {col(arm, 'emission_last')}", col(arm, "accuracy_last"),
              f"{col(arm, 'teacher_student_kl_first')} / {col(arm, 'teacher_student_kl_last')}" if arm != "grpo" else "-",
              col(arm, "teacher_fraction_last") if arm != "grpo" else "-",
              f"{statistics.mean(results[arm][s]['wall_s'] for s in args.seeds):.0f}"] for arm in args.arms]
    print(f"\nSDPO vs GRPO, mean ± sd over seeds {args.seeds}{' (SMOKE: tiny, meaningless)' if args.smoke else ''}\n")
    print(markdown(header, table))
    print("\nPer seed: held-out after RL")
    print(markdown(["arm", *[f"seed {s}" for s in args.seeds]],
                   [[a, *[results[a][s]["heldout_after_rl"] for s in args.seeds]] for a in args.arms]))
    if args.json:
        doc = {"benchmark": "sdpo_vs_grpo", **machine(), "seeds": args.seeds, "smoke": args.smoke, "overrides": common,
               "arms_overrides": {a: ARMS[a] for a in args.arms}, "runs_dir": root, "sft_wall_s": sft_s, "arms": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, allow_nan=True)


if __name__ == "__main__":
    main()
