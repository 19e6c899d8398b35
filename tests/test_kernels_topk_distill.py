"""Top-K distillation (SPEC sections 6 and 8): the Triton kernels (kernels/topk_distill.py under
selfdistill/ops/topk_distill_host.py) and the chunked torch reference against a dense fp64
computation written here: full log_softmax of both sides, the student's top-K, the tail category or
the renormalisation, and the divergence in probability space with M = (1-alpha) P + alpha Q.

CPU through the Triton interpreter, fp32 inputs (bf16 on the torch path only). Criterion as for the
other kernels (SPEC section 8): error vs fp64 no worse than max(2 * torch's own error in the same
dtype, floor). Errors are plain max-abs differences, so a NaN fails them.
"""

import importlib
import itertools
import os

# Read when selfdistill.kernels is first imported, and again by triton at its first interpreted
# launch (so it stays set for the rest of this pytest process).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

kernels = pytest.importorskip("selfdistill.kernels")
if not kernels.INTERPRETED:
    pytest.skip("selfdistill.kernels was imported before TRITON_INTERPRET=1; run kernel tests in their own process", allow_module_level=True)

from selfdistill import ops  # noqa: E402
from selfdistill.ops import reference  # noqa: E402

topk_module = importlib.import_module("selfdistill.kernels.topk_distill")  # the package attribute is the function

FUSED = (kernels.fused_linear_topk_distill, reference.fused_linear_topk_distill)
ON_LOGITS = (kernels.topk_distill, reference.topk_distill)


def divergence(a, b, tail, alpha):
    """The section-6 divergence from log-probs a (student), b (teacher) at the K indices."""
    if tail:
        def with_tail(x):
            lse = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
            return torch.cat([x, torch.log(-torch.expm1(lse))], -1)

        a, b = with_tail(a), with_tail(b)
    else:
        a, b = a - torch.logsumexp(a, -1, keepdim=True), b - torch.logsumexp(b, -1, keepdim=True)
    P, Q = a.exp(), b.exp()

    def kl(X, log_x, log_y):
        return torch.where(X > 0, X * (log_x - log_y), 0.0).sum(-1)

    if alpha == 0:
        return kl(Q, b, a)
    if alpha == 1:
        return kl(P, a, b)
    log_m = ((1 - alpha) * P + alpha * Q).log()
    return (1 - alpha) * kl(P, a, log_m) + alpha * kl(Q, b, log_m)


def dense(logits, teacher_logits, temperature, k, tail, alpha, idx=None):
    """Per-row loss from full [N, V] logits (fp64 = ground truth; fp32 / bf16 logits upcast to fp32
    = torch's own result in that dtype)."""
    def log_softmax(x):
        return torch.log_softmax((x if x.dtype == torch.float64 else x.float()) / temperature, -1)

    if idx is None:
        idx = logits.detach().topk(k, -1).indices
    return divergence(log_softmax(logits).gather(-1, idx), log_softmax(teacher_logits.detach()).gather(-1, idx), tail, alpha)


def dense_fused(hidden, weight, teacher_hidden, teacher_weight, temperature, k, tail, alpha):
    return dense(hidden @ weight.t(), teacher_hidden @ teacher_weight.t(), temperature, k, tail, alpha)


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def run_fused(fn, hidden, weight, teacher_hidden, teacher_weight, g, *args, **kwargs):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, teacher_hidden, teacher_weight, *args, **kwargs)
    (loss * g.to(loss.dtype)).sum().backward()
    return loss.detach(), h.grad, w.grad


def run_logits(fn, logits, teacher_logits, g, *args, **kwargs):
    z = logits.detach().clone().requires_grad_()
    loss = fn(z, teacher_logits, *args, **kwargs)
    (loss * g.to(loss.dtype)).sum().backward()
    return loss.detach(), z.grad


def make(N, H, V, seed):
    """Student and a teacher near it (as a self-teacher is): logits of spread ~3, tails of 1-40%."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (3.0 / H**0.5)
    teacher_hidden = hidden + 0.5 * torch.randn(N, H, generator=gen)
    teacher_weight = weight + 0.3 * torch.randn(V, H, generator=gen) / H**0.5
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    return hidden, weight, teacher_hidden, teacher_weight, g


def assert_no_worse_than_torch(name, got, torch_own, truth, floor):
    e_got, e_torch = err(got, truth), err(torch_own, truth)
    assert e_got <= max(2 * e_torch, floor), f"{name}: error {e_got:.3g} vs fp64, torch's own {e_torch:.3g}, floor {floor:.1g}"


# (N, H, V, K, chunk_rows, temperature): N < V (the backward walks vocabulary slices; V over two
# interpreter tiles) and N >= V (row chunks; a chunk that does not divide N)
SHAPES = [(9, 16, 300, 20, 4, 0.7), (40, 8, 37, 5, 16, 1.0)]


@pytest.mark.parametrize("N,H,V,K,chunk_rows,temperature", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_fused_linear_forward_and_gradients_match_fp64(N, H, V, K, chunk_rows, temperature, alpha, tail):
    hidden, weight, t_hidden, t_weight, g = make(N, H, V, seed=N * 7 + V)
    args = (temperature, K, tail, alpha)
    truth = run_fused(dense_fused, hidden.double(), weight.double(), t_hidden.double(), t_weight.double(), g, *args)
    torch32 = run_fused(dense_fused, hidden, weight, t_hidden, t_weight, g, *args)
    for impl in FUSED:
        got = run_fused(impl, hidden, weight, t_hidden, t_weight, g, *args, chunk_rows=chunk_rows)
        assert got[0].dtype == torch.float32 and got[0].shape == (N,)
        for name, i in (("loss", 0), ("dhidden", 1), ("dweight", 2)):
            assert_no_worse_than_torch(f"{impl.__module__} {name}", got[i], torch32[i], truth[i], floor=1e-5)


@pytest.mark.parametrize("alpha,tail", [(0.5, True), (0.0, False), (1.0, True)])
def test_logits_variant_matches_fp64(alpha, tail):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 400, generator=gen) * 3
    teacher = logits + torch.randn(6, 400, generator=gen)
    g = torch.randn(6, generator=gen, dtype=torch.float64)
    truth = run_logits(dense, logits.double(), teacher.double(), g, 1.3, 30, tail, alpha)
    torch32 = run_logits(dense, logits, teacher, g, 1.3, 30, tail, alpha)
    for impl in ON_LOGITS:
        got = run_logits(impl, logits, teacher, g, 1.3, 30, tail, alpha)
        for name, i in (("loss", 0), ("dlogits", 1)):
            assert_no_worse_than_torch(f"{impl.__module__} {name}", got[i], torch32[i], truth[i], floor=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_k_equals_vocabulary(alpha):
    """K = V: every token is a category. Renormalised, the full-vocabulary divergence. With the tail
    the clamp gives both sides a tail of 1e-7 (SPEC section 6); whether fp32 rounding of lse_K
    (~1e-7) lands on the clamp or just below it opens or shuts the tail's gradient path, whose factor
    is 1 / (tail mass) ~ 1e7: the gradient is ill-conditioned there, so with the tail only the loss
    is compared and the gradients must be finite."""
    hidden, weight, t_hidden, t_weight, g = make(5, 8, 50, seed=3)
    for tail in (False, True):
        args = (1.0, 50, tail, alpha)
        truth = run_fused(dense_fused, hidden.double(), weight.double(), t_hidden.double(), t_weight.double(), g, *args)
        torch32 = run_fused(dense_fused, hidden, weight, t_hidden, t_weight, g, *args)
        for impl in FUSED:
            got = run_fused(impl, hidden, weight, t_hidden, t_weight, g, *args, chunk_rows=2)
            assert_no_worse_than_torch(f"{impl.__module__} loss tail={tail}", got[0], torch32[0], truth[0], floor=1e-5)
            if tail:
                assert all(bool(torch.isfinite(x).all()) for x in got), impl.__module__
            else:
                for name, i in (("dhidden", 1), ("dweight", 2)):
                    assert_no_worse_than_torch(f"{impl.__module__} {name}", got[i], torch32[i], truth[i], floor=1e-5)


def test_ties_in_the_student_topk():
    """Row 0: three logits tie at the top and two more tie below them, K=5 takes all five (ties
    inside the top-K: one answer). Row 1: three tie for the last two places; the teacher is equal on
    them too, so the loss is the same whichever two are taken, and the gradient must be the fp64
    gradient of one of the three valid choices."""
    V, K = 40, 5
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, V, generator=gen, dtype=torch.float64).clamp(-2, 1.5)
    teacher = logits + 0.5 * torch.randn(2, V, generator=gen, dtype=torch.float64)
    logits[0, [3, 17, 29]] = 5.0
    logits[0, [8, 30]] = 3.0
    logits[1, [1, 2, 4]] = torch.tensor([6.0, 5.5, 5.0], dtype=torch.float64)
    logits[1, [10, 20, 35]] = 4.0
    teacher[1, [10, 20, 35]] = 2.5
    g = torch.tensor([0.7, -1.3], dtype=torch.float64)
    fixed = torch.tensor([1, 2, 4])
    choices = [torch.stack([torch.tensor([3, 17, 29, 8, 30]), torch.cat([fixed, torch.tensor(pair)])])
               for pair in itertools.combinations([10, 20, 35], 2)]
    for alpha, tail in ((0.5, True), (1.0, False)):
        truths = [run_logits(dense, logits, teacher, g, 1.0, K, tail, alpha, idx=idx) for idx in choices]
        for impl in ON_LOGITS:
            loss, dlogits = run_logits(impl, logits.float(), teacher.float(), g, 1.0, K, tail, alpha)
            assert err(loss, truths[0][0]) < 1e-5, impl.__module__
            assert err(dlogits[0], truths[0][1][0]) < 1e-5, impl.__module__
            assert min(err(dlogits[1], t[1][1]) for t in truths) < 1e-5, impl.__module__


def test_bf16_torch_reference_no_worse_than_torch_bf16():
    """bf16 inputs on the torch path (the interpreter's bf16 math is not trustworthy). The student's
    top-K is made unambiguous (a planted gap well above bf16's logit resolution), so the fp64 truth
    and the bf16 runs take the same K tokens."""
    N, H, V, K = 12, 32, 500, 16
    hidden, weight, t_hidden, t_weight, g = make(N, H, V, seed=8)
    planted = torch.randperm(V, generator=torch.Generator().manual_seed(8))[:K]
    for h, w in ((hidden, weight), (t_hidden, t_weight)):
        h[:, 0] = 1.0
        w[:, 0] = 0.0
        w[planted, 0] = 8.0
    bf = [x.to(torch.bfloat16) for x in (hidden, weight, t_hidden, t_weight)]
    for alpha, tail in ((0.5, True), (0.0, False), (1.0, True)):
        args = (0.9, K, tail, alpha)
        truth = run_fused(dense_fused, *[x.double() for x in bf], g, *args)
        torch_bf16 = run_fused(dense_fused, *bf, g, *args)
        got = run_fused(reference.fused_linear_topk_distill, *bf, g, *args, chunk_rows=5)
        assert got[1].dtype == got[2].dtype == torch.bfloat16
        for name, i, floor in (("loss", 0, 1e-4), ("dhidden", 1, 1e-3), ("dweight", 2, 1e-3)):
            assert_no_worse_than_torch(f"bf16 {name} alpha={alpha} tail={tail}", got[i], torch_bf16[i], truth[i], floor)


def banned_rows():
    """Logits [4, 600] (the interpreter's vocabulary tile is 256): row 0 bans its first 300 tokens
    on both sides (whole leading tiles of -inf), row 1 leaves 12 tokens (fewer than K), row 2's
    teacher bans three of the student's top tokens, row 3 is plain."""
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(4, 600, generator=gen, dtype=torch.float64) * 2
    teacher = logits + 0.7 * torch.randn(4, 600, generator=gen, dtype=torch.float64)
    inf = float("-inf")
    logits[0, :300] = teacher[0, :300] = inf
    keep = torch.randperm(600, generator=gen)[:12]
    banned = torch.ones(600, dtype=torch.bool)
    banned[keep] = False
    logits[1, banned] = teacher[1, banned] = inf
    teacher[2, logits[2].topk(3).indices] = inf
    return logits, teacher


def banned_truth(logits, teacher, g, temperature, k, tail, alpha):
    """fp64 per row over the tokens the student allows (a token banned on both sides is no category
    and has p = 0 in the full softmax; with fewer than K allowed tokens, K shrinks to that count)."""
    losses, grads = [], torch.zeros_like(logits)
    for r in range(logits.shape[0]):
        allowed = torch.isfinite(logits[r])
        z = logits[r, allowed].unsqueeze(0)
        loss, dz = run_logits(dense, z, teacher[r, allowed].unsqueeze(0), g[r:r + 1], temperature, min(k, z.shape[1]), tail, alpha)
        losses.append(loss)
        grads[r, allowed] = dz[0]
    return torch.cat(losses), grads


# row 2 under alpha=1 has an infinite loss and a nonzero upstream gradient: its gradient is inf - inf
# in the kernels as in the reference's autograd (the interpreter says so in numpy warnings)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_banned_tokens_stay_finite_where_the_reference_is(alpha, tail):
    logits, teacher = banned_rows()
    g = torch.tensor([0.5, -1.0, 0.8, 1.2], dtype=torch.float64)
    k = 20
    truth_loss, truth_grad = banned_truth(logits, teacher, g, 1.1, k, tail, alpha)
    # row 1 has fewer allowed tokens than K: with the tail that is the K = V edge (see above), so
    # its gradient is compared only without the tail
    compared = [0, 2, 3] if tail else [0, 1, 2, 3]
    for impl in ON_LOGITS:
        loss, dlogits = run_logits(impl, logits.float(), teacher.float(), g, 1.1, k, tail, alpha)
        assert torch.equal(torch.isfinite(loss), torch.isfinite(truth_loss)), (impl.__module__, loss, truth_loss)
        finite = torch.isfinite(truth_loss)
        assert err(loss[finite], truth_loss[finite]) < 1e-5, impl.__module__
        if alpha == 1.0:
            assert loss[2] == float("inf")  # KL(S||T) where the teacher bans what the student ranks high
        rows = [r for r in compared if finite[r]]
        assert torch.isfinite(dlogits[rows]).all(), impl.__module__
        assert err(dlogits[rows], truth_grad[rows]) < 1e-5, impl.__module__


def test_shared_teacher_weight_takes_gradient_only_through_the_student():
    hidden, weight, t_hidden, _, g = make(7, 12, 200, seed=9)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (dense_fused(h64, w64, t_hidden.double(), w64.detach(), 1.0, 10, True, 0.5) * g).sum().backward()
    truth_h, truth_w = h64.grad, w64.grad
    for impl in FUSED:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = impl(h, w, t_hidden, w, 1.0, 10, True, 0.5, chunk_rows=3)  # the very same tensor as teacher weight
        (loss * g.float()).sum().backward()
        assert err(h.grad, truth_h) < 1e-5 and err(w.grad, truth_w) < 1e-5, impl.__module__


def test_chunking_does_not_change_the_result_and_runs_are_deterministic():
    hidden, weight, t_hidden, t_weight, g = make(10, 16, 500, seed=4)
    one = run_fused(kernels.fused_linear_topk_distill, hidden, weight, t_hidden, t_weight, g, 1.0, 25, True, 0.5, chunk_rows=1)
    all_rows = run_fused(kernels.fused_linear_topk_distill, hidden, weight, t_hidden, t_weight, g, 1.0, 25, True, 0.5)
    again = run_fused(kernels.fused_linear_topk_distill, hidden, weight, t_hidden, t_weight, g, 1.0, 25, True, 0.5, chunk_rows=1)
    assert all(err(a, b) < 1e-5 for a, b in zip(one, all_rows))
    assert all(torch.equal(a, b) for a, b in zip(one, again))


def test_teacher_in_another_dtype_than_the_student():
    """A teacher held in another precision gets its own logits tile (the student's is fp32 here)."""
    hidden, weight, t_hidden, t_weight, g = make(6, 8, 300, seed=12)
    same = run_fused(kernels.fused_linear_topk_distill, hidden, weight, t_hidden, t_weight, g, 1.0, 10, True, 0.5, chunk_rows=4)
    for impl in FUSED:
        other = run_fused(impl, hidden, weight, t_hidden.double(), t_weight.double(), g, 1.0, 10, True, 0.5, chunk_rows=4)
        assert all(err(a, b) < 1e-5 for a, b in zip(same, other)), impl.__module__


def test_masked_positions_contribute_exactly_nothing():
    """A position the caller masks out (upstream gradient 0) gives 0 gradient, even where its
    divergence is infinite (Triton path; the torch reference's autograd gives 0 * inf = NaN there)."""
    logits, teacher = banned_rows()
    keep = torch.tensor([True, True, False, True])
    z = logits.float().requires_grad_()
    loss = kernels.topk_distill(z, teacher.float(), 1.0, 20, True, 1.0)
    assert loss[2] == float("inf")
    torch.where(keep, loss, 0.0).sum().backward()
    assert torch.all(z.grad[2] == 0) and torch.isfinite(z.grad).all()

    hidden, weight, t_hidden, t_weight, _ = make(8, 16, 300, seed=5)
    rows = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)

    def dweight(h):
        w = weight.clone().requires_grad_()
        torch.where(rows, kernels.fused_linear_topk_distill(h, w, t_hidden, t_weight, 1.0, 10, chunk_rows=3), 0.0).sum().backward()
        return w.grad

    garbage = hidden.clone()
    garbage[~rows] = torch.randn(int((~rows).sum()), 16) * 50
    assert err(dweight(hidden), dweight(garbage)) < 1e-6


class _LaunchCounter:
    """Stands in for a @triton.jit kernel: counts `kernel[grid](...)` launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_dispatch_runs_the_triton_kernels_under_triton_and_not_under_torch(monkeypatch):
    names = ("_topk_logprobs_kernel", "_topk_divergence_kernel", "_topk_distill_bwd_kernel")
    counters = {n: _LaunchCounter(getattr(topk_module, n)) for n in names}
    for n, c in counters.items():
        monkeypatch.setattr(topk_module, n, c)
    hidden, weight, t_hidden, t_weight, g = make(5, 8, 100, seed=6)
    truth = run_fused(dense_fused, hidden.double(), weight.double(), t_hidden.double(), t_weight.double(), g, 1.1, 7, True, 0.5)
    assert ops.get_backend() == "auto" and ops.resolve("cpu") == "torch"
    try:
        ops.set_backend("torch")
        ops.reset_call_counts()
        torch_run = run_fused(ops.sequence_topk_distill, hidden, weight, t_hidden, t_weight, g, 1.1, 7)
        assert all(c.launches == 0 for c in counters.values())
        assert ops.call_counts() == {("fused_linear_topk_distill", "torch"): 1}
        ops.set_backend("triton")
        ops.reset_call_counts()
        triton_run = run_fused(ops.sequence_topk_distill, hidden, weight, t_hidden, t_weight, g, 1.1, 7)
        assert ops.call_counts() == {("fused_linear_topk_distill", "triton"): 1}
        # per side and chunk one vocabulary pass; one divergence launch; one backward per tile
        assert counters["_topk_logprobs_kernel"].launches == 2 and counters["_topk_divergence_kernel"].launches == 1
        assert counters["_topk_distill_bwd_kernel"].launches >= 1
        logits_loss = ops.dispatched_topk_distill(hidden @ weight.t(), t_hidden @ t_weight.t(), 1.1, 7)
        assert counters["_topk_logprobs_kernel"].launches == 4
        ops.set_backend("cuda")
        with pytest.raises(NotImplementedError, match="ops.backend=triton or torch"):
            ops.sequence_topk_distill(hidden, weight, t_hidden, t_weight, 1.1, 7)
    finally:
        ops.set_backend("auto")
    for run in (torch_run, triton_run):
        assert all(err(a, b) < 1e-5 for a, b in zip(run, truth))
    assert err(logits_loss, truth[0]) < 1e-5


@pytest.mark.parametrize("impl", FUSED)
def test_input_validation(impl):
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="k=11 must be in \\[1, V=10\\]"):
        impl(h, w, h, w, 1.0, 11)
    with pytest.raises(ValueError, match="k=0"):
        impl(h, w, h, w, 1.0, 0)
    with pytest.raises(ValueError, match="alpha=1.5"):
        impl(h, w, h, w, 1.0, 3, True, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        impl(h, w, h, w, 0.0, 3)
    with pytest.raises(ValueError, match="same V=10"):
        impl(h, w, h, torch.randn(9, 4), 1.0, 3)
    with pytest.raises(ValueError, match="cast one"):
        impl(h, w.double(), h, w, 1.0, 3)
    with pytest.raises(ValueError, match="logits \\[N, V\\] of one shape"):
        (kernels.topk_distill if impl is kernels.fused_linear_topk_distill else reference.topk_distill)(h, h[:2], 1.0, 2)
