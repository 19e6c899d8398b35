"""End to end on the tiny model: SFT then 3 GRPO steps, metrics written and finite; eval stage."""

from __future__ import annotations

import math
import os

from selfdistill.metrics import read_metrics
from selfdistill.trainer import Trainer

GRPO_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "entropy", "grad_norm", "completions/mean_length", "num_tokens", "perf/tokens_per_s", "perf/step_s",
             "perf/rollout_s", "perf/grade_s", "perf/update_s", "loss"]


def test_sft_then_three_grpo_steps_write_finite_metrics(tiny_config, tmp_path):
    cfg = tiny_config(["trainer.stages=[sft,grpo,eval]"])
    summary = Trainer(cfg, str(tmp_path)).run()
    rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert len(grpo) == 3
    for r in grpo:
        for k in GRPO_KEYS:
            assert k in r, k
            assert math.isfinite(r[k]), (k, r[k])
        assert -1.0 <= r["reward"] <= 1.0
    assert grpo[-1]["num_tokens"] > grpo[0]["num_tokens"]
    sft = [r for r in rows if r["stage"] == "sft"]
    assert len(sft) == 4 and all(math.isfinite(r["sft/loss"]) for r in sft)
    assert summary["evals"][-1]["after"] == "grpo"
    assert 0.0 <= summary["evals"][-1]["heldout/accuracy"] <= 1.0
    assert os.path.isdir(os.path.join(tmp_path, "tensorboard")) is False  # disabled in TINY_RUN
    assert os.path.isfile(os.path.join(tmp_path, "summary.json"))
