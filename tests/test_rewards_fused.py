"""The belief heads' ops path against the float64 reward formulas (SPEC sections 1, 2, 8), on every
backend: the torch reference, the Triton kernels (interpreter, CPU tensors) and the csrc extension
(CPU path).

- Same per-position values: each registry entry's `fused_fn` (the dispatched float64 row kernels)
  equals its `meta_fn` (the float64 formula) on the same fp32 contrasts / log-probs up to the order
  of float64 additions, and exactly wherever a threshold decides (a clip saturates, the gate is 0
  or its cap, PMI-shift flips at +-eps, a non-finite value makes a non-member), including ties
  sitting on the thresholds and values one float64 ulp beside them.
- From hidden states: the contrast op (first divergent position a dot product, later ones both
  passes' fused-linear log-probs) and the fused function equal the float64 formula on float64
  log-probs of the same hidden states within fp32 rounding, with and without an LM-head bias; and
  exactly, when the per-position values are exact in fp32 (an identity head), at the thresholds.
- Through the scorer: the fused path equals the reference path (per-read log-probs + meta_fn) on a
  tiny model, and the call counters show the chosen backend's kernels ran.
"""

import contextlib
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before selfdistill.kernels is first imported

import pytest
import torch

kernels = pytest.importorskip("selfdistill.kernels")
if not kernels.INTERPRETED:
    pytest.skip("selfdistill.kernels was imported before TRITON_INTERPRET=1; run kernel tests in their own process", allow_module_level=True)

from selfdistill import ops  # noqa: E402
from selfdistill.config import RewardConfig  # noqa: E402
from selfdistill.rewards import get_reward  # noqa: E402
from selfdistill.rewards.meta_scorer import score_meta_head  # noqa: E402
from tests.test_meta_scorer import BATCH_EXAMPLES, BATCH_GRADES, BATCH_ROWS, TOL, lm, make_batch  # noqa: E402, F401 (lm: fixture)

BACKENDS = ("torch", "triton", "cuda")


@contextlib.contextmanager
def backend(name: str):
    ops.set_backend(name)
    ops.reset_call_counts()
    try:
        yield
    finally:
        ops.set_backend("auto")


def same(fused: torch.Tensor, ref: torch.Tensor, exact_rows=()) -> None:
    """Equal up to float64 summation order everywhere (NaN where NaN), bitwise on `exact_rows`."""
    fused = fused.cpu()
    assert fused.dtype == torch.float64 and ref.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12, equal_nan=True)
    rows = [r for r in exact_rows if not torch.isnan(ref[r])]
    assert torch.equal(torch.isnan(fused), torch.isnan(ref))
    assert torch.equal(fused[rows], ref[rows]), (fused[rows], ref[rows])


def as_f64(*ts):
    return [t.double() for t in ts]


# ----------------------------------------------------------------------------- same per-position values

@pytest.mark.parametrize("name", BACKENDS)
def test_pmi_shift_fused_equals_formula_on_the_same_beliefs(name):
    eps_row = math.nextafter(0.0, 1.0)  # the smallest positive float64: fp32 would round it to 0
    b_open = torch.tensor([-1.0, 0.0, -0.5, 0.25, -eps_row, eps_row, 3.0, float("nan"), 1.0, -2.0, 0.7, -1e-3],
                          dtype=torch.float64)
    b_close = torch.tensor([1.0, 0.75, 1.5, -2.0, eps_row, -eps_row, 3.0, 1.0, float("inf"), 0.0, 0.7 + 1e-12, 5.0],
                           dtype=torch.float64)
    member = torch.ones(12, dtype=torch.bool)
    member[-1] = False
    spec = get_reward("pmi_shift")
    want = spec.meta_fn(b_open, b_close, member=member)
    # SPEC's worked case; no flip from exactly 0; shift exactly 2 with the flip; a saturated shift with
    # the penalty; flips between the smallest float64s; no shift; NaN / inf beliefs; a non-member
    assert want[:6].tolist() == [3.0, 0.75, 3.0, -4.0, 1.0 + 2 * eps_row, -2.0 - 2 * eps_row] and torch.isnan(want[7:9]).all()
    with backend(name):
        got = spec.fused_fn(b_open, b_close, member=member)
        assert ops.call_counts() == {("belief_shift", name): 1}
    same(got, want, exact_rows=range(12))
    for eps in (0.1, 1e-3):  # an eps fp32 cannot hold: beliefs one ulp beside it
        o = torch.tensor([math.nextafter(-eps, -1), -eps, math.nextafter(-eps, 0)], dtype=torch.float64)
        c = torch.tensor([math.nextafter(eps, 1), math.nextafter(eps, 1), math.nextafter(eps, 1)], dtype=torch.float64)
        with backend(name):
            got = spec.fused_fn(o, c, member=torch.ones(3, dtype=torch.bool), eps=eps)
        want = spec.meta_fn(o, c, member=torch.ones(3, dtype=torch.bool), eps=eps)
        assert (want - (c - o).clamp(-2, 2)).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)  # flip only from below -eps
        same(got, want, exact_rows=range(3))


def gm_case():
    """fp32 contrasts after X + M and X + placebo [R, K], the divergent mask, correct, member, and
    the rows whose value a threshold decides."""
    gen = torch.Generator().manual_seed(0)
    R, K = 12, 6
    c_m, c_p = torch.randn(R, K, generator=gen) * 1.5, torch.randn(R, K, generator=gen) * 1.5
    div = torch.rand(R, K, generator=gen) < 0.6
    div[:, 2] = True
    div[0] = torch.tensor([False, False, True, False, False, False])  # one divergent position
    c_m[1], c_p[1] = torch.tensor([2.5, 0, 0.75, -9, 1e8, 0]), torch.tensor([0.5, 0, -1.25, 3, 0, 0])  # did = 2, 2 exactly, clips
    div[1] = torch.tensor([True, False, True, True, True, False])
    c_m[2], c_p[2] = c_p[2].clone(), c_p[2].clone()  # decorative: did = 0 -> x = 0 -> 0
    c_m[3] = c_p[3] + 5.0  # every did clipped to 2: x = 4 -> the cap 2
    c_m[4] = c_p[4] - 5.0  # x = -4 -> 0
    c_m[5, 2] = float("inf")  # a non-finite used value: non-member
    c_m[6, ~div[6]] = float("nan")  # NaN off the mask: ignored
    div[7] = False  # no divergent position: non-member
    correct = torch.tensor([True, False, True, True, True, False, True, False, True, False, True, False])
    member = torch.ones(R, dtype=torch.bool)
    member[8] = False
    return c_m, c_p, div, correct, member, [1, 2, 3, 4, 5, 7, 8]


@pytest.mark.parametrize("name", BACKENDS)
def test_gm_fused_equals_formula_on_the_same_contrasts(name):
    c_m, c_p, div, correct, member, exact = gm_case()
    spec = get_reward("gm")
    zero = torch.zeros_like(c_m, dtype=torch.float64)
    # the formula's four sets with contrast = g - d: gold = contrast, decoy = 0
    want = spec.meta_fn(*as_f64(c_m, c_p), zero, zero, div, correct, member=member)
    assert want[3].item() == 2.0 and want[2].item() == 0.0 and want[4].item() == 0.0 and torch.isnan(want[[5, 7, 8]]).all()
    with backend(name):
        got = spec.fused_fn(c_m, c_p, div, correct, member=member)
        assert ops.call_counts() == {("clipped_mean_min", name): 1}
    same(got, want, exact_rows=exact)
    assert torch.isfinite(got[[0, 6, 9, 10, 11]]).all()


def pmi_case():
    gen = torch.Generator().manual_seed(1)
    R, T = 10, 9
    without = -torch.rand(R, T, generator=gen) * 4
    real = without + torch.randn(R, T, generator=gen) * 1.5
    plac = without + torch.randn(R, T, generator=gen) * 1.5
    lengths = torch.tensor([9, 1, 5, 9, 9, 9, 3, 0, 9, 7])
    mask = torch.arange(T)[None] < lengths[:, None]
    real[1], plac[1] = without[1] + 2.0, without[1]  # one token, d exactly 2 (the clip's edge): x = 2 -> cap
    plac[2] = real[2].clone()  # placebo = real: x = 0 exactly -> 0
    real[3] = without[3] + 5.0  # every d_real clipped
    real[4], plac[4] = without[4] - 0.5, without[4]  # x < 0 (correct) -> 0
    real[5, 4] = -float("inf")  # a -inf log-prob at a scored token: non-member
    real[6, 5:] = float("nan")  # NaN off the mask: ignored
    correct = torch.tensor([True, True, True, False, True, True, False, True, True, False])
    member = torch.ones(R, dtype=torch.bool)
    member[8] = False
    return real, without, plac, mask, correct, member, [1, 2, 4, 5, 7, 8]


@pytest.mark.parametrize("agg", ["mean", "sum_clip", "mean_min"])
@pytest.mark.parametrize("name", BACKENDS)
def test_pmi_fused_equals_formula_on_the_same_logprobs(name, agg):
    real, without, plac, mask, correct, member, exact = pmi_case()
    spec = get_reward("pmi")
    want = spec.meta_fn(*as_f64(real, without, plac), mask, correct, agg, member=member)
    assert want[1].item() == 0.1085 and want[2].item() == 0.0 and want[4].item() == 0.0 and torch.isnan(want[[5, 7, 8]]).all()
    with backend(name):
        got = spec.fused_fn(real, without, plac, mask, correct, agg, member=member)
        assert ops.call_counts() == {("clipped_mean_min", name): 2}
    same(got, want, exact_rows=exact)


# ----------------------------------------------------------------------------- from hidden states

DIVERGENT = torch.tensor([
    [False, True, False, False],  # one divergent position: one dot product, no decoy pass
    [True, False, True, True],    # first + two later: both passes' fused-linear log-probs
    [False, True, True, False],
    [False, False, False, False],  # no divergent position: non-member
    [True, True, True, True],
])


def passes(gen, H, V, bias):
    """One context's gold / decoy hidden states [R, K, H] (the decoy pass equal to the gold one up to
    and including each row's first divergent position) and answer ids."""
    R, K = DIVERGENT.shape
    gold = torch.randn(R, K, H, generator=gen, dtype=torch.float64)
    decoy = torch.randn(R, K, H, generator=gen, dtype=torch.float64)
    shared = (DIVERGENT.cumsum(-1) == 0) | (DIVERGENT & (DIVERGENT.cumsum(-1) == 1))
    return gold, torch.where(shared.unsqueeze(-1), gold, decoy)


def answer_logps(gold_h, decoy_h, weight, bias, gold_ids, decoy_ids):
    """float64 (gold_logp, decoy_logp) [R, K] by the definition: at the first divergent position
    both tokens from the gold pass's row."""
    def lsm(h, ids):
        z = h @ weight.t() + (0.0 if bias is None else bias)
        return torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    first = DIVERGENT & (DIVERGENT.cumsum(-1) == 1)
    return lsm(gold_h, gold_ids), torch.where(first, lsm(gold_h, decoy_ids), lsm(decoy_h, decoy_ids))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("arm", ["pmi_shift", "gm"])
@pytest.mark.parametrize("name", BACKENDS)
def test_belief_heads_from_hidden_states_equal_the_formula(name, arm, bias):
    gen = torch.Generator().manual_seed(7)
    H, V = 32, 97
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    gold_ids = torch.randint(0, V, DIVERGENT.shape, generator=gen)
    decoy_ids = torch.where(DIVERGENT, (gold_ids + 1 + torch.randint(0, V - 1, DIVERGENT.shape, generator=gen)) % V, gold_ids)
    spec = get_reward(arm)
    names = [n for n, _ in spec.passes.contexts]
    fused_in, ref_in = {}, {}
    with backend(name):
        for n in names:
            gold_h, decoy_h = passes(gen, H, V, bias)
            c = ops.dispatched_gold_decoy_contrast(gold_h.float(), decoy_h.float(), weight.float(),
                                                   None if b is None else b.float(), gold_ids, decoy_ids, DIVERGENT)
            fused_in.update({f"contrast_{n}": c.contrast, f"belief_{n}": c.belief})
            g, d = answer_logps(gold_h, decoy_h, weight, b, gold_ids, decoy_ids)
            ref_in.update({f"gold_logp_{n}": g, f"decoy_logp_{n}": d})
            ref_in[f"belief_{n}"] = torch.where(DIVERGENT.any(-1), torch.where(DIVERGENT, g - d, 0.0).sum(-1), float("nan"))
        correct, member = torch.tensor([True, False, True, True, False]), torch.ones(5, dtype=torch.bool)
        base = {"divergent_mask": DIVERGENT, "correct": correct, "member": member}
        got = call(spec.fused_fn, {**fused_in, **base})
        counts = ops.call_counts()
    want = call(spec.meta_fn, {**ref_in, **base})
    assert torch.isnan(want[3]) and torch.isfinite(want[[0, 1, 2, 4]]).all()
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=2e-5, equal_nan=True)
    reduction = {"pmi_shift": "belief_shift", "gm": "clipped_mean_min"}[arm]
    # the fused backends' host side records the later positions' token-logprob kernels too; the
    # torch reference of the contrast runs the torch fused-linear formula inside itself
    later = {} if name == "torch" else {("fused_linear_token_logprobs", name): 2}
    assert counts == {("gold_decoy_contrast", name): 2, **later, (reduction, name): 1}


def call(fn, inputs):
    from selfdistill.rewards.registry import call_with_inputs

    return call_with_inputs(fn, inputs)


@pytest.mark.parametrize("name", BACKENDS)
def test_thresholds_exact_from_hidden_states_with_an_identity_head(name):
    """First divergent positions through an identity head (H = V): the contrast h[gold] - h[decoy]
    is exact in fp32, so PMI-shift's flips and clips and gm's clips and gate, sitting exactly on
    their thresholds, come out exactly as the float64 formula gives them on the exact contrasts."""
    V = 6
    div = torch.tensor([[True, False]] * 6)
    gold_ids, decoy_ids = torch.zeros(6, 2, dtype=torch.long), torch.ones(6, 2, dtype=torch.long)

    def hidden(contrasts):  # h[0] - h[1] = the wanted contrast; both values exact in fp32
        h = torch.zeros(6, 2, V)
        h[:, 0, 0] = torch.tensor(contrasts) / 2
        h[:, 0, 1] = -torch.tensor(contrasts) / 2
        return h

    open_c = [0.0, -0.5, 0.25, -1.0, 0.5, -0.75]  # 0 exactly: no flip
    close_c = [0.75, 1.5, -2.0, 1.0, 0.5, 1.25]  # shift exactly 2 with a flip; -2.25 -> -2 with the penalty
    eye = torch.eye(V)
    with backend(name):
        o = ops.dispatched_gold_decoy_contrast(hidden(open_c), None, eye, None, gold_ids, decoy_ids, div)
        c = ops.dispatched_gold_decoy_contrast(hidden(close_c), None, eye, None, gold_ids, decoy_ids, div)
        member = torch.ones(6, dtype=torch.bool)
        shift = get_reward("pmi_shift").fused_fn(o.belief, c.belief, member=member)
        gm = get_reward("gm").fused_fn(c.contrast, o.contrast, div, torch.tensor([True, False] * 3), member=member)
    exact_open, exact_close = torch.tensor(open_c, dtype=torch.float64), torch.tensor(close_c, dtype=torch.float64)
    want_shift = get_reward("pmi_shift").meta_fn(exact_open, exact_close, member=member)
    assert want_shift.tolist() == [0.75, 3.0, -4.0, 3.0, 0.0, 3.0]
    same(shift, want_shift, exact_rows=range(6))
    zero = torch.zeros(6, 2, dtype=torch.float64)
    g_m, g_p = torch.stack([exact_close, zero[:, 0]], -1), torch.stack([exact_open, zero[:, 0]], -1)
    want_gm = get_reward("gm").meta_fn(g_m, g_p, zero, zero, div, torch.tensor([True, False] * 3), member=member)
    same(gm, want_gm, exact_rows=range(6))
    assert want_gm[[1, 3, 5]].tolist() == [-2.0, -2.0, -2.0] and want_gm[4].item() == 0.0  # wrong rows: -cap; no change: 0


# ----------------------------------------------------------------------------- through the scorer

SCORER_OPS = {
    "pmi_shift": {"gold_decoy_contrast", "fused_linear_token_logprobs", "belief_shift"},
    "gm": {"gold_decoy_contrast", "fused_linear_token_logprobs", "clipped_mean_min"},
    "pmi": {"fused_linear_token_logprobs", "clipped_mean_min"},
}


@pytest.mark.parametrize("arm", sorted(SCORER_OPS))
@pytest.mark.parametrize("name", BACKENDS)
def test_scorer_runs_the_chosen_backend_and_equals_the_reference_path(lm, name, arm):
    """One scoring call per path on the tiny model: the fused path's values equal the reference
    path's (per-read log-probs, the first divergent position's decoy read a vocabulary pass, then the
    float64 meta_fn) within fp32 rounding; the fused path called exactly the entry's kernels, all on
    the chosen backend; and answers with one divergent position cost the belief heads no vocabulary
    pass at all (the reference path runs one per read)."""
    model, tok, mids = lm
    batch = make_batch(tok, BATCH_EXAMPLES, BATCH_ROWS)
    cfg, grades = RewardConfig(name=arm, agg="mean_min"), torch.tensor(BATCH_GRADES)
    with backend(name):
        want, _, _ = score_meta_head(cfg, batch, grades, BATCH_EXAMPLES, model, tok, mids, fused=False)
        ops.reset_call_counts()
        got, route, m = score_meta_head(cfg, batch, grades, BATCH_EXAMPLES, model, tok, mids)
        counts = ops.call_counts()
    assert route == "meta" and torch.isfinite(got).sum() >= 4
    torch.testing.assert_close(got, want, rtol=0, atol=TOL, equal_nan=True)
    want_ops = SCORER_OPS[arm] - ({"fused_linear_token_logprobs"} if name == "torch" and arm != "pmi" else set())
    assert {op for op, _ in counts} == want_ops and {ran for _, ran in counts} == {name}, counts
    assert all(math.isfinite(v) for v in m.values())
    if arm == "pmi":
        return
    one = [row for row in BATCH_ROWS if row[0] == 0]  # gold 16 / decoy 17: one divergent position
    assert BATCH_EXAMPLES[0].gold == "16" and BATCH_EXAMPLES[0].decoy == "17"
    with backend(name):
        values, _, _ = score_meta_head(cfg, make_batch(tok, BATCH_EXAMPLES, one), grades[:len(one)], BATCH_EXAMPLES, model, tok, mids)
        fused_counts = ops.call_counts()
        ops.reset_call_counts()
        score_meta_head(cfg, make_batch(tok, BATCH_EXAMPLES, one), grades[:len(one)], BATCH_EXAMPLES, model, tok, mids, fused=False)
        reference_counts = ops.call_counts()
    assert torch.isfinite(values).any() and ("gold_decoy_contrast", name) in fused_counts
    assert ("fused_linear_token_logprobs", name) not in fused_counts and ("fused_linear_token_logprobs", name) in reference_counts
