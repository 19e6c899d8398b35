"""Counterfactual cf (SPEC section 2): v_i = c_i - acc_without on the with arm, zeroing rule, -0.1."""

import math

import pytest
import torch

from selfdistill.rewards import cf_reward

ARM8 = [True] * 4 + [False] * 4  # first n/2 with meta


def cf(with_c, without_c, emitted=None, group=0):
    c = torch.tensor(with_c + without_c)
    emitted = torch.tensor((emitted or [True] * len(with_c)) + [False] * len(without_c))
    arm = torch.tensor([True] * len(with_c) + [False] * len(without_c))
    return cf_reward(c, arm, torch.full((len(c),), group), emitted)


def test_plain_difference():
    # acc_without = 1/4, acc_with = 3/4: v = c - 0.25 on the with arm, 0 on the without arm
    assert cf([1, 1, 0, 1], [1, 0, 0, 0]).tolist() == pytest.approx([0.75, 0.75, -0.25, 0.75, 0, 0, 0, 0])


def test_meta_hurt_zeroes_positive_values():
    # acc_with = 1/4 < acc_without = 1/2: the correct with-arm rollout's +0.5 becomes 0
    assert cf([1, 0, 0, 0], [1, 1, 0, 0]).tolist() == pytest.approx([0.0, -0.5, -0.5, -0.5, 0, 0, 0, 0])
    # equal accuracies: nothing zeroed
    assert cf([1, 1, 0, 0], [1, 1, 0, 0]).tolist() == pytest.approx([0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0])


def test_solved_without_meta_penalises_emitting():
    # acc_without = 1: v = c - 1, minus 0.1 where the rollout emitted a meta block
    out = cf([1, 1, 0, 1], [1, 1, 1, 1], emitted=[True, False, True, True])
    assert out.tolist() == pytest.approx([-0.1, 0.0, -1.1, -0.1, 0, 0, 0, 0])
    # acc_with = acc_without = 1: only the -0.1
    out = cf([1, 1, 1, 1], [1, 1, 1, 1], emitted=[True, True, False, True])
    assert out.tolist() == pytest.approx([-0.1, -0.1, 0.0, -0.1, 0, 0, 0, 0])


def test_group_lacking_an_arm_is_all_nan_and_groups_are_independent():
    c = torch.tensor([1, 0, 1, 0, 1, 1])
    arm = torch.tensor([True, True, False, False, True, True])
    g = torch.tensor([7, 7, 7, 7, 3, 3])  # group 3 has no without arm
    out = cf_reward(c, arm, g, torch.ones(6, dtype=torch.bool))
    assert out[:4].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert all(math.isnan(v) for v in out[4:].tolist())


def test_bad_correctness_values_raise():
    with pytest.raises(ValueError, match="0/1"):
        cf_reward(torch.tensor([1, -1]), torch.tensor([True, False]), torch.tensor([0, 0]), torch.tensor([True, False]))
