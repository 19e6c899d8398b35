"""PMI-shift (SPEC section 2): R = scale * clip(close - open, -2, 2) + 1[open < -eps, close > eps]
- 2[open > eps, close < -eps]; not gated."""

import math

import pytest
import torch

from selfdistill.algo.advantages import group_centered
from selfdistill.rewards import belief, pmi_shift_reward

NAN = float("nan")


def shift(opens, closes, member=None, **kw):
    member = torch.ones(len(opens), dtype=torch.bool) if member is None else torch.tensor(member)
    return pmi_shift_reward(torch.tensor(opens), torch.tensor(closes), member=member, **kw)


def test_spec_worked_case_through_belief():
    one = torch.tensor([True])
    # one divergent position; (gold, decoy) log-probs (-2, -1) at open, (-1, -2) at close
    b_open = belief(torch.tensor([[-2.0]]), torch.tensor([[-1.0]]), one)
    b_close = belief(torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), one)
    assert (b_open.item(), b_close.item()) == (-1.0, 1.0)
    assert pmi_shift_reward(b_open, b_close, member=torch.tensor([True])).tolist() == [3.0]


def test_gold_to_decoy_flip_costs_two():
    # open +1, close -1: shift -2 -> -2, flip penalty -2
    assert shift([1.0], [-1.0]).tolist() == [-4.0]


def test_no_crossing_no_bonus():
    assert shift([0.5, -0.5, 1.0], [1.0, -0.2, 0.25]).tolist() == pytest.approx([0.5, 0.3, -0.75])


def test_shift_is_clipped_at_two():
    assert shift([-3.0, 0.5, 4.0], [3.0, 4.5, 0.5]).tolist() == [3.0, 2.0, -2.0]


def test_eps_and_scale_and_zero_beliefs():
    # open exactly 0 is not < -0: no bonus
    assert shift([0.0], [1.0]).tolist() == [1.0]
    assert shift([-0.05], [0.05], eps=0.1).tolist() == pytest.approx([0.1])
    assert shift([-0.05], [0.05], eps=0.0).tolist() == pytest.approx([1.1])
    assert shift([-1.0], [1.0], scale=0.5).tolist() == [2.0]


def test_empty_meta_is_excluded_from_group_mean():
    # rollout 2 has a blank meta block -> non-member -> NaN -> advantage 0, not in the mean
    r = shift([-1.0, 0.0, -1.0], [1.0, 1.0, 1.0], member=[True, True, False])
    assert r[:2].tolist() == [3.0, 1.0] and math.isnan(r[2].item())
    adv, member = group_centered(r, torch.tensor([0, 0, 0]))
    assert adv.tolist() == [1.0, -1.0, 0.0]
    assert member.tolist() == [True, True, False]


def test_unscorable_pair_is_non_member():
    b = belief(torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), torch.tensor([False]))
    assert math.isnan(pmi_shift_reward(b, torch.tensor([1.0]), member=torch.tensor([True])).item())
    assert math.isnan(shift([float("inf")], [1.0]).item())
