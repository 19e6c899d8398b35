"""Every experiment composes and validates; the reward arms are twins (DESIGN.md, SPEC section 2).

The twin audit diffs the fully composed configs: a meta arm may differ from `base` only in the
reward group, plus the with/without rollout split that cf and asym_cf need, and in its name. Every
arm must also be the demo recipe (data, SFT, GRPO, eval, stages), so they all start from the same SFT.
"""

from __future__ import annotations

from importlib import resources

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfdistill.config import register_configs, validate

register_configs()

ARMS = ("base", "pmi", "cf", "gm", "asym_cf", "pmi_shift")
SPLIT_ARMS = ("cf", "asym_cf")
SPLIT_KEYS = {"rollout.split_arms", "rollout.without_mode"}
NAME_KEYS = {"experiment_name"}
# Hydra group choices an arm may change (the rest must equal base's).
ARM_GROUPS = {"reward", "rollout", "experiment"}
EXPERIMENTS = sorted(
    p.name[: -len(".yaml")] for p in resources.files("selfdistill.conf").joinpath("experiment").iterdir()
    if p.name.endswith(".yaml") and not p.name.startswith("_")
)


def compose_cfg(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_module(config_module="selfdistill.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


def flat(node, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def composed(name: str, extra: tuple[str, ...] = ()) -> dict:
    cfg = compose_cfg([f"experiment={name}", *extra])
    validate(cfg)
    return flat(OmegaConf.to_container(cfg, resolve=True))


def twin_violations(arm: dict, base: dict, split: bool) -> list[str]:
    """Keys in which `arm` differs from `base` beyond what its reward arm may change."""
    allowed = NAME_KEYS | (SPLIT_KEYS if split else set())
    diff = sorted(k for k in arm.keys() | base.keys() if arm.get(k, "<absent>") != base.get(k, "<absent>"))
    return [f"{k}: base={base.get(k, '<absent>')!r} arm={arm.get(k, '<absent>')!r}" for k in diff
            if k not in allowed and not k.startswith("reward.")]


def test_every_arm_has_an_experiment():
    assert set(ARMS) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_validates_and_builds_the_typed_config(name):
    cfg = compose_cfg([f"experiment={name}"])
    validate(cfg)
    typed = OmegaConf.to_object(cfg)
    assert typed.rollout.n >= 2 and typed.trainer.stages


@pytest.mark.parametrize("arm", ARMS)
def test_arms_are_twins_of_base(arm):
    base, cfg = composed("base"), composed(arm)
    assert twin_violations(cfg, base, arm in SPLIT_ARMS) == []
    assert cfg["reward.name"] == arm
    assert cfg["rollout.split_arms"] is (arm in SPLIT_ARMS)
    # every arm starts from the identical SFT, evaluated before and after GRPO
    assert cfg["trainer.stages"] == ["sft", "eval", "grpo", "eval"]


@pytest.mark.parametrize("arm", ARMS)
def test_arms_use_the_demo_recipe(arm):
    """The shared recipe lives in experiment/demo.yaml only: base is demo, the arms base + reward."""
    demo, cfg = composed("demo"), composed(arm)
    demo_as_base = {**demo, "reward.name": "base"}
    assert twin_violations(cfg, demo_as_base, arm in SPLIT_ARMS) == []


@pytest.mark.parametrize("arm", ARMS)
def test_arms_change_only_the_reward_and_rollout_groups(arm):
    base = compose_cfg(["experiment=base"], hydra_cfg=True).hydra.runtime.choices
    cfg = compose_cfg([f"experiment={arm}"], hydra_cfg=True).hydra.runtime.choices
    changed = {k for k in base.keys() | cfg.keys() if base.get(k) != cfg.get(k)}
    assert changed <= ARM_GROUPS
    assert cfg["reward"] == arm and cfg["rollout"] == ("split" if arm in SPLIT_ARMS else "hf")


def test_sweep_overrides_keep_the_arms_twins():
    """What `selfdistill-train -m experiment=base,pmi,... seed=...` composes stays matched."""
    extra = ("seed=3", "grpo.steps=7", "model.tiny.hidden_size=96")
    base = composed("base", extra)
    for arm in ARMS:
        cfg = composed(arm, extra)
        assert twin_violations(cfg, base, arm in SPLIT_ARMS) == []
        assert (cfg["seed"], cfg["grpo.steps"], cfg["model.tiny.hidden_size"]) == (3, 7, 96)


def test_the_audit_catches_a_recipe_difference():
    base = composed("base")
    bad = composed("pmi", ("grpo.lr=0.123",))
    assert base["grpo.lr"] != 0.123
    assert twin_violations(bad, base, split=False) == [f"grpo.lr: base={base['grpo.lr']!r} arm=0.123"]
    split_leak = composed("pmi", ("rollout.split_arms=true",))
    assert twin_violations(split_leak, base, split=False) == ["rollout.split_arms: base=False arm=True"]


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_names_itself(arm):
    assert composed(arm)["experiment_name"] == arm
