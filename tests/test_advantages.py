"""Group centring, meta weight, routing and zero-variance stats (SPEC section 4)."""

import math

import pytest
import torch

from selfdistill.algo.advantages import group_centered, meta_weight, reward_metrics, route_advantages, zero_std_stats
from selfdistill.rewards import meta_regions

NAN, INF = float("nan"), float("inf")
O, C, EOS, PAD = 100, 101, 2, 0


def test_group_centered_no_std_division():
    v = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    adv, member = group_centered(v, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert adv.tolist() == pytest.approx([4 / 3, -2 / 3, -2 / 3, 0.0, 0.0, 0.0])
    assert member.all()


def test_non_member_never_moves_siblings():
    with_nan, _ = group_centered(torch.tensor([0.3, NAN, 0.1, INF]), torch.tensor([5, 5, 5, 5]))
    without, _ = group_centered(torch.tensor([0.3, 0.1]), torch.tensor([5, 5]))
    assert torch.equal(with_nan[[0, 2]], without)  # exactly, not approximately
    assert without.tolist() == pytest.approx([0.1, -0.1])
    assert with_nan[[1, 3]].tolist() == [0.0, 0.0]
    # changing the non-member's value changes nothing
    other, _ = group_centered(torch.tensor([0.3, NAN, 0.1, -INF]), torch.tensor([5, 5, 5, 5]))
    assert torch.equal(other, with_nan)


def test_single_member_and_empty_groups_get_zero():
    adv, member = group_centered(torch.tensor([0.7, NAN, NAN, NAN, 2.0, 1.0]), torch.tensor([9, 9, 4, 4, 1, 1]))
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, -0.5]
    assert member.tolist() == [True, False, False, False, True, True]


def test_meta_weight():
    assert meta_weight(0) == 0.0  # the first batch has weight 0
    assert meta_weight(40) == pytest.approx(0.4)
    assert meta_weight(80) == pytest.approx(0.8)
    assert meta_weight(1000) == pytest.approx(0.8)
    assert meta_weight(0, weight=0.8, warmup=0) == pytest.approx(0.8)
    assert meta_weight(10, weight=1.0, warmup=20) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="steps_applied"):
        meta_weight(-1)


def regions(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (T - len(r)) for r in rows])
    return meta_regions(ids, torch.tensor([len(r) for r in rows]), O, C)


def test_meta_route_exact_values():
    # body body <meta> m m </meta> answer answer EOS | row 1: no meta, shorter (padding)
    r = regions([[5, 6, O, 7, 8, C, 9, 10, EOS], [5, 6, EOS]])
    adv = route_advantages(torch.tensor([0.5, -1.5]), torch.tensor([0.25, 3.0]), "meta",
                           meta_mask=r.meta, answer_mask=r.answer, valid_mask=r.valid, meta_w=0.8)
    assert adv.dtype == torch.float32
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 0.5, 0.5, 0.5])
    # no meta: correctness everywhere, the meta advantage goes nowhere; padding 0
    assert adv[1].tolist() == pytest.approx([-1.5, -1.5, -1.5, 0, 0, 0, 0, 0, 0])


def test_meta_route_unclosed_nested_and_stray():
    r = regions([
        [5, O, 7, 8],  # unclosed: meta runs to the end
        [5, O, O, 7, C, 8, C, 9],  # nested <|meta|> is content; the second </meta> is text
    ])
    adv = route_advantages(torch.tensor([1.0, 1.0]), torch.tensor([-0.5, -0.5]), "meta",
                           meta_mask=r.meta, answer_mask=r.answer, valid_mask=r.valid, meta_w=1.0, dtype=torch.float64)
    assert adv[0].tolist() == [1.0, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    assert adv[1].tolist() == [1.0, -0.5, -0.5, -0.5, -0.5, 1.0, 1.0, 1.0]


def test_answer_with_arm_route_adds_to_correctness():
    rows = [[5, O, 7, C, 9, 10], [5, O, 7, C, 9, 10], [5, 6, 7], [5, O, 7]]
    r = regions(rows)
    adv = route_advantages(
        torch.tensor([1.0, 1.0, -1.0, 2.0]), torch.tensor([0.25, 0.25, 0.5, 1.0]), "answer_with_arm",
        meta_mask=r.meta, answer_mask=r.answer, valid_mask=r.valid,
        with_arm=torch.tensor([True, False, True, True]), meta_w=0.5, dtype=torch.float64,
    )
    assert adv[0].tolist() == [1.0, 0.0, 0.0, 0.0, 1.125, 1.125]  # answer: 1 + 0.5 * 0.25
    assert adv[1].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # without arm: correctness only
    assert adv[2].tolist() == [-0.75, -0.75, -0.75, 0.0, 0.0, 0.0]  # no meta: all answer
    assert adv[3].tolist() == [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # unclosed: no answer tokens


def test_base_route_and_errors():
    r = regions([[5, O, 7, C, 9]])
    kw = dict(meta_mask=r.meta, answer_mask=r.answer, valid_mask=r.valid)
    adv = route_advantages(torch.tensor([1.0]), None, None, **kw)
    assert adv[0].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="meta_w"):
        route_advantages(torch.tensor([1.0]), torch.tensor([1.0]), "meta", **kw)
    with pytest.raises(ValueError, match="with_arm"):
        route_advantages(torch.tensor([1.0]), torch.tensor([1.0]), "answer_with_arm", meta_w=1.0, **kw)
    with pytest.raises(ValueError, match="answer_with_arm"):
        route_advantages(torch.tensor([1.0]), torch.tensor([1.0]), "answers", meta_w=1.0, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        route_advantages(torch.tensor([1.0]), torch.tensor([NAN]), "meta", meta_w=1.0, **kw)


def test_zero_std_stats_and_filter():
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    heads = {
        "correctness": torch.tensor([1.0, 1, 1, 1, -1, 1, -1, -1, -1, 1, 1, 1]),
        "pmi": torch.tensor([0.1, 0.2, NAN, NAN, NAN, NAN, NAN, 0.3, NAN, 0.05, 0.05, 0.05]),
    }
    s = zero_std_stats(heads, g)
    # correctness constant in groups 0, 2, 3; pmi constant in 1 (no member), 2 (one), 3 (equal)
    assert s.constant["correctness"].tolist() == [True, False, True, True]
    assert s.constant["pmi"].tolist() == [False, True, True, True]
    assert s.frac_reward_zero_std == 0.75 and s.frac_zero_std("pmi") == 0.75
    assert s.keep_group.tolist() == [True, True, False, False]
    assert s.keep.tolist() == [True] * 6 + [False] * 6
    m = reward_metrics(heads, g)
    assert m["frac_reward_zero_std"] == 0.75
    assert m["reward/pmi/frac_zero_std"] == 0.75
    assert m["reward/pmi/nan_frac"] == pytest.approx(6 / 12)
    assert m["reward/correctness/nan_frac"] == 0.0
    with pytest.raises(ValueError, match="correctness"):
        zero_std_stats({"pmi": heads["pmi"]}, g)
