"""PMI (SPEC section 2): x = agg(d_real) - agg(d_plac), R = gate(x, correct, 0.1085)."""

import math

import pytest
import torch

from selfdistill.rewards import pmi_aggregate, pmi_reward

NAN, INF = float("nan"), float("inf")

# Two scored tokens. d_real = real - without = [3.0, -1.0]; d_plac = placebo - without = [2.5, -1.06].
WITHOUT = [-5.0, -4.0]
REAL = [-2.0, -5.0]
PLACEBO = [-2.5, -5.06]


def run(agg, correct=(True, False), without=WITHOUT):
    R = len(correct)
    t = lambda row: torch.tensor([row] * R, dtype=torch.float64)  # noqa: E731
    return pmi_reward(t(REAL), t(without), t(PLACEBO), torch.ones(R, 2, dtype=torch.bool),
                      torch.tensor(correct), agg, member=torch.ones(R, dtype=torch.bool))


def test_aggregates_hand_worked():
    d = torch.tensor([[3.0, -0.5, 0.1], [-3.0, 1.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, True], [True, True, False]])
    assert pmi_aggregate(d, m, "mean").tolist() == pytest.approx([2.6 / 3, -1.0])
    # sum_clip: clip(3) = 2 -> 2 - 0.5 + 0.1; clip(-3) = -2 -> -2 + 1
    assert pmi_aggregate(d, m, "sum_clip").tolist() == pytest.approx([1.6, -1.0])
    # mean_min: mean(clipped) + min(clipped)
    assert pmi_aggregate(d, m, "mean_min").tolist() == pytest.approx([1.6 / 3 - 0.5, -0.5 - 2.0])


def test_mean_agg_clips_at_cap():
    # mean d_real = 1.0, mean d_plac = 0.72, x = 0.28 > 0.1085
    assert run("mean").tolist() == pytest.approx([0.1085, -0.1085])


def test_sum_clip_agg():
    # sum clip d_real = 2 - 1 = 1; sum clip d_plac = 2 - 1.06 = 0.94; x = 0.06
    assert run("sum_clip").tolist() == pytest.approx([0.06, -0.06])


def test_mean_min_agg():
    # d_real -> 0.5 + (-1) = -0.5; d_plac -> 0.47 + (-1.06) = -0.59; x = 0.09
    assert run("mean_min").tolist() == pytest.approx([0.09, -0.09])


def test_without_arm_cancels_for_mean_only():
    # Raise logp_without of token 2 by 1: d_real = [3, -2], d_plac = [2.5, -2.06].
    without = [WITHOUT[0], WITHOUT[1] + 1.0]
    # mean: both means drop by 0.5, x = 0.28 still -> capped
    assert run("mean", without=without).tolist() == pytest.approx([0.1085, -0.1085])
    # sum_clip: [2, -2] -> 0 and [2, -2] -> 0, x = 0 (was 0.06)
    assert run("sum_clip", without=without).tolist() == pytest.approx([0.0, 0.0])
    # mean_min: 0 + (-2) and 0 + (-2), x = 0 (was 0.09)
    assert run("mean_min", without=without).tolist() == pytest.approx([0.0, 0.0])


def test_negative_x_earns_zero_either_way():
    t = lambda v: torch.tensor([v, v], dtype=torch.float64)  # noqa: E731
    out = pmi_reward(t([-1.0]), t([-1.0]), t([-0.9]), torch.ones(2, 1, dtype=torch.bool),
                     torch.tensor([True, False]), "mean", member=torch.tensor([True, True]))
    assert out.tolist() == [0.0, 0.0]


def test_non_members():
    real = torch.tensor([[-1.0, NAN], [-1.0, -1.0], [-1.0, INF], [-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    without = torch.full((5, 2), -1.05, dtype=torch.float64)
    plac = torch.full((5, 2), -1.05, dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, False], [True, True], [True, True], [True, True]])
    member = torch.tensor([True, True, True, False, True])
    out = pmi_reward(real, without, plac, mask, torch.ones(5, dtype=torch.bool), "mean", member=member)
    assert out[0].item() == pytest.approx(0.05)  # NaN outside the continuation mask is ignored
    assert math.isnan(out[1].item())  # empty continuation
    assert math.isnan(out[2].item())  # +inf at a scored token
    assert math.isnan(out[3].item())  # scorer said non-member (guard, blank M, ...)
    assert out[4].item() == pytest.approx(0.05)


def test_unknown_agg_and_shapes_raise():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="sum_clip"):
        pmi_reward(z, z, z, torch.ones(1, 2, dtype=torch.bool), torch.tensor([True]), "median", member=torch.tensor([True]))
    with pytest.raises(ValueError, match="cont_mask"):
        pmi_reward(z, z, z, torch.ones(1, 3, dtype=torch.bool), torch.tensor([True]), "mean", member=torch.tensor([True]))
