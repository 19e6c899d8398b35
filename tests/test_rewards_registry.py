"""Reward registry (SPEC section 2): one entry per config name, errors name the valid ones."""

import inspect

import pytest

from selfdistill import config
from selfdistill.rewards import (
    CONTEXT_PREFIX,
    CONTEXT_PREFIX_META,
    CONTEXT_PREFIX_PLACEBO,
    REWARDS,
    TARGET_ANSWERS,
    TARGET_CONTINUATION,
    asym_cf_reward,
    cf_reward,
    get_reward,
    gm_reward,
    pmi_guard_reason,
    pmi_reward,
    pmi_shift_reward,
)
from tests.conftest import compose_config



def test_config_accepts_exactly_the_registered_arms(monkeypatch):
    for name in REWARDS:
        split = ["rollout.split_arms=true"] if REWARDS[name].needs_split_arms else []
        config.validate(compose_config([f"reward.name={name}", *split], typed=False))
    with pytest.raises(config.ConfigError, match="reward.name='pmi-shift'"):
        config.validate(compose_config(["reward.name=pmi-shift"], typed=False, check=False))


def test_split_arm_heads_are_the_ones_reading_with_arm():
    assert {n for n, spec in REWARDS.items() if spec.needs_split_arms} == {"cf", "asym_cf"}
    with pytest.raises(config.ConfigError, match="reward.name=cf needs rollout.split_arms=true"):
        config.validate(compose_config(["reward.name=cf"], typed=False, check=False))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_reward("pmi-shift")
    msg = str(e.value)
    assert "'pmi-shift'" in msg
    for name in ("base", "pmi", "cf", "gm", "asym_cf", "pmi_shift"):
        assert name in msg


def test_entries():
    base = get_reward("base")
    assert base.heads == ("correctness",) and base.meta_fn is None and base.meta_route is None
    expected = {
        "pmi": (pmi_reward, "meta"),
        "gm": (gm_reward, "meta"),
        "pmi_shift": (pmi_shift_reward, "meta"),
        "cf": (cf_reward, "answer_with_arm"),
        "asym_cf": (asym_cf_reward, "answer_with_arm"),
    }
    for name, (fn, route) in expected.items():
        spec = get_reward(name)
        assert spec.meta_fn is fn and spec.meta_route == route
        assert spec.heads == ("correctness", name)
    # The passes each entry declares (SPEC section 2) are the ones the scorer runs for it.
    pmi = get_reward("pmi").passes
    assert pmi.target == TARGET_CONTINUATION and pmi.contexts == (
        ("real", CONTEXT_PREFIX_META), ("without", CONTEXT_PREFIX), ("placebo", CONTEXT_PREFIX_PLACEBO))
    assert "agg" in inspect.signature(pmi_reward).parameters  # reward.agg reaches PMI by name
    gm = get_reward("gm").passes
    assert gm.target == TARGET_ANSWERS and gm.contexts == (("meta", CONTEXT_PREFIX_META), ("placebo", CONTEXT_PREFIX_PLACEBO))
    shift = get_reward("pmi_shift").passes
    assert shift.target == TARGET_ANSWERS and shift.contexts == (("open", CONTEXT_PREFIX), ("close", CONTEXT_PREFIX_META))
    # cf / asym_cf read the with/without split (rollout.split_arms, checked by config.validate)
    assert all("with_arm" in inspect.signature(get_reward(n).meta_fn).parameters for n in ("cf", "asym_cf"))
    # membership rules on text: the heads scored from a meta block, and PMI's guard only on PMI
    assert pmi.needs_continuation and gm.needs_continuation and not shift.needs_continuation
    assert pmi.guard is pmi_guard_reason and gm.guard is None and shift.guard is None
    # exactly the belief heads run scorer passes, none for the rest
    for name, spec in REWARDS.items():
        assert spec.needs_scorer == (name in ("pmi", "gm", "pmi_shift"))
        assert (spec.passes is not None) == (name in ("pmi", "gm", "pmi_shift"))
