"""The fused contrast family, SPEC sections 1-2 and 8: `gold_decoy_contrast` from the scorer's hidden
states, `clipped_mean_min` and `belief_shift`, in the Triton kernels (kernels/contrast.py, through the
interpreter) and the csrc extension (csrc/contrast.cpp, its CPU path), each checked against the same
independent references, beside the torch reference itself.

The ground truth of the contrast is the two-pass definition in fp64 on the same numbers: logits =
h @ W.T + b of every read, log_softmax of the gold pass's row at the gold token minus that of the
decoy pass's row at the decoy token. At a row's first divergent position the two passes share
their prefix, so the test's decoy hidden state there equals the gold one (as a real model's would)
and the definition reads both tokens from that row; the kernels compute it as one dot product
h . (W[gold] - W[decoy]) and must reproduce it.
"""

import math
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
from selfdistill.ops import contrast_reference, cuda_ext  # noqa: E402

CONTRAST = (kernels.gold_decoy_contrast, cuda_ext.gold_decoy_contrast)  # the fused implementations
CLIPPED_MEAN_MIN = (kernels.clipped_mean_min, cuda_ext.clipped_mean_min)
BELIEF_SHIFT = (kernels.belief_shift, cuda_ext.belief_shift)
ALL_CONTRAST = (*CONTRAST, contrast_reference.gold_decoy_contrast)


def definition(gold_hidden, decoy_hidden, weight, bias, gold_ids, decoy_ids, divergent, temperature=1.0):
    """Per-position contrast by the two-pass definition (first divergent position: both tokens from
    the gold row) and the belief (plain sum; NaN for no divergence), in the inputs' dtype."""
    def log_softmax_at(hidden, ids):
        z = hidden @ weight.t() + (0.0 if bias is None else bias)
        return torch.log_softmax(z / temperature, -1).gather(-1, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)

    first = divergent & (divergent.cumsum(-1) == 1)
    lg = log_softmax_at(gold_hidden, gold_ids)
    ld = torch.where(first, log_softmax_at(gold_hidden, decoy_ids), log_softmax_at(decoy_hidden, decoy_ids))
    contrast = torch.where(divergent, lg - ld, 0.0)
    return contrast, torch.where(divergent.any(-1), contrast.sum(-1), float("nan"))


def make_batch(R, K, H, V, seed, divergent, bias=False, scale=1.0):
    """fp64 (gold_hidden, decoy_hidden, weight, bias, gold_ids, decoy_ids): the decoy pass's hidden
    states equal the gold pass's up to and including each row's first divergent position."""
    gen = torch.Generator().manual_seed(seed)
    gold = torch.randn(R, K, H, generator=gen, dtype=torch.float64) * scale
    decoy = torch.randn(R, K, H, generator=gen, dtype=torch.float64) * scale
    first = divergent & (divergent.cumsum(-1) == 1)
    shared_prefix = (divergent.cumsum(-1) == 0) | first
    decoy = torch.where(shared_prefix.unsqueeze(-1), gold, decoy)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * (2.0 / H ** 0.5)
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    gold_ids = torch.randint(0, V, (R, K), generator=gen)
    decoy_ids = torch.where(divergent, (gold_ids + 1 + torch.randint(0, V - 1, (R, K), generator=gen)) % V, gold_ids)
    return gold, decoy, weight, b, torch.where(divergent, gold_ids, -1), torch.where(divergent, decoy_ids, -1)


def cast(batch, dtype):
    gold, decoy, weight, bias, gold_ids, decoy_ids = batch
    return gold.to(dtype), decoy.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), gold_ids, decoy_ids


def err(got, want) -> float:
    """Max abs error of `got` against `want` over the reference's finite values, and inf when `got`
    is NaN where `want` is not (or the reverse) or misses one of its infinities: a NaN output or
    gradient fails every tolerance instead of counting as zero error."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    nan, finite = torch.isnan(want), torch.isfinite(want)
    infinite = ~nan & ~finite
    if not torch.equal(torch.isnan(got), nan) or not torch.equal(got[infinite], want[infinite]):
        return math.inf
    return (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0


def test_err_fails_on_a_nan_where_a_number_is_expected_and_the_reverse():
    one, nan = torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")])
    assert err(nan, one) == math.inf and err(one, nan) == math.inf
    assert err(nan, nan) == 0.0 and err(one + 1e-3, one) == pytest.approx(1e-3, rel=1e-4)
    assert err(torch.tensor([float("inf")]), torch.tensor([1.0])) == math.inf
    assert err(torch.tensor([-float("inf")]), torch.tensor([float("inf")])) == math.inf


DIVERGENT = torch.tensor([
    [False, True, False, False, False],   # one divergent position: no decoy pass needed
    [False, False, True, True, True],     # first + two later
    [True, False, True, False, True],
    [False, False, False, False, False],  # nothing divergent: not scorable -> NaN
])


@pytest.mark.parametrize("V,H", [(37, 16), (1000, 300)])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("bias", [False, True])
def test_contrast_and_belief_match_the_two_pass_definition(V, H, temperature, bias):
    batch = make_batch(4, 5, H, V, seed=V + H, divergent=DIVERGENT, bias=bias)
    want_c, want_b = definition(*batch, DIVERGENT, temperature)
    torch_c, _ = definition(*cast(batch, torch.float32), DIVERGENT, temperature)  # torch's own fp32
    floor = 1e-5
    for impl in ALL_CONTRAST:
        c, b = impl(*cast(batch, torch.float32), DIVERGENT, temperature)
        assert c.dtype == torch.float32 and b.dtype == torch.float64
        assert err(c, want_c) <= max(2 * err(torch_c, want_c), floor), impl.__module__
        assert torch.isnan(b[3]) and not torch.isnan(b[:3]).any()
        assert err(b[:3], want_b[:3]) <= 4 * floor
        assert torch.all(c[~DIVERGENT] == 0)
        assert torch.equal(b[:3], c[:3].double().sum(-1))  # the belief: the float64 sum of the fp32 contrasts


def test_first_position_needs_no_decoy_pass():
    one = DIVERGENT[[0, 3]]
    gold, _, weight, bias, gold_ids, decoy_ids = make_batch(2, 5, 24, 300, seed=1, divergent=one, bias=True)
    want_c, want_b = definition(gold, gold, weight, bias, gold_ids, decoy_ids, one)
    for impl in ALL_CONTRAST:
        c, b = impl(gold.float(), None, weight.float(), bias.float(), gold_ids, decoy_ids, one)
        assert err(c, want_c) < 1e-5 and err(b, want_b) < 1e-5 and torch.isnan(b[1])
        with pytest.raises(ValueError, match="decoy pass"):
            impl(gold.float(), None, weight.float(), None, gold_ids, decoy_ids, DIVERGENT[[1, 2]])


def test_first_position_reads_no_vocabulary(monkeypatch):
    """A row with one divergent position launches no token-logprob kernel: the fused-linear log-probs
    (a vocabulary pass) run only for later positions."""
    one = DIVERGENT[[0]]
    gold, _, weight, _, gold_ids, decoy_ids = make_batch(1, 5, 16, 50, seed=3, divergent=one)
    try:
        for backend in ("triton", "cuda"):
            ops.set_backend(backend)
            ops.reset_call_counts()
            ops.dispatched_gold_decoy_contrast(gold.float(), None, weight.float(), None, gold_ids, decoy_ids, one)
            assert ops.call_counts() == {("gold_decoy_contrast", backend): 1}
            ops.reset_call_counts()
            batch = make_batch(4, 5, 16, 50, seed=3, divergent=DIVERGENT)
            ops.dispatched_gold_decoy_contrast(*cast(batch, torch.float32), DIVERGENT)
            assert ops.call_counts() == {("gold_decoy_contrast", backend): 1, ("fused_linear_token_logprobs", backend): 1}
    finally:
        ops.set_backend("auto")


def test_spec_worked_case_open_minus_one_close_plus_one():
    # SPEC section 2, PMI-shift: one divergent position, (gold, decoy) log-probs (-2, -1) at open and
    # (-1, -2) at close -> open = -1, close = +1. An identity head (H = V = 3) makes the logits the
    # hidden state; logits equal to the log-probs (the rest of the mass on a third token) make
    # log_softmax return them exactly.
    def row(lp_gold, lp_decoy):
        rest = math.log(1 - math.exp(lp_gold) - math.exp(lp_decoy))
        return torch.tensor([lp_gold, lp_decoy, rest])

    hidden = torch.stack([row(-2.0, -1.0), row(-1.0, -2.0)]).view(2, 1, 3)
    ids_g, ids_d = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)
    divergent = torch.ones(2, 1, dtype=torch.bool)
    for impl in ALL_CONTRAST:
        c, belief = impl(hidden, None, torch.eye(3), None, ids_g, ids_d, divergent)
        assert belief.tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)
        assert c.view(-1).tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)


def test_nonfinite_term_makes_the_row_a_non_member():
    hidden = torch.zeros(2, 2, 4)
    hidden[0, 0, 1] = float("inf")  # h . (W[3] - W[2]) = inf * 1: a non-finite contrast
    weight = torch.eye(4)
    ids_g = torch.tensor([[3, 0], [3, 0]])
    ids_d = torch.tensor([[1, 0], [2, 0]])
    divergent = torch.tensor([[True, False], [True, False]])
    for impl in ALL_CONTRAST:
        c, belief = impl(hidden, None, weight, None, ids_g, ids_d, divergent)
        assert not torch.isfinite(c[0, 0]) and torch.isnan(belief[0]) and belief[1].item() == 0.0


def test_bad_ids_fail_closed_or_raise():
    hidden, weight = torch.randn(1, 2, 8), torch.randn(10, 8)
    divergent = torch.tensor([[True, False]])
    ids_g, ids_d = torch.tensor([[10, -1]]), torch.tensor([[3, -1]])
    c, b = kernels.gold_decoy_contrast(hidden, None, weight, None, ids_g, ids_d, divergent)
    assert torch.isnan(c[0, 0]) and torch.isnan(b[0])  # Triton: NaN, no stray read
    with pytest.raises(RuntimeError, match="gold id 10 or decoy id 3 of first divergent position 0 is outside the vocabulary"):
        cuda_ext.gold_decoy_contrast(hidden, None, weight, None, ids_g, ids_d, divergent)
    with pytest.raises(ValueError, match="weight is torch.float64"):
        kernels.gold_decoy_contrast(hidden, None, weight.double(), None, ids_g, ids_d, divergent)


def test_gradients_match_fp64():
    batch = make_batch(4, 5, 24, 200, seed=7, divergent=DIVERGENT, bias=True)
    upstream = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(fn, gold, decoy, weight, bias, gold_ids, decoy_ids):
        xs = [t.clone().requires_grad_() for t in (gold, decoy, weight, bias)]
        c, b = fn(*xs, gold_ids, decoy_ids, DIVERGENT)
        ((c * upstream.to(c.dtype)).sum() + b[:3].sum()).backward()
        return [x.grad for x in xs]

    want = grads(definition, *batch)
    for impl in ALL_CONTRAST:
        got = grads(impl, *cast(batch, torch.float32))
        for name, a, w in zip(("gold_hidden", "decoy_hidden", "weight", "bias"), got, want):
            assert err(a, w) < 1e-5, (impl.__module__, name)


@pytest.mark.parametrize("impl", CONTRAST)
def test_deterministic_across_runs(impl):
    batch = cast(make_batch(4, 5, 24, 300, seed=9, divergent=DIVERGENT), torch.float32)
    a = impl(*batch, DIVERGENT)
    b = impl(*batch, DIVERGENT)
    assert torch.isnan(a[1][3]) and torch.isfinite(a[1][:3]).all()  # row 3 has no divergent position
    torch.testing.assert_close(tuple(a), tuple(b), rtol=0, atol=0, equal_nan=True)  # bitwise, NaN where NaN


@pytest.mark.parametrize("impl", CONTRAST)
def test_strided_weight_and_bf16_inputs(impl):
    """A weight whose rows are a strided view (every other row of a wider tensor, NaN between them:
    a read of the wrong row fails) and bf16 hidden states / weight / bias (fp32 math on the bf16
    values): both give the definition's values on the same numbers, no worse than torch's own."""
    batch = make_batch(4, 5, 24, 300, seed=11, divergent=DIVERGENT, bias=True)
    gold, decoy, weight, bias, gold_ids, decoy_ids = batch
    want_c, _ = definition(*batch, DIVERGENT)
    wide = torch.full((600, 48), float("nan"))
    wide[::2, :24] = weight.float()
    c, _ = impl(gold.float(), decoy.float(), wide[::2, :24], bias.float(), gold_ids, decoy_ids, DIVERGENT)
    assert err(c, want_c) < 1e-5
    b16 = cast(batch, torch.bfloat16)
    want16, _ = definition(*cast(b16, torch.float64), DIVERGENT)
    torch16, _ = contrast_reference.gold_decoy_contrast(*b16, DIVERGENT)  # torch's own result on bf16 inputs
    c16, _ = impl(*b16, DIVERGENT)
    assert err(c16, want16) <= max(2 * err(torch16, want16), 1e-4)


@pytest.mark.parametrize("impl", CONTRAST)
def test_equal_gold_and_decoy_ids_give_zero_and_zero_gradient_in_bf16(impl):
    """A first divergent position whose gold and decoy ids coincide: the contrast is 0 and its
    gradient exactly 0 in bf16 at a temperature (+g and -g on one weight row cancel in fp32)."""
    gen = torch.Generator().manual_seed(13)
    hidden = torch.randn(1, 2, 16, generator=gen).bfloat16().requires_grad_(True)
    weight = torch.randn(50, 16, generator=gen).bfloat16().requires_grad_(True)
    ids = torch.tensor([[7, 9]])
    divergent = torch.tensor([[True, False]])
    c, _ = impl(hidden, None, weight, None, ids, ids.clone(), divergent, 0.7)
    c.sum().backward()
    assert c[0, 0].item() == 0.0 and torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


# ----------------------------------------------------------------------------- row reductions

def test_clipped_mean_min_hand_worked():
    values = torch.tensor([
        [0.5, -3.0, 1.0, 9.0],            # clip -> 0.5, -2, 1 (last masked out): mean -1/6, min -2
        [0.0, 0.0, 0.0, 0.0],             # decorative meta: gold and decoy move together -> 0
        [1.0, float("inf"), 0.0, 0.0],    # inf among used values: non-member, not clipped to 2
        [1.0, 2.0, 3.0, 4.0],             # nothing masked in: non-member
        [float("nan"), 3.0, 0.0, 0.0],    # NaN off the mask is ignored -> clip(3) = 2: 2 + 2
    ])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    for impl in (*CLIPPED_MEAN_MIN, contrast_reference.clipped_mean_min):
        out = impl(values, mask)
        assert out.dtype == torch.float64
        assert out[0].item() == pytest.approx(-1 / 6 - 2, abs=1e-12)
        assert out[1].item() == 0.0
        assert torch.isnan(out[2]) and torch.isnan(out[3])
        assert out[4].item() == 4.0
        # x = values - minus inside the reduction; clip = inf, no min term: PMI's plain mean
        plain = impl(values, mask, math.inf, 0.0, minus=torch.ones_like(values))
        assert plain[0].item() == pytest.approx((-0.5 - 4.0 + 0.0) / 3, abs=1e-12) and plain[4].item() == 2.0


@pytest.mark.parametrize("backend,impl", [("triton", kernels.clipped_mean_min), ("cuda", cuda_ext.clipped_mean_min)])
def test_clipped_mean_min_random_and_gm_dispatch(backend, impl):
    """fp32 contrasts after X + M and X + placebo: gm's x in float64, the difference taken in
    float64 inside the reduction (so equal to the fp64 formula on the same fp32 values up to the
    order of additions); dispatched through `ops.backend`, whose kernel ran."""
    gen = torch.Generator().manual_seed(3)
    cm, cp = torch.randn(7, 1100, generator=gen) * 2, torch.randn(7, 1100, generator=gen) * 2
    mask = torch.rand(7, 1100, generator=gen) < 0.3
    did = (cm.double() - cp.double()).clamp(-2, 2)
    want = torch.stack([did[r][mask[r]].mean() + did[r][mask[r]].min() for r in range(7)])
    got = impl(cm, mask, minus=cp)
    assert err(got, want) < 1e-12
    try:
        ops.set_backend(backend)
        ops.reset_call_counts()
        via_ops = ops.dispatched_gold_decoy_did(cm, cp, mask)
        counts = ops.call_counts()
    finally:
        ops.set_backend("auto")
    assert counts == {("clipped_mean_min", backend): 1}  # the chosen backend's kernel ran, not torch
    assert torch.equal(via_ops, got)
    assert err(contrast_reference.gold_decoy_did(cm, cp, mask), want) < 1e-12


@pytest.mark.parametrize("impl", CLIPPED_MEAN_MIN)
def test_clipped_mean_min_gradient_matches_fp64(impl):
    """Clipped entries, ties at the min, masked-out entries and a NaN row: the same gradients to
    values and minus as autograd through the fp64 reference."""
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(6, 37, generator=gen) * 1.5
    minus = torch.randn(6, 37, generator=gen) * 0.1
    values[0, 3], values[0, 5] = -1.7 + minus[0, 3], -1.7 + minus[0, 5]  # a tie at the row's min (in float64: x exact)
    values[1, :4] = torch.tensor([-5.0, -4.0, 2.5, 0.3])  # clipped, and the min lies below -clip
    mask = torch.rand(6, 37, generator=gen) < 0.6
    mask[0, 3] = mask[0, 5] = True
    mask[1, :4] = True
    mask[2] = False  # an empty row: NaN out, no gradient even though its upstream gradient is not 0
    dout = torch.randn(6, generator=gen, dtype=torch.float64)
    assert dout[2] != 0
    x, y = values.clone().requires_grad_(True), minus.clone().requires_grad_(True)
    got = impl(x, mask, minus=y)
    gx, gy = torch.autograd.grad(got, (x, y), dout)
    x64, y64 = values.double().requires_grad_(True), minus.double().requires_grad_(True)
    want = contrast_reference.clipped_mean_min(x64, mask, minus=y64)
    gx64, gy64 = torch.autograd.grad(want, (x64, y64), dout)
    assert err(got, want) < 1e-12
    assert torch.isnan(got[2]) and torch.isfinite(got[[0, 1, 3, 4, 5]]).all()
    assert torch.equal(gx[2], torch.zeros(37)) and torch.isfinite(gx64).all()
    assert err(gx, gx64) < 1e-6 and err(gy, gy64) < 1e-6


def test_belief_shift_hand_worked_and_exact_at_eps():
    """PMI-shift's shift and flips in float64: SPEC's worked case (open -1, close +1 -> shift 2,
    flip to gold), a clipped shift, the reverse flip, no flip at exactly 0 (eps = 0), NaN beliefs,
    and an eps that fp32 cannot hold (0.1): beliefs one float64 ulp beside it are decided as float64
    decides them."""
    eps = 0.1
    above, below = math.nextafter(eps, 1.0), math.nextafter(-eps, -1.0)
    b_open = torch.tensor([-1.0, -3.0, 2.0, 0.0, float("nan"), -5.0, below, -eps], dtype=torch.float64)
    b_close = torch.tensor([1.0, 3.0, -0.5, 5.0, 1.0, float("inf"), above, above], dtype=torch.float64)
    for impl in (*BELIEF_SHIFT, contrast_reference.belief_shift):
        shift, flip = impl(b_open[:6], b_close[:6])
        assert shift[:4].tolist() == [2.0, 2.0, -2.0, 2.0] and torch.isnan(shift[4:]).all()
        assert flip.tolist() == [1, 1, -1, 0, 0, 1]
        shift, flip = impl(b_open[6:], b_close[6:], eps=eps)
        assert flip.tolist() == [1, 0]  # -eps itself is not below -eps
        assert shift.dtype == torch.float64 and flip.dtype == torch.int8
    for backend in ("triton", "cuda"):
        try:
            ops.set_backend(backend)
            ops.reset_call_counts()
            ops.dispatched_belief_shift(b_open, b_close)
            assert ops.call_counts() == {("belief_shift", backend): 1}
        finally:
            ops.set_backend("auto")
