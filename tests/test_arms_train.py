"""Every reward arm trains end to end on the tiny model: one short SFT shared by all arms (the twin
start, DESIGN.md), then 3 GRPO steps per arm, with finite loss, grad norm, reward and the arm's
reward metrics in metrics.jsonl."""

from __future__ import annotations

import math
import os

import pytest

from selfdistill import checkpoint as ckpt
from selfdistill.metrics import read_metrics
from selfdistill.trainer import Trainer
from tests.conftest import compose_config

ARMS = ("base", "pmi", "cf", "gm", "asym_cf", "pmi_shift")
# Small enough for a 2-core CPU; every arm composes the same overrides, so the SFT is shared.
RUN = [
    "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128",
    # one-step problems whose every SFT solution has a meta block, and room for it in a rollout
    # ("3+5=9 <|meta|>check 3+5=8<|/meta|>. \boxed{8}"), so the scorer usually gets members
    "data.synthetic.num_train=150", "data.synthetic.num_eval=8", "data.synthetic.levels=[1]",
    "data.synthetic.eval_levels=[1,2]", "data.synthetic.meta_fraction=1.0",
    "sft.steps=40", "sft.batch_size=16", "sft.warmup_steps=2",
    "grpo.steps=3", "grpo.batch_size=2", "rollout.n=4", "rollout.max_new_tokens=48",
    "reward.meta_warmup_steps=1", "reward.grader_workers=1",
    "trainer.stages=[sft,grpo]", "trainer.progress=false", "trainer.tensorboard=false",
    "trainer.torch_threads=1",  # a shared 2-core CPU: a second intra-op thread mostly spin-waits
]
STEP_KEYS = ("loss", "grad_norm", "reward", "accuracy", "perf/rollout_s", "perf/grade_s", "perf/score_s", "perf/update_s")
META_KEYS = ("reward/meta_mean", "reward/meta_std", "reward/skip_rate", "meta/emission_rate",
             "meta/blocks_per_rollout", "meta/mean_len")
ARM_KEYS = {
    "base": (),
    "pmi": ("pmi/d_real_mean", "pmi/d_placebo_mean", "scorer/sequences", "reward/pmi/nonmember/no_closed_block"),
    "gm": ("belief/meta_mean", "belief/placebo_mean", "belief/flips_decoy_to_gold", "scorer/sequences"),
    "pmi_shift": ("belief/open_mean", "belief/close_mean", "belief/shift_mean", "belief/flips_decoy_to_gold",
                  "belief/flips_gold_to_decoy", "scorer/sequences"),
    "cf": ("cf/groups_meta_hurt", "cf/acc_with", "cf/acc_without"),
    "asym_cf": ("asym_cf/case_gain", "asym_cf/case_loss", "asym_cf/case_both_solved", "asym_cf/case_tie"),
}


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """The SFT every arm starts from: the `sft` stage of the base arm's config, run once."""
    run_dir = tmp_path_factory.mktemp("sft")
    Trainer(compose_config(["experiment=base", *RUN, "trainer.stages=[sft]"]), str(run_dir)).run()
    path = ckpt.find_latest(str(run_dir))
    assert path is not None
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS)
def test_arm_trains_three_grpo_steps_from_the_shared_sft(arm, sft_checkpoint, tmp_path):
    cfg = compose_config([f"experiment={arm}", *RUN, f"trainer.resume={sft_checkpoint}"])
    assert cfg.reward.name == arm
    Trainer(cfg, str(tmp_path)).run()
    rows = [r for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if r["stage"] == "grpo"]
    assert len(rows) == 3
    for r in rows:
        for k in STEP_KEYS:
            assert math.isfinite(r[k]), (arm, k, r.get(k))
        assert -1.0 <= r["reward"] <= 1.0
    # SPEC section 4: the first batch has meta weight 0; warmup 1 -> full weight once a step applied
    assert [r["reward/meta_weight"] for r in rows] == pytest.approx([0.0, 0.8, 0.8])
    if arm == "base":
        assert not any(k in rows[0] for k in ("reward/meta_mean", "reward/skip_rate"))
        return
    for r in rows:
        for k in (*META_KEYS, f"reward/{arm}/nan_frac", *ARM_KEYS[arm]):
            assert k in r and math.isfinite(r[k]), (arm, k, r.get(k))
        assert 0.0 <= r[f"reward/{arm}/nan_frac"] <= 1.0 and 0.0 <= r["meta/emission_rate"] <= 1.0
        if "scorer/sequences" in ARM_KEYS[arm]:  # belief arms: members <=> scorer passes ran
            assert (r[f"reward/{arm}/nan_frac"] < 1.0) == (r["scorer/sequences"] > 0), (arm, r)
