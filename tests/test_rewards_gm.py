"""gm (SPEC section 2): did_i = [g(M) - g(pl)] - [d(M) - d(pl)],
x = mean clip(did, -2, 2) + 1.0 * min clip(did, -2, 2), R = gate(x, correct, 2)."""

import math

import pytest
import torch

from selfdistill.rewards import gm_reward

NAN = float("nan")
# Three answer positions; position 0 (e.g. "\boxed{") is shared, 1 and 2 diverge.
DIV = torch.tensor([False, True, True])


def gm(g_m, g_p, d_m, d_p, correct, mask=DIV, member=None):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    member = torch.ones(len(correct), dtype=torch.bool) if member is None else torch.tensor(member)
    return gm_reward(t(g_m), t(g_p), t(d_m), t(d_p), mask, torch.tensor(correct), member=member)


def test_real_catch_all_four_sets():
    # did_1 = (-0.5 + 1.5) - (-2.0 + 1.0) = 2.0 ; did_2 = (-0.2 + 0.4) - (-1.0 + 0.5) = 0.7
    # x = mean(2.0, 0.7) + min = 1.35 + 0.7 = 2.05 -> cap 2
    row = ([-0.1, -0.5, -0.2], [-0.1, -1.5, -0.4], [-0.1, -2.0, -1.0], [-0.1, -1.0, -0.5])
    out = gm(*[[r, r] for r in row], correct=[True, False])
    assert out.tolist() == pytest.approx([2.0, -2.0])


def test_unclipped_value_and_sign():
    # did = [1.0, 0.4]: x = 0.7 + 0.4 = 1.1. Built as g(M) = g(pl) + did, decoy unmoved.
    base = [-1.0, -1.0, -1.0]
    g_m = [-1.0, 0.0, -0.6]
    out = gm([g_m] * 2, [base] * 2, [base] * 2, [base] * 2, correct=[True, False])
    assert out.tolist() == pytest.approx([1.1, -1.1])


def test_did_is_clipped_before_mean_and_min():
    # did = [5.0, 0.2] -> clipped [2, 0.2]: x = 1.1 + 0.2 = 1.3 (unclipped would be 2.8 -> cap 2)
    base = [-3.0, -3.0, -3.0]
    g_m = [-3.0, 2.0, -2.8]
    assert gm([g_m], [base], [base], [base], correct=[True]).tolist() == pytest.approx([1.3])
    # did = [-5, 1] -> [-2, 1]: x = -0.5 - 2 = -2.5 -> gate gives 0 on both sides
    g_m = [-3.0, -8.0, -2.0]
    assert gm([g_m] * 2, [base] * 2, [base] * 2, [base] * 2, correct=[True, False]).tolist() == [0.0, 0.0]


def test_decorative_meta_gold_and_decoy_move_together():
    g_p, d_p = [-1.0, -2.0, -3.0], [-1.0, -2.5, -1.5]
    g_m, d_m = [-1.0, -1.3, -2.3], [-1.0, -1.8, -0.8]  # both +0.7 at each divergent position
    assert gm([g_m], [g_p], [d_m], [d_p], correct=[True]).tolist() == pytest.approx([0.0], abs=1e-12)


def test_non_members():
    base = [-1.0, -1.0, -1.0]
    good = [-1.0, 0.0, -0.6]  # x = 1.1
    nan_unscored = [NAN, 0.0, -0.6]  # NaN at the shared (non-divergent) position is ignored
    nan_scored = [-1.0, NAN, -0.6]
    out = gm([good, nan_unscored, nan_scored, good], [base] * 4, [base] * 4, [base] * 4,
             correct=[True] * 4, member=[True, True, True, False])
    assert out[0].item() == pytest.approx(1.1) and out[1].item() == pytest.approx(1.1)
    assert math.isnan(out[2].item()) and math.isnan(out[3].item())
    # pair not scorable: no divergent position
    out = gm([good], [base], [base], [base], correct=[True], mask=torch.zeros(3, dtype=torch.bool))
    assert math.isnan(out.item())


def test_shape_mismatch_raises():
    z = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="decoy_logp_placebo"):
        gm_reward(z, z, z, torch.zeros(1, 2), DIV, torch.tensor([True]), member=torch.tensor([True]))
