"""Config composition: every experiment composes and validates; bad keys and values fail early."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from selfdistill.config import ConfigError, validate
from tests.conftest import compose_config

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml") and not f.startswith("_"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose_config([f"experiment={name}"])
    assert cfg.rollout.n >= 2


def test_demo_recipe_values():
    cfg = compose_config(["experiment=demo"])
    assert cfg.trainer.stages == ["sft", "eval", "grpo", "eval"]
    assert cfg.reward.name == "base" and cfg.algo.loss_type == "grpo"
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.kl_coef, cfg.algo.entropy_coef) == (0.2, 0.28, 0.0, 0.0)
    assert (cfg.grpo.lr, cfg.grpo.batch_size, cfg.rollout.n, cfg.rollout.temperature) == (2e-5, 16, 8, 0.6)
    assert compose_config([]).algo.entropy_coef == 0.001  # the schema default; the demo turns it off


def test_unknown_key_fails_at_compose():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose_config(["experiment=demo", "algo.clip_hihg=0.3"])
    assert "clip_hihg" in str(e.value) or "clip_hihg" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("grpo.lr=-1e-4", "grpo.lr=-0.0001 must be > 0"),
        ("algo.clip_low=0.3", "clip_low=0.3 > algo.clip_high=0.28"),
        ("rollout.n=1", "rollout.n=1"),
        ("engine.name=megatron", "engine.name='megatron' is not valid"),
        ("ops.backend=cublas", "ops.backend='cublas' is not valid"),
        ("reward.name=vibes", "reward.name='vibes' is not valid"),
        ("algo.loss_type=ppo", "algo.loss_type='ppo' is not valid"),
        ("reward.name=cf", "needs rollout.split_arms=true"),
    ],
)
def test_bad_values_are_named(override, fragment):
    cfg = compose_config(["experiment=demo"], typed=False)
    key, value = override.split("=")
    node, leaf = key.rsplit(".", 1)
    cfg_node = cfg
    for part in node.split("."):
        cfg_node = cfg_node[part]
    cfg_node[leaf] = type(cfg_node[leaf])(value) if cfg_node[leaf] is not None else value
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert fragment in str(e.value)


def test_odd_n_with_split_arms_is_a_config_error():
    cfg = compose_config(["experiment=demo"], typed=False)
    cfg.rollout.split_arms = True
    cfg.rollout.n = 7
    with pytest.raises(ConfigError, match="rollout.n=7 must be even"):
        validate(cfg)


def test_cli_prints_composed_config_and_rejects_typos():
    ok = subprocess.run([sys.executable, "-m", "selfdistill.train", "--cfg", "job", "experiment=demo"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "loss_type: grpo" in ok.stdout and "stages:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "selfdistill.train", "experiment=demo", "sft.stepz=3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "stepz" in bad.stderr + bad.stdout
