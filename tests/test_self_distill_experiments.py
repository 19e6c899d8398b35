"""The self-distillation experiments and configs (SPEC section 6): sdft_evolved differs from
sdft_baseline in the recipe column only, sdpo is the base arm with the RL stage swapped, every new
experiment (and SDPO with a meta arm, with the rollout split, with top-K) composes and runs 3 steps,
and bad distillation settings fail at start naming the key."""

from __future__ import annotations

import math
import os

import pytest

from selfdistill.config import ConfigError
from selfdistill.metrics import read_metrics
from selfdistill.trainer import Trainer
from tests.conftest import TINY_RUN, compose_config
from tests.test_experiments_compose import composed

# SPEC section 6's two columns (max new tokens at the experiments' shared 1/8 scale).
EVOLVED_COLUMN = {
    "sdft.lr": 8e-4, "sdft.warmup_steps": 2, "sdft.batch_size": 20, "rollout.max_new_tokens": 64,
    "rollout.temperature": 0.55, "sdft.min_lr_ratio": 0.005, "sdft.eval_every": 5, "sdft.curriculum": "demo_length",
    "sdft.batching": "three_pass", "algo.token_weighting": "ramp", "experiment_name": "sdft_evolved",
}
BASELINE_COLUMN = {
    "sdft.lr": 5e-5, "sdft.warmup_steps": 20, "sdft.batch_size": 32, "rollout.max_new_tokens": 128,
    "rollout.temperature": 0.7, "sdft.min_lr_ratio": 0.0, "sdft.eval_every": 15, "sdft.curriculum": "none",
    "sdft.batching": "single_pass", "algo.token_weighting": "uniform", "experiment_name": "sdft_baseline",
}


def test_sdft_recipes_differ_in_the_spec_column_only():
    base, evolved = composed("sdft_baseline"), composed("sdft_evolved")
    assert {k for k in base.keys() | evolved.keys() if base.get(k) != evolved.get(k)} == set(EVOLVED_COLUMN)
    assert {k: evolved[k] for k in EVOLVED_COLUMN} == EVOLVED_COLUMN
    assert {k: base[k] for k in BASELINE_COLUMN} == BASELINE_COLUMN
    for cfg in (base, evolved):
        assert cfg["sdft.steps"] == 30 and cfg["sdft.schedule"] == "cosine" and cfg["algo.name"] == "sdft"
        assert cfg["algo.sdft.mode"] == "offline" and cfg["algo.distill.teacher"] == "frozen"
        # 200 pairs / 20 per step = 10 steps a pass: the evolved recipe's 30 steps run exactly its three passes
        assert cfg["sdft.train_pairs"] == 200 and cfg["trainer.stages"] == ["sft", "sdft"]


def test_sdpo_is_the_base_arm_with_the_rl_stage_swapped():
    base, sdpo = composed("base"), composed("sdpo")
    diff = {k for k in base.keys() | sdpo.keys() if base.get(k) != sdpo.get(k) and not k.startswith("sdpo.")}
    assert diff == {"experiment_name", "trainer.stages", "algo.name", "algo.distill.max_teacher_prompt_tokens"}
    assert sdpo["trainer.stages"] == ["sft", "eval", "sdpo", "eval"]
    assert {k[len("sdpo."):]: v for k, v in sdpo.items() if k.startswith("sdpo.")} == \
        {k[len("grpo."):]: v for k, v in base.items() if k.startswith("grpo.")}, "equal rollouts per step, steps and lr"


SMOKE = [*TINY_RUN, "sdpo.steps=3", "sdpo.batch_size=2", "sdft.steps=3", "sdft.batch_size=4", "sdft.train_pairs=12",
         "sdft.eval_prompts=4", "rollout.max_new_tokens=12"]


@pytest.mark.parametrize("overrides", [
    ["experiment=sdpo"],
    ["experiment=sdpo", "reward=pmi", "reward.meta_warmup_steps=1", "algo.distill.weight=0.5", "algo.kl_coef=0.05"],
    ["experiment=sdpo", "reward=cf", "rollout=split", "algo.distill.teacher=ema", "algo.distill.feedback=true"],
    ["experiment=sdpo", "algo.distill.loss=topk", "algo.distill.topk=5", "algo.distill.teacher=live",
     "algo.distill.feedback=true", "sdpo.micro_batch_size=3"],
    ["experiment=sdft_baseline"],
    ["experiment=sdft_evolved"],
    ["experiment=sdft_evolved", "algo.sdft.mode=online", "algo.distill.loss=topk", "algo.distill.topk=4",
     "algo.distill.teacher=ema"],
], ids=["sdpo", "sdpo-pmi-mixed-kl", "sdpo-cf-split-ema-feedback", "sdpo-topk-live-micro", "sdft_baseline",
        "sdft_evolved", "sdft-online-topk-ema"])
def test_experiment_composes_and_runs_three_steps(tmp_path, overrides):
    cfg = compose_config([*overrides, *SMOKE])
    stage = cfg.algo.name
    cfg.trainer.stages = ["sft", stage]
    Trainer(cfg, str(tmp_path)).run()
    rows = [r for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if r["stage"] == stage]
    assert len(rows) == 3
    keys = ["loss", "grad_norm", "entropy", "lr"]
    if stage == "sdpo":
        keys += ["meta/emission_rate", "self_distillation/success_group_fraction", "self_distillation/teacher_fraction",
                 "self_distillation/feedback_fraction", "self_distillation/distill_loss", "self_distillation/policy_loss",
                 "self_distillation/teacher_student_kl", "reward", "accuracy"]
    else:
        keys += ["sdft/score"] if stage == "sdft" else []
    for r in rows[-1:] if stage == "sdft" else rows:
        for k in keys:
            assert k in r and math.isfinite(r[k]), (k, r)
    if stage == "sdft":
        assert 0 < rows[-1]["sdft/score"] <= 1


@pytest.mark.parametrize("overrides,message", [
    (["experiment=base", "algo=sdpo"], "algo.name=sdpo .* trainer.stages=.* has grpo"),
    (["algo=sdpo", "algo.distill.weight=1.5"], r"algo.distill.weight=1.5 must be in \[0, 1\]"),
    (["algo=sdpo", "algo.distill.teacher=stale"], "algo.distill.teacher='stale' is not valid"),
    (["algo=sdpo", "algo.distill.loss=forward_kl"], "algo.distill.loss='forward_kl' is not valid"),
    (["algo=sdpo", "algo.distill.alpha=2"], "algo.distill.alpha=2"),
    (["algo=sdpo", "algo.distill.ema_tau=0"], "algo.distill.ema_tau=0"),
    (["algo=sdpo", "algo.distill.template=no slots"], "lacks {prompt}, {demonstration}"),
    (["algo=sdft", "algo.distill.teacher=ema"], "algo.sdft.mode=offline trains on completions the frozen teacher"),
    (["algo=sdft", "algo.distill.weight=0.5"], "SDFT has no reward"),
    (["algo=sdft", "sdft.batching=three_pass"], "needs sdft.curriculum=demo_length"),
    (["algo=sdft", "algo.sdft.mode=offpolicy"], "algo.sdft.mode='offpolicy' is not valid"),
])
def test_bad_distillation_settings_fail_at_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)
