"""Distillation losses of SPEC section 6 (selfdistill.algo.distill) on 3-5 token vocabularies:
hand-worked values, the reverse-KL identity of the sampled-token gradient, top-K (tail / no tail,
alpha 0 / 0.5 / 1) against a dense fp64 computation written here, and the aggregation (token mean per
row over loss mask x teacher mask, mean over rows, rows without a teacher count 0)."""

from __future__ import annotations

import math

import pytest
import torch

from selfdistill import ops
from selfdistill.algo.distill import cross_entropy_term, distill_term, sampled_token_loss
from selfdistill.algo.teacher import TeacherOutputs
from selfdistill.algo.update import StudentOutputs
from selfdistill.config import DistillConfig
from selfdistill.rollout.base import RolloutBatch

LN2 = math.log(2.0)


def _batch(completion_mask: torch.Tensor, forced: torch.Tensor | None = None) -> RolloutBatch:
    R, T = completion_mask.shape
    return RolloutBatch(prompt_ids=[[0]] * R, completion_ids=torch.zeros((R, T), dtype=torch.long),
                        completion_mask=completion_mask, forced_mask=forced if forced is not None else torch.zeros_like(completion_mask),
                        group_ids=torch.arange(R), with_arm=torch.ones(R, dtype=torch.bool))


def _student(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, old_logp=None) -> StudentOutputs:
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * mask
    return StudentOutputs(logp=logp, entropy=None, old_logp=logp.detach() if old_logp is None else old_logp)


def test_sampled_token_hand_worked_three_token_vocabulary():
    """S = (.5, .25, .25), T = (.25, .5, .25), sampled y = 1: A = log .5 - log .25 = ln 2,
    loss = -A log S(y) = 2 (ln 2)^2, d loss / d z = -A (e_y - S) = -ln2 (-.5, .75, -.25)."""
    z = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]], dtype=torch.float64)).requires_grad_(True)
    y = torch.tensor([[1]])
    logp = torch.log_softmax(z, -1)[..., 1]
    loss = sampled_token_loss(logp, logp.detach(), torch.log(torch.tensor([[0.5]], dtype=torch.float64)), is_clip=2.0)
    assert loss.item() == pytest.approx(2 * LN2 ** 2, rel=1e-12)
    loss.sum().backward()
    assert torch.allclose(z.grad[0, 0], torch.tensor([0.5, -0.75, 0.25], dtype=torch.float64) * LN2, atol=1e-12), z.grad
    assert y.shape == logp.shape


def test_sampled_token_gradient_is_the_reverse_kl_gradient_in_expectation():
    """On-policy (rho = 1): E_{y ~ S}[grad l(y)] = grad KL(S || T), exactly, over a 5-token vocabulary."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher_logp = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    s = torch.softmax(z, -1).detach()
    expected = torch.zeros(5, dtype=torch.float64)
    for y in range(5):
        logp = torch.log_softmax(z, -1)[y]
        (grad,) = torch.autograd.grad(sampled_token_loss(logp, logp.detach(), teacher_logp[y], 2.0), z)
        expected += s[y] * grad
    log_s = torch.log_softmax(z, -1)
    kl = (log_s.exp() * (log_s - teacher_logp)).sum()
    (kl_grad,) = torch.autograd.grad(kl, z)
    torch.testing.assert_close(expected, kl_grad, rtol=0, atol=1e-12)


def test_sampled_token_importance_weight_is_clipped():
    """log p - log p_old = log 3 -> rho = min(3, is_clip=2) = 2."""
    logp = torch.tensor([math.log(0.3)], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([math.log(0.1)], dtype=torch.float64)
    teacher = torch.tensor([math.log(0.6)], dtype=torch.float64)
    loss = sampled_token_loss(logp, old, teacher, is_clip=2.0)
    assert loss.item() == pytest.approx(-2 * LN2 * math.log(0.3), rel=1e-12)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-2 * LN2, rel=1e-12)  # rho and A are constants


def test_aggregation_token_mean_per_row_then_mean_over_rows_rows_without_teacher_count_zero():
    """Row 0 has a teacher and 2 loss tokens (its third is a forced token); row 1 has none:
    loss = (mean of row 0's two token losses + 0) / 2, and row 1's logits get no gradient."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, 0], [3, 0, 1]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    forced = torch.tensor([[False, False, True], [False, False, False]])
    teacher_logp = torch.log_softmax(torch.randn(2, 3, 4, generator=g, dtype=torch.float64), -1).gather(-1, targets[..., None])[..., 0]
    out = _student(logits, targets, mask)
    teacher = TeacherOutputs(has_teacher=torch.tensor([True, False]), logp=teacher_logp * torch.tensor([[1.0], [0.0]]))
    term = distill_term(DistillConfig(), teacher, _batch(mask, forced), "cpu", coef=1.0, temperature=1.0, token_weighting="uniform")
    loss, stats = term.fn(torch.arange(2), out)
    lp = out.logp.detach()
    per_token = -(teacher_logp[0, :2] - lp[0, :2]) * lp[0, :2]
    assert loss.item() == pytest.approx(per_token.mean().item() / 2, rel=1e-12)
    assert stats["self_distillation/teacher_student_kl"].item() == pytest.approx((lp[0, :2] - teacher_logp[0, :2]).mean().item(), rel=1e-12)
    loss.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0 and torch.count_nonzero(logits.grad[0, 2]) == 0
    assert torch.count_nonzero(logits.grad[0, :2]) > 0
    assert term.per_token is False and term.name == "distill"


def test_progressive_weights_apply_per_row():
    """ramp on a 3-token row: w = (0.5, 1.0, 1.5), already of mean 1 -> loss = sum w_t l_t / 3."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[4, 0, 2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = _student(logits, targets, mask)
    teacher_logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    teacher = TeacherOutputs(has_teacher=torch.tensor([True]), logp=teacher_logp)
    loss, _ = distill_term(DistillConfig(), teacher, _batch(mask), "cpu", coef=1.0, temperature=1.0,
                           token_weighting="ramp").fn(torch.arange(1), out)
    lp = out.logp.detach()[0]
    expected = (torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64) * -(teacher_logp[0] - lp) * lp).sum() / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_a_batch_without_any_teacher_has_loss_zero_and_a_zero_gradient():
    for loss_type in ("sampled_token", "topk"):
        logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        targets = torch.zeros(2, 3, dtype=torch.long)
        mask = torch.ones(2, 3, dtype=torch.bool)
        out = _student(logits, targets, mask)
        out.hidden, out.lm_head = torch.zeros(6, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
        teacher = TeacherOutputs(has_teacher=torch.zeros(2, dtype=torch.bool), logp=torch.full((2, 3), float("nan"), dtype=torch.float64))
        term = distill_term(DistillConfig(loss=loss_type), teacher, _batch(mask), "cpu", coef=1.0, temperature=1.0,
                            token_weighting="uniform")
        loss, _ = term.fn(torch.arange(2), out)
        assert loss.item() == 0.0 and loss.requires_grad, loss_type
        loss.backward()
        assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0, loss_type


def test_cross_entropy_term_is_the_weighted_token_mean():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, 0], [3, 0, 1]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = _student(logits, targets, mask)
    loss, _ = cross_entropy_term(_batch(mask), "cpu", "ramp").fn(torch.arange(2), out)
    lp = out.logp.detach()
    expected = -(0.5 * lp[0, 0] + 1.0 * lp[0, 1] + 1.5 * lp[0, 2] + 1.0 * lp[1, 0]) / 4  # L = 1 -> w = 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


# ----------------------------------------------------------------------------- top-K

def dense_topk_divergence(zs: torch.Tensor, zt: torch.Tensor, k: int, tail: bool, alpha: float) -> torch.Tensor:
    """SPEC section 6's top-K divergence per row, dense in fp64 (the independent reference)."""
    zs, zt = zs.double(), zt.double()
    idx = zs.detach().topk(k, -1).indices
    a = zs.gather(-1, idx) - torch.logsumexp(zs, -1, keepdim=True)
    b = zt.gather(-1, idx) - torch.logsumexp(zt, -1, keepdim=True)
    if tail:
        tail_of = lambda x: torch.log(-torch.expm1(torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)))  # noqa: E731
        a, b = torch.cat([a, tail_of(a)], -1), torch.cat([b, tail_of(b)], -1)
    else:
        a, b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = a.exp(), b.exp()
    if alpha == 0:
        return (q * (b - a)).sum(-1)
    if alpha == 1:
        return (p * (a - b)).sum(-1)
    m = torch.log((1 - alpha) * p + alpha * q)
    return (1 - alpha) * (p * (a - m)).sum(-1) + alpha * (q * (b - m)).sum(-1)


@pytest.mark.parametrize("tail", [True, False])
def test_dense_reference_matches_the_hand_worked_case(tail):
    """V = 3, K = 2, S = (.5, .3, .2), T = (.2, .5, .3): the student's top-2 are tokens 0, 1."""
    zs = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    zt = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    p, q = ([0.5, 0.3, 0.2], [0.2, 0.5, 0.3]) if tail else ([0.625, 0.375], [2 / 7, 5 / 7])
    kl = lambda x, y: sum(xi * math.log(xi / yi) for xi, yi in zip(x, y))  # noqa: E731
    m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
    for alpha, expected in ((0.0, kl(q, p)), (1.0, kl(p, q)), (0.5, 0.5 * kl(p, m) + 0.5 * kl(q, m))):
        assert dense_topk_divergence(zs, zt, 2, tail, alpha).item() == pytest.approx(expected, rel=1e-9), (alpha, tail)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_term_matches_dense_fp64(tail, alpha):
    """The topk term through the trainer's path (student hidden states and LM head, teacher hidden
    states and LM head, `ops.sequence_topk_distill`, masks and aggregation) against the dense fp64
    computation: loss and the gradients to hidden states and LM head. V = 5, K = 3, T = 0.7."""
    g = torch.Generator().manual_seed(4)
    V, H, K, temp = 5, 3, 3, 0.7
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    has = torch.tensor([True, False, True])
    N = int(mask.sum())
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden_all = torch.randn(N, H, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    scored = (mask & has[:, None])[mask]
    counts = mask.sum(1) * has
    teacher = TeacherOutputs(has_teacher=has, logp=torch.zeros(3, 3, dtype=torch.float64), hidden=t_hidden_all[scored],
                             offsets=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]), lm_head=t_weight)
    targets = torch.zeros(3, 3, dtype=torch.long)
    logits = torch.zeros(3, 3, V, dtype=torch.float64).masked_scatter(mask[..., None].expand(3, 3, V), hidden @ weight.t())
    out = _student(logits, targets, mask)
    out.hidden, out.lm_head = hidden, weight
    term = distill_term(DistillConfig(loss="topk", topk=K, tail=tail, alpha=alpha), teacher, _batch(mask), "cpu", coef=1.0,
                        temperature=temp, token_weighting="uniform")
    assert term.needs_hidden
    loss, _ = term.fn(torch.arange(3), out)
    grads = torch.autograd.grad(loss, (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    per_pos = dense_topk_divergence((h2 @ w2.t()) / temp, (t_hidden_all @ t_weight.t()) / temp, K, tail, alpha)
    per_row = torch.zeros(3, 3, dtype=torch.float64).masked_scatter(mask, per_pos)
    row_means = torch.stack([per_row[r][mask[r]].mean() if has[r] else per_row.new_zeros(()) for r in range(3)])
    expected = row_means.mean()
    expected_grads = torch.autograd.grad(expected, (h2, w2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(grads[0][~scored]) == 0  # row 1 has no teacher


def test_topk_term_dispatches_to_the_op(monkeypatch):
    """The topk term calls `ops.sequence_topk_distill` (the op with the SPEC section 8 contract)."""
    calls = []
    real = ops.sequence_topk_distill

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "sequence_topk_distill", spy)
    mask = torch.ones(1, 2, dtype=torch.bool)
    hidden = torch.randn(2, 3, requires_grad=True)
    weight = torch.randn(4, 3, requires_grad=True)
    teacher = TeacherOutputs(has_teacher=torch.tensor([True]), logp=torch.zeros(1, 2), hidden=torch.randn(2, 3),
                             offsets=torch.tensor([0, 2]), lm_head=torch.randn(4, 3))
    out = StudentOutputs(logp=torch.zeros(1, 2, requires_grad=True), entropy=None, old_logp=torch.zeros(1, 2),
                         hidden=hidden, lm_head=weight)
    distill_term(DistillConfig(loss="topk", topk=2), teacher, _batch(mask), "cpu", coef=1.0, temperature=1.0,
                 token_weighting="uniform").fn(torch.arange(1), out)
    assert calls == [torch.Size([2, 3])]
