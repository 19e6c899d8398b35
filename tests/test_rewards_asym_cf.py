"""asym_cf (SPEC section 2): R = max(0, c1 - c0) - [2.5 (c0 - c1) if c0 - c1 > 0.1] - [0.5 if c0, c1 >= 0.99]."""

import math

import pytest
import torch

from selfdistill.algo.advantages import group_centered
from selfdistill.rewards import asym_cf_reward


def group(k_without, k_with, n_arm, gid=0):
    """Rollouts of one group: n_arm with-arm (k_with correct) then n_arm without-arm (k_without correct)."""
    c = [1] * k_with + [0] * (n_arm - k_with) + [1] * k_without + [0] * (n_arm - k_without)
    arm = [True] * n_arm + [False] * n_arm
    return c, arm, [gid] * (2 * n_arm)


def asym(*groups):
    c, arm, g = [], [], []
    for gc, ga, gg in groups:
        c += gc
        arm += ga
        g += gg
    return asym_cf_reward(torch.tensor(c), torch.tensor(arm), torch.tensor(g)), torch.tensor(g), torch.tensor(arm)


@pytest.mark.parametrize(
    "k0, k1, expected",  # n/2 = 4 per arm: (c0, c1) = (k0/4, k1/4)
    [(2, 4, 0.5), (4, 2, -1.25), (4, 4, -0.5), (2, 2, 0.0)],
)
def test_spec_worked_cases(k0, k1, expected):
    r, _, arm = asym(group(k0, k1, 4))
    assert r[arm].tolist() == [expected] * 4  # every with-arm rollout gets R
    assert r[~arm].tolist() == [0.0] * 4  # without-arm members get 0


def test_whole_group_centring_n8():
    r, g, arm = asym(group(2, 4, 4, gid=0), group(4, 2, 4, gid=1))
    adv, member = group_centered(r, g)
    assert member.all()
    assert adv[:4].tolist() == [0.25] * 4 and adv[4:8].tolist() == [-0.25] * 4  # (0.5, 1.0) group
    # (1.0, 0.5): R = -1.25, mean -0.625
    assert adv[8:12].tolist() == [-0.625] * 4 and adv[12:].tolist() == [0.625] * 4


def test_threshold_compared_on_exact_fractions():
    # c0 = 4/10, c1 = 3/10: c0 - c1 = 1/10 exactly, not > 0.1 -> R = 0.
    # (float 0.4 - 0.3 = 0.10000000000000003 would wrongly charge 2.5 * 0.1)
    r, _, arm = asym(group(4, 3, 10))
    assert r[arm].tolist() == [0.0] * 10
    # c0 - c1 = 2/10 > 0.1 -> -2.5 * 0.2
    r, _, arm = asym(group(5, 3, 10))
    assert r[arm].tolist() == pytest.approx([-0.5] * 10)


def test_solved_threshold_099():
    r, _, arm = asym(group(99, 99, 100))
    assert r[arm].tolist() == [-0.5] * 100
    r, _, arm = asym(group(98, 99, 100))  # c0 = 0.98 < 0.99: only the gain 0.01
    assert r[arm].tolist() == pytest.approx([0.01] * 100)


def test_group_lacking_an_arm_is_all_nan():
    c = torch.tensor([1, 0, 1, 1])
    arm = torch.tensor([True, True, True, True])
    r = asym_cf_reward(c, arm, torch.tensor([0, 0, 0, 0]))
    assert all(math.isnan(v) for v in r.tolist())
