"""End-to-end GRPO step: seconds per phase (rollout, grade, score, update) for each reward arm.

Every arm starts from one shared SFT checkpoint (the twin start) and runs `--steps` GRPO steps with
the same rollout count (grpo.batch_size x rollout.n); the phase times are the trainer's own
`perf/<phase>_s` metrics, medians over the steps after the first (warm-up). "score" is the reward
phase: reward heads (the scorer's passes for pmi / gm / pmi_shift) and advantage assembly.

The issue's target: scoring adds at most 25% to a base step. Two estimates of that share:
- `score_overhead_same_step`: per step, (score_s - base score_s) / (rollout + grade + update of the
  same step + base score_s), median over steps. The arms are twins with equal rollout counts, so the
  step's other phases stand in for the base step measured under the same machine load; this is the
  headline, robust when other jobs share the CPU.
- `score_overhead_vs_base_step`: (score_s - base score_s) / base step_s, across runs (load drift
  between the runs enters it).
How much the belief arms score depends on how many rollouts wrote a closed meta block, so the
script also times the scorer alone on a batch where every rollout has one (`all_meta`: R distinct
prompts, each completed by its worked solution with a meta block, the SFT model as scorer;
`member_frac` says how many the head scored after its membership rules), the worst case, against
`pooled_step_s` (median over every arm's steps of rollout + grade + update, plus base score_s).

    python benchmarks/bench_step.py --json out.json
    python benchmarks/bench_step.py --arms base,pmi_shift --steps 4 --engine single --json out.json
    python benchmarks/bench_step.py --model-size full --sft-steps 150      # the demo's tiny model
    python benchmarks/bench_step.py --arms base --engine fsdp2 --json fsdp2.json  # per engine: tokens/s, peak memory
    python benchmarks/bench_step.py --setting trl --json trl_setting.json     # issue 17's setting (bench_vs_trl.py)

`--setting trl` is the setting of the TRL comparison (`TRL_SETTING`, benchmarks/bench_vs_trl.py):
a random-init Qwen3-shaped model (hidden 256, 4 layers, 4 query / 2 KV heads, head_dim 64, FFN
512, tied embeddings, char vocabulary), 8 prompts x 8 completions x <= 64 new tokens at T=1.0,
dapo, no KL, one optimizer step on all 64 completions, fp32, 2 threads; no SFT, base arm only.

Per arm it also reports `tokens_per_s` (completion tokens over the step time, median) and
`peak_mem_mb` (CUDA: peak allocated during that arm's run; CPU: the process's peak RSS so far).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ARMS = ("base", "pmi", "cf", "gm", "asym_cf", "pmi_shift")
PHASES = ("rollout", "grade", "score", "update")
TARGET = 0.25
# A smaller tiny model for 2-core CPUs (`--model-size small`); `full` keeps model/tiny.yaml.
SMALL_MODEL = ["model.tiny.hidden_size=96", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=3",
               "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=256"]


# Issue 17's setting, shared with bench_vs_trl.py and bench_rollout.py.
TRL_SETTING = [
    "model.tiny.hidden_size=256", "model.tiny.num_hidden_layers=4", "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=2", "model.tiny.head_dim=64", "model.tiny.intermediate_size=512",
    "model.tiny.tie_word_embeddings=true", "model.dtype=float32", "engine=single",
    "grpo.batch_size=8", "rollout.n=8", "rollout.max_new_tokens=64", "rollout.temperature=1.0", "rollout.top_p=1.0",
    "algo.loss_type=dapo", "algo.kl_coef=0.0", "algo.entropy_coef=0.0", "algo.ppo_epochs=1", "algo.num_minibatches=1",
    "algo.filter_zero_std=false", "grpo.warmup_steps=0", "grpo.schedule=constant", "grpo.weight_decay=0.0",
    "grpo.grad_clip=1.0", "grpo.betas=[0.9,0.99]", "trainer.stages=[grpo]", "trainer.progress=false",
    "trainer.tensorboard=false", "trainer.save_every=0",
]


def machine_description(threads: int) -> dict:
    """What the numbers were measured on: CPU model, cores, load, library versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return {"device": "cuda" if torch.cuda.is_available() else "cpu",
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
            "cpu_count": os.cpu_count(), "torch_threads": threads, "load_avg_1m": os.getloadavg()[0],
            "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=("default", "trl"), default="default",
                   help="trl: issue 17's setting (TRL_SETTING; random init, no SFT, base arm only, 2 threads)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list out of {','.join(ARMS)} (base is always run)")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per arm; the first is warm-up and not averaged")
    p.add_argument("--engine", default=None, help="passed through as the Hydra override engine=<name>")
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4, help="prompts per GRPO step")
    p.add_argument("--n", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=56)
    p.add_argument("--model-size", choices=("small", "full"), default="small")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (trainer.torch_threads); 0 = torch's default. On a CPU shared with "
                        "other jobs more threads than free cores spin-wait and make timings 10-40x noisier")
    p.add_argument("--reps", type=int, default=5, help="repetitions of the all-meta scorer timing (median)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (key=value)")
    args = p.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {','.join(ARMS)}")
    args.arms = ["base"] + [a for a in arms if a != "base"]
    if args.setting == "trl":
        args.arms, args.batch_size, args.n, args.max_new_tokens = ["base"], 8, 8, 64
        args.threads = 2 if args.threads == 1 else args.threads
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    return args


def common_overrides(args) -> list[str]:
    if args.setting == "trl":
        return [*TRL_SETTING, f"grpo.steps={args.steps}", f"trainer.torch_threads={args.threads}", *args.overrides]
    out = [
        f"sft.steps={args.sft_steps}", "sft.batch_size=32", "sft.warmup_steps=5",
        f"grpo.steps={args.steps}", f"grpo.batch_size={args.batch_size}", f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}", "data.synthetic.num_train=2000", "data.synthetic.num_eval=8",
        "data.synthetic.meta_fraction=1.0",  # a meta block in every SFT solution: many members, worst case for scoring
        "reward.meta_warmup_steps=1", "trainer.stages=[sft,grpo]", "trainer.progress=false", "trainer.tensorboard=false",
    ]
    if args.model_size == "small":
        out += SMALL_MODEL
    if args.engine:
        out.append(f"engine={args.engine}")
    if args.threads:
        out.append(f"trainer.torch_threads={args.threads}")
    return out + list(args.overrides)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from selfdistill.config import register_configs, validate

    register_configs()
    with initialize_config_module(config_module="selfdistill.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate(cfg)
    return OmegaConf.to_object(cfg)


def run_sft(overrides: list[str], root: str) -> str:
    from selfdistill import checkpoint as ckpt
    from selfdistill.trainer import Trainer

    run_dir = os.path.join(root, "sft")
    Trainer(compose(["experiment=base", *overrides, "trainer.stages=[sft]"]), run_dir).run()
    return ckpt.find_latest(run_dir)


def run_arm(arm: str, overrides: list[str], sft_ckpt: str, root: str) -> tuple[dict, list[dict]]:
    """(summary of the steps after warm-up, those steps' metric rows)."""
    from selfdistill.metrics import read_metrics
    from selfdistill.trainer import Trainer

    run_dir = os.path.join(root, arm)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resume = [f"trainer.resume={sft_ckpt}"] if sft_ckpt else []  # the trl setting starts from random init
    Trainer(compose([f"experiment={arm}", *overrides, *resume]), run_dir).run()
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["stage"] == "grpo"][1:]
    out = {f"{ph}_s": statistics.median(r[f"perf/{ph}_s"] for r in rows) for ph in PHASES}
    out["step_s"] = statistics.median(sum(r[f"perf/{ph}_s"] for ph in PHASES) for r in rows)
    out["tokens_per_s"] = statistics.median(r["perf/tokens_per_s"] for r in rows)  # completion tokens / step time
    out.update(peak_memory())
    for key in ("meta/emission_rate", f"reward/{arm}/nan_frac", "scorer/sequences", "scorer/tokens", "accuracy"):
        if key in rows[0]:
            out[key] = statistics.mean(r[key] for r in rows)
    out["steps_measured"] = len(rows)
    return out, rows


def peak_memory() -> dict:
    """CUDA: peak allocated by this arm's run (reset before it). CPU: the process's peak RSS so far
    (monotone over the runs of one invocation; run one arm per invocation to attribute it)."""
    if torch.cuda.is_available():
        return {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_mem_kind": "cuda_allocated"}
    import resource

    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_mem_kind": "process_max_rss"}


def non_scoring_s(row: dict) -> float:
    return sum(row[f"perf/{ph}_s"] for ph in PHASES if ph != "score")


def all_meta_scoring(arm: str, sft_ckpt: str, overrides: list[str], rollouts: int, reps: int) -> dict:
    """score_meta_head on `rollouts` distinct prompts, each completed by its worked solution (with a
    meta block), the SFT checkpoint as scorer. Median of `reps` calls after one warm-up call."""
    from selfdistill.data import encode_prompt, load_splits
    from selfdistill.models import load_model_and_tokenizer, meta_token_ids
    from selfdistill.rewards.grader import extract_boxed_answer
    from selfdistill.rewards.meta_scorer import score_meta_head
    from selfdistill.rewards.regions import rollout_outside_meta_texts
    from selfdistill.rollout.base import RolloutBatch

    cfg = compose([f"experiment={arm}", *overrides])
    cfg.model.path = sft_ckpt
    model, tok = load_model_and_tokenizer(cfg.model)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "cpu")
    model = model.to(device).eval().requires_grad_(False)
    train, _ = load_splits(cfg.data)
    exs = [e for e in train if e.extra.get("has_meta")][:rollouts]
    comps = [tok(e.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in exs]
    T = max(len(c) for c in comps)
    ids = torch.full((len(exs), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(exs), T), dtype=torch.bool)
    for i, c in enumerate(comps):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), True
    R, n = len(exs), cfg.rollout.n
    if cfg.rollout.split_arms:  # cf / asym_cf: groups of n, n/2 per arm (they run no scorer pass)
        group_ids, with_arm, examples = torch.arange(R) // n, torch.arange(R) % n < n // 2, exs[::n]
    else:  # belief heads: every rollout its own prompt and example, so no pass is shared
        group_ids, with_arm, examples = torch.arange(R), torch.ones(R, dtype=torch.bool), exs
    batch = RolloutBatch([encode_prompt(tok, e, cfg.data) for e in exs], ids, mask, torch.zeros_like(mask),
                         group_ids, with_arm, [e.solution for e in exs])
    answers = [extract_boxed_answer(p) for p in rollout_outside_meta_texts(batch, tok, meta_token_ids(tok))]
    grades = torch.tensor([1 if a == e.gold else 0 for a, e in zip(answers, exs)])
    times, metrics = [], {}
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        values, _, metrics = score_meta_head(cfg.reward, batch, grades, examples, model, tok, meta_token_ids(tok))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"rollouts": R, "score_s": statistics.median(times[1:]), "member_frac": float(torch.isfinite(values).double().mean()),
            "scorer/sequences": metrics.get("scorer/sequences", 0.0), "scorer/tokens": metrics.get("scorer/tokens", 0.0)}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = common_overrides(args)
    R = args.batch_size * args.n
    root = tempfile.mkdtemp(prefix="bench_step_")
    t0 = time.perf_counter()
    sft_ckpt = run_sft(overrides, root) if args.setting == "default" else None
    sft_s = time.perf_counter() - t0
    runs = {arm: run_arm(arm, overrides, sft_ckpt, root) for arm in args.arms}
    arms = {arm: summary for arm, (summary, _) in runs.items()}
    base_score = arms["base"]["score_s"]
    pooled_step = statistics.median(non_scoring_s(r) for _, rows in runs.values() for r in rows) + base_score
    all_meta = {arm: all_meta_scoring(arm, sft_ckpt, overrides, R, args.reps) for arm in args.arms if arm != "base"}
    for arm, (row, steps) in runs.items():
        row["score_overhead_same_step"] = statistics.median(
            (r["perf/score_s"] - base_score) / (non_scoring_s(r) + base_score) for r in steps)
        row["score_overhead_vs_base_step"] = (row["score_s"] - base_score) / arms["base"]["step_s"]
        if arm in all_meta:
            all_meta[arm]["overhead_vs_pooled_step"] = all_meta[arm]["score_s"] / pooled_step
    doc = {
        "benchmark": "bench_step",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_end": os.getloadavg()[0], "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": machine_description(torch.get_num_threads()),
        "settings": {"setting": args.setting, "arms": args.arms, "grpo_steps": args.steps, "steps_averaged": args.steps - 1, "sft_steps": args.sft_steps,
                     "rollouts_per_step": R, "max_new_tokens": args.max_new_tokens, "model_size": args.model_size,
                     "engine": args.engine or "single", "overrides": overrides},
        "sft_s": sft_s,
        "pooled_step_s": pooled_step,
        "target_score_overhead": TARGET,
        "arms": arms,
        "all_meta": all_meta,
        "step_rows": {arm: [{k: v for k, v in r.items() if k == "step" or k.startswith("perf/")} for r in rows]
                      for arm, (_, rows) in runs.items()},
    }
    print(f"# bench_step on {doc['device']} ({doc['device_name']}, {doc['cpu_count']} cores), {R} rollouts/step, "
          f"median of {args.steps - 1} steps after warm-up; overhead = (score - base score) / same step's other phases + base score")
    cols = ["arm", *[f"{p}_s" for p in PHASES], "step_s", "tokens/s", "peak_MB", "overhead", "emission", "members", "allmeta_s",
            "allmeta_ovh"]
    print(" | ".join(f"{c:>12}" for c in cols))
    for arm, row in arms.items():
        f = all_meta.get(arm, {})
        cells = [arm, *[row[f"{p}_s"] for p in PHASES], row["step_s"], row["tokens_per_s"], row["peak_mem_mb"], row["score_overhead_same_step"],
                 row.get("meta/emission_rate", float("nan")), 1 - row.get(f"reward/{arm}/nan_frac", float("nan")),
                 f.get("score_s", float("nan")), f.get("overhead_vs_pooled_step", float("nan"))]
        print(" | ".join(f"{c:>12.3f}" if isinstance(c, float) else f"{c:>12}" for c in cells))
    worst = max((r["score_overhead_same_step"] for a, r in arms.items() if a != "base"), default=0.0)
    worst_all_meta = max((f["overhead_vs_pooled_step"] for f in all_meta.values()), default=0.0)
    print(f"scoring overhead vs base step: worst arm {worst:.1%} in training, {worst_all_meta:.1%} with a meta block in every rollout "
          f"(target <= {TARGET:.0%})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2, allow_nan=True)


if __name__ == "__main__":
    main()
