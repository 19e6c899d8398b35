"""Policy-loss reference (selfdistill.ops.reference.policy_loss) against hand-worked cases, SPEC 5/7."""

from __future__ import annotations

import math

import pytest
import torch

from selfdistill.ops.reference import kl_penalty, policy_loss, progressive_token_weights


def _t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def _loss(logp, old, adv, mask, **kw):
    lengths = torch.tensor(mask).sum(1) if "lengths" not in kw else kw.pop("lengths")
    return policy_loss(logp, old, adv, torch.tensor(mask, dtype=torch.bool), lengths, **kw)


# Two sequences, on-policy (ratio 1): per-token loss = -A.
MASK = [[1, 1, 0], [1, 1, 1]]
ADV = [[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]]


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", 0.5),  # seq means -1 and +2, then mean
        ("gspo", 0.5),  # ratio 1 everywhere: same as grpo
        ("dapo", 0.8),  # (-1 -1 +2 +2 +2) / 5 tokens
        ("dr_grpo", 0.5),  # sum 4 / (2 sequences * max_len 4)
    ],
)
def test_aggregations_on_policy(loss_type, expected):
    logp = _t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    loss, _ = _loss(logp, logp.detach(), _t(ADV), MASK, loss_type=loss_type, max_len_norm=4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_clip_higher_bounds_and_zero_gradient_when_clipped():
    # A>0, r=1.5 -> clipped at 1 + 0.28; A<0, r=0.5 -> clipped at 1 - 0.2
    logp = _t([[math.log(1.5)], [math.log(0.5)]], grad=True)
    old = _t([[0.0], [0.0]])
    loss, stats = _loss(logp, old, _t([[1.0], [-1.0]]), [[1], [1]])
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2, abs=1e-12)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp.grad))
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(0.5)


def test_unclipped_gradient_is_ratio_times_advantage():
    logp = _t([[math.log(1.1)]], grad=True)
    loss, _ = _loss(logp, _t([[0.0]]), _t([[2.0]]), [[1]])
    loss.backward()
    assert loss.item() == pytest.approx(-2.2)
    assert logp.grad.item() == pytest.approx(-2.2)  # d(-r A)/dlogp = -r A


def test_dual_clip_caps_negative_advantage_loss():
    logp = _t([[math.log(5.0)]])
    old = _t([[0.0]])
    no_dual, _ = _loss(logp, old, _t([[-1.0]]), [[1]])
    dual, _ = _loss(logp, old, _t([[-1.0]]), [[1]], dual_clip=3.0)
    assert no_dual.item() == pytest.approx(5.0)  # -min(-5, -1.28)
    assert dual.item() == pytest.approx(3.0)  # min(5, 3 * 1)


def test_kl_estimators_hand_worked():
    logp, ref = _t([-1.0]), _t([-2.0])  # log pi/ref = 1
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0))  # e^-1 + 1 - 1
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_kl_and_entropy_terms_enter_the_loss():
    logp = _t([[-1.0]])
    loss, stats = _loss(logp, logp.detach(), _t([[0.0]]), [[1]], ref_logp=_t([[-2.0]]), kl_coef=0.1,
                        kl_estimator="k1", entropy=_t([[2.0]]), entropy_coef=0.01)
    assert loss.item() == pytest.approx(0.1 * 1.0 - 0.01 * 2.0)
    assert stats["kl"].item() == pytest.approx(1.0) and stats["entropy"].item() == pytest.approx(2.0)


def test_gspo_uses_sequence_geometric_mean_ratio():
    # token log-ratios 0.1 and 0.3 -> s = exp(0.2) for both tokens; A = 1, not clipped by 1.28
    logp = _t([[0.1, 0.3]], grad=True)
    loss, _ = _loss(logp, _t([[0.0, 0.0]]), _t([[1.0, 1.0]]), [[1, 1]], loss_type="gspo")
    s = math.exp(0.2)
    assert loss.item() == pytest.approx(-s)
    loss.backward()
    assert torch.allclose(logp.grad, _t([[-s / 2, -s / 2]]))


def test_progressive_weights_hand_worked():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    lengths = torch.tensor([3, 4, 1, 2])
    w = progressive_token_weights(lengths, mask, "ramp")
    # L=3: 0.5, 1.0, 1.5 (mean 1 already)
    assert torch.allclose(w[0], torch.tensor([0.5, 1.0, 1.5, 0.0]))
    # L=4, first token forced: raw 0.5, 5/6, 7/6, 1.5; masked-in mean 7/6
    assert torch.allclose(w[1], torch.tensor([0.0, (5 / 6) / (7 / 6), 1.0, 1.5 / (7 / 6)]))
    assert torch.equal(w[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # L = 1 -> 1
    assert torch.equal(w[3], torch.zeros(4))  # nothing in the mask -> all 0
    assert torch.equal(progressive_token_weights(lengths, mask, "uniform"), mask.float())


def test_ramp_weights_scale_the_per_token_loss():
    logp = _t([[0.0, 0.0, 0.0]])
    adv = _t([[1.0, 0.0, 0.0]])  # only the first token carries loss: weight 0.5
    loss, _ = _loss(logp, logp.detach(), adv, [[1, 1, 1]], token_weighting="ramp", loss_type="dapo")
    assert loss.item() == pytest.approx(-0.5 / 3)


def test_masked_tokens_contribute_nothing():
    logp = _t([[-1.0, 5.0]], grad=True)
    loss, _ = _loss(logp, _t([[-1.0, -9.0]]), _t([[1.0, 100.0]]), [[1, 0]], lengths=torch.tensor([2]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert logp.grad[0, 1].item() == 0.0
