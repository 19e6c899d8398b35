"""The fused `gold_decoy_contrast` and `clipped_mean_min`, SPEC sections 1-2: the Triton kernels
(kernels/contrast.py, through the interpreter) and the csrc extension (csrc/contrast.cpp, its CPU
path), each checked against the same references, beside the torch reference itself.

The ground truth is the two-pass definition in fp64: log_softmax of the gold row at the gold token
minus log_softmax of the decoy row at the decoy token, at every divergent position. At a row's
first divergent position the kernel reads one row (z[gold] - z[decoy]); the tests build decoy
logits whose rows equal the gold rows up to and including that position, as a real model's would
(the prefixes agree), so the shortcut must reproduce the two-pass value.
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
from selfdistill.ops import cuda_ext, reference  # noqa: E402

CONTRAST = (kernels.gold_decoy_contrast, cuda_ext.gold_decoy_contrast)  # the fused implementations
CLIPPED_MEAN_MIN = (kernels.clipped_mean_min, cuda_ext.clipped_mean_min)


def two_pass(gold, decoy, gold_ids, decoy_ids, divergent, temperature=1.0):
    """Per-position contrast by the definition, and the belief (plain sum; NaN for no divergence)."""
    lg = torch.log_softmax(gold / temperature, -1).gather(-1, gold_ids.unsqueeze(-1)).squeeze(-1)
    ld = torch.log_softmax(decoy / temperature, -1).gather(-1, decoy_ids.unsqueeze(-1)).squeeze(-1)
    contrast = torch.where(divergent, lg - ld, 0.0)
    belief = torch.where(divergent.any(-1), contrast.sum(-1), float("nan"))
    return contrast, belief


def make_batch(R, K, V, seed, divergent):
    gen = torch.Generator().manual_seed(seed)
    gold = torch.randn(R, K, V, generator=gen, dtype=torch.float64) * 3
    decoy = torch.randn(R, K, V, generator=gen, dtype=torch.float64) * 3
    first = divergent & (divergent.cumsum(-1) == 1)
    shared_prefix = (divergent.cumsum(-1) == 0) | first  # positions whose gold and decoy prefixes agree
    decoy = torch.where(shared_prefix.unsqueeze(-1), gold, decoy)
    gold_ids = torch.randint(0, V, (R, K), generator=gen)
    decoy_ids = torch.where(divergent, (gold_ids + 1 + torch.randint(0, V - 1, (R, K), generator=gen)) % V, gold_ids)
    decoy_ids = torch.where(divergent, decoy_ids, -1)  # padding ids are never read
    gold_ids = torch.where(divergent, gold_ids, -1)
    return gold, decoy, gold_ids, decoy_ids


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


@pytest.mark.parametrize("V", [37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_contrast_and_belief_match_the_two_pass_definition(V, temperature):
    gold, decoy, gold_ids, decoy_ids, = make_batch(4, 5, V, seed=V, divergent=DIVERGENT)
    want_c, want_b = two_pass(gold, decoy, gold_ids.clamp(min=0), decoy_ids.clamp(min=0), DIVERGENT, temperature)
    torch_c, _ = two_pass(gold.float(), decoy.float(), gold_ids.clamp(min=0), decoy_ids.clamp(min=0), DIVERGENT, temperature)
    floor = 1e-5
    for impl in (*CONTRAST, reference.gold_decoy_contrast):
        c, b = impl(gold.float(), decoy.float(), gold_ids, decoy_ids, DIVERGENT, temperature)
        assert err(c, want_c) <= max(2 * err(torch_c, want_c), floor), impl.__module__
        assert torch.isnan(b[3]) and not torch.isnan(b[:3]).any()
        assert err(b[:3], want_b[:3]) <= 4 * floor
        assert torch.all(c[~DIVERGENT] == 0)


def test_first_position_needs_no_decoy_pass():
    one = DIVERGENT[[0, 3]]
    gold, decoy, gold_ids, decoy_ids = make_batch(2, 5, 300, seed=1, divergent=one)
    want_c, want_b = two_pass(gold, decoy, gold_ids.clamp(min=0), decoy_ids.clamp(min=0), one)
    for impl in (*CONTRAST, reference.gold_decoy_contrast):
        c, b = impl(gold.float(), None, gold_ids, decoy_ids, one)
        assert err(c, want_c) < 1e-5 and err(b, want_b) < 1e-5 and torch.isnan(b[1])
    for impl in CONTRAST:
        with pytest.raises(ValueError, match="decoy pass"):
            impl(gold.float(), None, gold_ids, decoy_ids, DIVERGENT[[1, 2]])


def test_spec_worked_case_open_minus_one_close_plus_one():
    # SPEC section 2, PMI-shift: one divergent position, (gold, decoy) log-probs (-2, -1) at open and
    # (-1, -2) at close -> open = -1, close = +1. Logits equal to the log-probs (the rest of the
    # mass on a third token) make log_softmax return them exactly.
    def row(lp_gold, lp_decoy):
        rest = math.log(1 - math.exp(lp_gold) - math.exp(lp_decoy))
        return torch.tensor([lp_gold, lp_decoy, rest])

    logits = torch.stack([row(-2.0, -1.0), row(-1.0, -2.0)]).view(2, 1, 3)
    ids_g, ids_d = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)
    divergent = torch.ones(2, 1, dtype=torch.bool)
    for impl in (*CONTRAST, reference.gold_decoy_contrast):
        c, belief = impl(logits, None, ids_g, ids_d, divergent)
        assert belief.tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)
        assert c.view(-1).tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)


def test_nonfinite_term_makes_the_row_a_non_member():
    gold = torch.zeros(2, 2, 10)
    gold[0, 0, 3] = float("-inf")  # log p(gold) = -inf at a divergent position
    ids_g = torch.tensor([[3, 0], [3, 0]])
    ids_d = torch.tensor([[4, 1], [4, 1]])
    divergent = torch.tensor([[True, False], [True, False]])
    for impl in (*CONTRAST, reference.gold_decoy_contrast):
        _, belief = impl(gold, None, ids_g, ids_d, divergent)
        assert torch.isnan(belief[0]) and belief[1].item() == 0.0


def test_gradients_match_fp64():
    gold, decoy, gold_ids, decoy_ids = make_batch(4, 5, 200, seed=7, divergent=DIVERGENT)
    upstream = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(fn, g, d):
        g, d = g.clone().requires_grad_(), d.clone().requires_grad_()
        c, b = fn(g, d, gold_ids.clamp(min=0) if fn is two_pass else gold_ids, decoy_ids.clamp(min=0) if fn is two_pass else decoy_ids, DIVERGENT)
        ((c * upstream.to(c.dtype)).sum() + b[:3].sum()).backward()
        return g.grad, d.grad

    want = grads(two_pass, gold, decoy)
    # the kernel differentiates z[g] - z[d] of the gold row at first positions, the definition
    # differentiates both rows; with equal rows the sums over both agree
    want_first_folded = want[0] + torch.where((DIVERGENT & (DIVERGENT.cumsum(-1) == 1)).unsqueeze(-1), want[1], 0.0)
    want_decoy = torch.where((DIVERGENT & (DIVERGENT.cumsum(-1) == 1)).unsqueeze(-1), 0.0, want[1])
    for impl in (*CONTRAST, reference.gold_decoy_contrast):
        got = grads(impl, gold.float(), decoy.float())
        assert err(got[0], want_first_folded) < 1e-5 and err(got[1], want_decoy) < 1e-5, impl.__module__


def test_clipped_mean_min_hand_worked():
    values = torch.tensor([
        [0.5, -3.0, 1.0, 9.0],            # clip -> 0.5, -2, 1 (last masked out): mean -1/6, min -2
        [0.0, 0.0, 0.0, 0.0],             # decorative meta: gold and decoy move together -> 0
        [1.0, float("inf"), 0.0, 0.0],    # inf among used values: non-member, not clipped to 2
        [1.0, 2.0, 3.0, 4.0],             # nothing masked in: non-member
        [float("nan"), 3.0, 0.0, 0.0],    # NaN off the mask is ignored -> clip(3) = 2: 2 + 2
    ])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    for impl in (*CLIPPED_MEAN_MIN, reference.clipped_mean_min):
        out = impl(values, mask)
        assert out[0].item() == pytest.approx(-1 / 6 - 2, abs=1e-6)
        assert out[1].item() == 0.0
        assert torch.isnan(out[2]) and torch.isnan(out[3])
        assert out[4].item() == pytest.approx(4.0)


@pytest.mark.parametrize("backend,impl", [("triton", kernels.clipped_mean_min), ("cuda", cuda_ext.clipped_mean_min)])
def test_clipped_mean_min_random_and_gm_dispatch(backend, impl):
    gen = torch.Generator().manual_seed(3)
    cm, cp = torch.randn(7, 1100, generator=gen) * 2, torch.randn(7, 1100, generator=gen) * 2
    mask = torch.rand(7, 1100, generator=gen) < 0.3
    did = (cm.double() - cp.double()).clamp(-2, 2)
    want = torch.stack([did[r][mask[r]].mean() + did[r][mask[r]].min() for r in range(7)])
    got = impl(cm - cp, mask)
    assert err(got, want) < 1e-5
    try:
        ops.set_backend(backend)
        ops.reset_call_counts()
        via_ops = ops.dispatched_gold_decoy_did(cm, cp, mask)
        counts = ops.call_counts()
    finally:
        ops.set_backend("auto")
    assert counts == {("clipped_mean_min", backend): 1}  # the chosen backend's kernel ran, not torch
    assert torch.equal(via_ops, got)
    assert err(reference.gold_decoy_did(cm, cp, mask), want) < 1e-5


@pytest.mark.parametrize("impl", CLIPPED_MEAN_MIN)
def test_clipped_mean_min_gradient_matches_fp64(impl):
    """Clipped entries, ties at the min, masked-out entries and a NaN row: the same gradient as
    autograd through the fp64 reference."""
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(6, 37, generator=gen) * 1.5
    values[0, 3] = values[0, 5] = -1.7  # a tie at the row's min
    values[1, :4] = torch.tensor([-5.0, -4.0, 2.5, 0.3])  # clipped, and the min lies below -clip
    mask = torch.rand(6, 37, generator=gen) < 0.6
    mask[0, 3] = mask[0, 5] = True
    mask[1, :4] = True
    mask[2] = False  # an empty row: NaN out, no gradient even though its upstream gradient is not 0
    dout = torch.randn(6, generator=gen)
    assert dout[2] != 0
    x = values.clone().requires_grad_(True)
    got = impl(x, mask)
    (grad,) = torch.autograd.grad(got, x, dout)
    x64 = values.double().requires_grad_(True)
    want = reference.clipped_mean_min(x64, mask)
    (grad64,) = torch.autograd.grad(want, x64, dout.double())
    assert err(got, want) < 1e-5
    assert torch.isnan(got[2]) and torch.isfinite(got[[0, 1, 3, 4, 5]]).all()
    assert torch.equal(grad[2], torch.zeros(37)) and torch.isfinite(grad64).all()
    assert err(grad, grad64) < 1e-6


@pytest.mark.parametrize("impl", CONTRAST)
def test_deterministic_across_runs(impl):
    gold, decoy, gold_ids, decoy_ids = make_batch(4, 5, 300, seed=9, divergent=DIVERGENT)
    a = impl(gold.float(), decoy.float(), gold_ids, decoy_ids, DIVERGENT)
    b = impl(gold.float(), decoy.float(), gold_ids, decoy_ids, DIVERGENT)
    assert torch.isnan(a[1][3]) and torch.isfinite(a[1][:3]).all()  # row 3 has no divergent position
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN where NaN


@pytest.mark.parametrize("impl", CONTRAST)
def test_strided_and_bf16_logits(impl):
    """Logits that are a strided view (every other position of a longer [R, 2K, V] tensor, as a
    slice of a model's logits is) and bf16 logits (fp32 math on the bf16 values) both give the
    two-pass values of the same numbers."""
    gold, decoy, gold_ids, decoy_ids = make_batch(4, 5, 300, seed=11, divergent=DIVERGENT)
    want_c, _ = two_pass(gold, decoy, gold_ids.clamp(min=0), decoy_ids.clamp(min=0), DIVERGENT)
    wide_g, wide_d = torch.zeros(4, 10, 300), torch.full((4, 10, 300), float("nan"))
    wide_g[:, ::2], wide_d[:, ::2] = gold.float(), decoy.float()
    c, _ = impl(wide_g[:, ::2], wide_d[:, ::2], gold_ids, decoy_ids, DIVERGENT)
    assert err(c, want_c) < 1e-5
    g16, d16 = gold.bfloat16(), decoy.bfloat16()
    want16, _ = two_pass(g16.double(), d16.double(), gold_ids.clamp(min=0), decoy_ids.clamp(min=0), DIVERGENT)
    c16, _ = impl(g16, d16, gold_ids, decoy_ids, DIVERGENT)
    assert err(c16, want16) < 1e-4


@pytest.mark.parametrize("impl", CONTRAST)
def test_leading_tiles_of_banned_tokens_in_a_two_pass_row(impl):
    """A later divergent position whose gold row starts with 300 -inf logits (more than one
    256-wide interpreter tile): the log-sum-exp skips them instead of turning NaN."""
    gold, decoy, gold_ids, decoy_ids = make_batch(4, 5, 700, seed=12, divergent=DIVERGENT)
    gold[1, 3, :300] = float("-inf")  # row 1's position 3 is a later divergent position (two passes)
    gold_ids[1, 3] = 450
    want_c, _ = two_pass(gold, decoy, gold_ids.clamp(min=0), decoy_ids.clamp(min=0), DIVERGENT)
    c, b = impl(gold.float(), decoy.float(), gold_ids, decoy_ids, DIVERGENT)
    assert torch.isfinite(c).all() and err(c, want_c) < 1e-5


@pytest.mark.parametrize("impl", CONTRAST)
def test_equal_gold_and_decoy_ids_give_zero_gradient_in_bf16(impl):
    """A first divergent position whose gold and decoy ids coincide: d(z_g - z_d) = 0 exactly, also
    in bf16 at a temperature (writing +g then subtracting g from the rounded value would not be 0)."""
    gold = torch.randn(1, 2, 50, generator=torch.Generator().manual_seed(13)).bfloat16().requires_grad_(True)
    ids = torch.tensor([[7, 9]])
    divergent = torch.tensor([[True, False]])
    c, _ = impl(gold, None, ids, ids.clone(), divergent, 0.7)
    c.sum().backward()
    assert c[0, 0].item() == 0.0 and torch.count_nonzero(gold.grad) == 0
