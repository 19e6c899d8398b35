"""Reward registry (SPEC section 2): one entry per config name, errors name the valid ones."""

import pytest

from selfdistill import config
from selfdistill.rewards import REWARDS, asym_cf_reward, cf_reward, get_reward, gm_reward, pmi_reward, pmi_shift_reward


def test_registry_matches_config_choices():
    assert set(REWARDS) == set(config.REWARDS)


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
    assert get_reward("pmi").needs_pmi_passes and get_reward("pmi").uses_agg
    assert get_reward("gm").needs_gm_passes
    assert get_reward("pmi_shift").needs_belief_open_close
    assert get_reward("cf").needs_split_arms and get_reward("asym_cf").needs_split_arms
    assert all(get_reward(n).needs_text_membership for n in ("pmi", "gm", "pmi_shift"))
    assert not any(get_reward(n).needs_text_membership for n in ("base", "cf", "asym_cf"))
    # exactly one pass family per belief head, none for the rest
    for name, spec in REWARDS.items():
        passes = [spec.needs_pmi_passes, spec.needs_gm_passes, spec.needs_belief_open_close]
        assert sum(passes) == (1 if name in ("pmi", "gm", "pmi_shift") else 0)
