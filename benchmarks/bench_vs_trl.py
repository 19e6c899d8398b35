"""Our GRPO step against TRL's GRPOTrainer at identical settings: generated tokens per second.

The setting (issue 17; `bench_step.TRL_SETTING`): one random-init Qwen3-shaped model (hidden 256,
4 layers, 4 query / 2 KV heads, head_dim 64, FFN 512, tied embeddings, the char vocabulary), saved
once and loaded by both trainers, so both start from the same weights; 8 prompts x 8 completions x
<= 64 new tokens at T=1.0 (top_p 1, no top-k); the dapo loss, no KL, no entropy bonus, one
optimizer step on all 64 completions in one micro-batch; AdamW (0.9, 0.99), lr 1e-5 constant,
grad clip 1.0; fp32; `--threads` torch threads; the same synthetic prompts (chat-templated by the
same tokenizer) and the same correctness grader as the reward.

Each side runs in its own process (`--side ours|trl`, started by this script), the two back to back
for `--rounds` rounds (ours, trl, ours, trl, ...) so both see the same machine load. Per step:
`step_s` (whole step: generation, reward, loss, backward, optimizer), `generate_s` (ours: the
trainer's rollout phase; TRL: the time inside `model.generate`), `rest_s`, completion `tokens`
(up to and including EOS, as both trainers count them) and `tokens_per_s`. The summary takes the
median over every round's steps after each run's first (warm-up) and reports
`ratio_tokens_per_s` = ours / TRL.

    python benchmarks/bench_vs_trl.py --json vs_trl.json
    python benchmarks/bench_vs_trl.py --steps 4 --rounds 1 --threads 1 --json smoke.json   # quick

TRL is a benchmark-only dependency (`pip install trl==1.16.0`); nothing in the package imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_step import TRL_SETTING, machine_description  # noqa: E402

LR = 1e-5
SUMMARY_KEYS = ("step_s", "generate_s", "rest_s", "tokens", "tokens_per_s", "step_cpu_s", "generate_cpu_s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per run; the first is warm-up and not counted")
    p.add_argument("--rounds", type=int, default=2, help="ours-then-TRL runs, back to back")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both trainers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows and the summary to this file")
    p.add_argument("--side", choices=("ours", "trl"), default=None, help=argparse.SUPPRESS)  # one run, internal
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for our side (key=value)")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    return args


def compose(overrides: list[str]):
    from bench_step import compose as compose_config

    return compose_config(["experiment=base", *TRL_SETTING, *overrides])


def save_initial_model(cfg, seed: int, path: str) -> None:
    """The random-init model both trainers start from, as an HF checkpoint directory."""
    import torch

    from selfdistill.models import load_model_and_tokenizer

    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(cfg.model)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def run_ours(args) -> list[dict]:
    from selfdistill.metrics import read_metrics
    from selfdistill.stages import grpo as grpo_stage
    from selfdistill.trainer import Trainer

    cpu = {"generate_cpu_s": [], "update_cpu_s": []}  # per step: process CPU time of the rollout phase and the update
    for name, key in (("collect_rollouts", "generate_cpu_s"), ("update_policy", "update_cpu_s")):
        setattr(grpo_stage, name, _cpu_timed(getattr(grpo_stage, name), cpu[key]))

    cfg = compose([f"grpo.steps={args.steps}", f"grpo.lr={LR}", f"model.path={args.model_dir}", f"seed={args.seed}",
                   f"trainer.torch_threads={args.threads}", *args.overrides])
    run_dir = tempfile.mkdtemp(prefix="vs_trl_ours_")
    Trainer(cfg, run_dir).run()
    rows = []
    for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        if r.get("stage") != "grpo":
            continue
        tokens = r["perf/tokens_per_s"] * r["perf/step_s"]
        i = len(rows)
        rows.append({"step": r["step"], "step_s": r["perf/step_s"], "generate_s": r["perf/rollout_s"],
                     "rest_s": r["perf/step_s"] - r["perf/rollout_s"], "tokens": round(tokens),
                     "tokens_per_s": r["perf/tokens_per_s"],
                     "generate_cpu_s": cpu["generate_cpu_s"][i], "step_cpu_s": cpu["generate_cpu_s"][i] + cpu["update_cpu_s"][i]})
    return rows


def _cpu_timed(fn, out: list):
    """`fn`, appending the process CPU time of each call to `out`."""
    def timed(*a, **kw):
        t = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            out.append(time.process_time() - t)
    return timed


def run_trl(args) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from selfdistill.data import load_splits
    from selfdistill.rewards.grader import Grader

    torch.set_num_threads(args.threads)
    cfg = compose([])
    train, _ = load_splits(cfg.data)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    grader = Grader(timeout_s=cfg.reward.grader_timeout_s, workers=cfg.reward.grader_workers)
    dataset = Dataset.from_list([{"prompt": list(ex.prompt), "gold": ex.gold} for ex in train])

    def correctness(completions, gold, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        # TRL hands over decoded texts: grade each as one outside-meta piece (the meta grammar is
        # token-level; for this timing comparison the grader's work per rollout is what matters)
        return [float(g == 1) for g in grader.grade([[t] for t in texts], list(gold))]

    timing = {"generate_s": 0.0, "generate_cpu_s": 0.0}
    generate = model.generate

    def timed_generate(*a, **kw):
        t, c = time.perf_counter(), time.process_time()
        try:
            return generate(*a, **kw)
        finally:
            timing["generate_s"] += time.perf_counter() - t
            timing["generate_cpu_s"] += time.process_time() - c

    model.generate = timed_generate
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            timing.update(t0=time.perf_counter(), c0=time.process_time(), generate_s=0.0, generate_cpu_s=0.0)

        def on_step_end(self, *_a, **_k):
            steps.append({"step_s": time.perf_counter() - timing["t0"], "generate_s": timing["generate_s"],
                          "step_cpu_s": time.process_time() - timing["c0"], "generate_cpu_s": timing["generate_cpu_s"]})

    n = 8  # TRL_SETTING: rollout.n
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_trl_"), max_steps=args.steps, per_device_train_batch_size=8 * n,
        num_generations=n, gradient_accumulation_steps=1, max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=1.0, top_k=0, loss_type="dapo", beta=0.0, num_iterations=1,
        epsilon=cfg.algo.clip_low, epsilon_high=cfg.algo.clip_high, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, use_cpu=True,
        bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=args.seed, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    grader.close()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    rows = []
    for i, (s, log) in enumerate(zip(steps, logs)):
        tokens = log["completions/mean_length"] * 8 * n
        rows.append({"step": i + 1, "step_s": s["step_s"], "generate_s": s["generate_s"],
                     "rest_s": s["step_s"] - s["generate_s"], "tokens": round(tokens), "tokens_per_s": tokens / s["step_s"],
                     "generate_cpu_s": s["generate_cpu_s"], "step_cpu_s": s["step_cpu_s"]})
    return rows


def summarize(rows: list[dict], side: str) -> dict:
    measured = [r for r in rows if r["side"] == side and r["step"] > 1]
    out = {k: statistics.median(r[k] for r in measured) for k in SUMMARY_KEYS}
    out["tokens_per_cpu_s"] = statistics.median(r["tokens"] / r["step_cpu_s"] for r in measured)
    return out | {"steps_measured": len(measured)}


def main() -> None:
    args = parse_args()
    if args.side:  # one run, in its own process
        rows = run_ours(args) if args.side == "ours" else run_trl(args)
        with open(args.out, "w") as f:
            json.dump(rows, f)
        return
    work = tempfile.mkdtemp(prefix="vs_trl_")
    model_dir = os.path.join(work, "init")
    save_initial_model(compose([]), args.seed, model_dir)
    machine_before = machine_description(args.threads)
    rows = []
    for rnd in range(args.rounds):
        for side in ("ours", "trl"):
            out = os.path.join(work, f"{side}-{rnd}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model-dir", model_dir, "--out", out,
                   "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed), *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode != 0:
                sys.exit(f"{side} run {rnd} failed:\n{proc.stderr[-4000:]}")
            for r in json.load(open(out)):
                row = {"side": side, "round": rnd, **r}
                rows.append(row)
                print(json.dumps(row))
    summary = {side: summarize(rows, side) for side in ("ours", "trl")}
    ratio = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    cpu_ratio = summary["ours"]["tokens_per_cpu_s"] / summary["trl"]["tokens_per_cpu_s"]
    doc = {"benchmark": "bench_vs_trl", "machine": machine_before, "load_avg_1m_at_end": os.getloadavg()[0],
           "settings": {"steps": args.steps, "rounds": args.rounds, "threads": args.threads, "seed": args.seed, "lr": LR,
                        "ours_overrides": [*TRL_SETTING, *args.overrides]},
           "rows": rows, "summary": summary, "ratio_tokens_per_s": ratio,
           "ratio_tokens_per_cpu_s": cpu_ratio, "target_ratio": 2.0}
    print(f"# bench_vs_trl: median over {summary['ours']['steps_measured']} (ours) / {summary['trl']['steps_measured']} (TRL) steps "
          f"after warm-up, {args.threads} threads, load avg {doc['load_avg_1m_at_end']:.1f}")
    cols = ("step_s", "generate_s", "rest_s", "tokens", "tokens_per_s", "step_cpu_s", "generate_cpu_s", "tokens_per_cpu_s")
    print(" | ".join(f"{c:>14}" for c in ("side", *cols)))
    for side, s in summary.items():
        print(" | ".join([f"{side:>14}", *(f"{s[k]:>14.3f}" for k in cols)]))
    print(f"ours / TRL generated tokens per second: {ratio:.2f}x wall, {cpu_ratio:.2f}x per CPU second (target >= 2x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
