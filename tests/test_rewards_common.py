"""Sign gate, belief and the non-member rule (SPEC sections 1-2), hand-worked."""

import math

import pytest
import torch

from selfdistill.rewards import belief, divergent_positions, gate, masked_mean, masked_min, masked_sum

NAN, INF = float("nan"), float("inf")


def test_gate_sign_and_cap():
    x = torch.tensor([0.05, 0.5, -0.3, 0.05, 0.5, -0.3])
    correct = torch.tensor([True, True, True, False, False, False])
    assert gate(x, correct, 0.1085).tolist() == pytest.approx([0.05, 0.1085, 0.0, -0.05, -0.1085, 0.0])


def test_gate_nonfinite_is_non_member():
    out = gate(torch.tensor([INF, -INF, NAN]), torch.tensor([True, False, True]), 2.0)
    assert torch.isnan(out).all()  # +inf must not become the cap 2


def test_gate_accepts_0_1_and_rejects_other_correct_values():
    assert gate(torch.tensor([1.0]), torch.tensor([0]), 2.0).tolist() == [-1.0]
    with pytest.raises(ValueError, match="0/1"):
        gate(torch.tensor([1.0]), torch.tensor([2]), 2.0)


def test_belief_sums_divergent_positions_only():
    gold = torch.tensor([[-0.1, -2.0, -0.5], [-0.1, -2.0, -0.5]])
    decoy = torch.tensor([[-9.0, -1.0, -0.25], [-9.0, -1.0, -0.25]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    # row 0: (-2 + 1) + (-0.5 + 0.25) = -1.25; row 1: -1
    assert belief(gold, decoy, mask).tolist() == pytest.approx([-1.25, -1.0])
    # a [K] mask broadcasts over rows
    assert belief(gold, decoy, torch.tensor([False, True, False])).tolist() == pytest.approx([-1.0, -1.0])


def test_belief_nan_rules():
    gold = torch.tensor([[NAN, -2.0], [-1.0, -INF], [-1.0, -2.0]])
    decoy = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[False, True], [False, True], [False, False]])
    out = belief(gold, decoy, mask)
    assert out[0].item() == pytest.approx(-1.0)  # NaN at an unscored position is ignored
    assert math.isnan(out[1].item())  # -inf at a scored position -> non-member
    assert math.isnan(out[2].item())  # no divergent position -> not scorable


def test_divergent_positions():
    assert divergent_positions([1, 2, 3], [1, 5, 3]).tolist() == [False, True, False]
    assert divergent_positions([1, 2, 3], [1, 2, 3]).tolist() == [False, False, False]
    assert divergent_positions([1, 2], [1, 2, 3]).tolist() == [False, False, False]  # lengths differ


def test_masked_reductions():
    v = torch.tensor([[1.0, 5.0, NAN], [2.0, INF, 3.0], [1.0, 1.0, 1.0]])
    m = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    s, mean, mn = masked_sum(v.double(), m), masked_mean(v.double(), m), masked_min(v.double(), m)
    assert s[0].item() == 6.0 and mean[0].item() == 3.0 and mn[0].item() == 1.0
    for t in (s, mean, mn):
        assert math.isnan(t[1].item()) and math.isnan(t[2].item())
