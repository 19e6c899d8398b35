"""The meta scorer (SPEC sections 1-2): token-level contexts, beliefs equal to a brute-force full
forward, membership, and one batched call equal to per-rollout calls.

The brute-force, membership and batching tests run on two models (`any_lm`): the char model, and a
Qwen3 checkpoint with a byte-level BPE tokenizer and ChatML template (selfdistill.models.chatml),
whose multi-token answers give gold/decoy pairs of different lengths (non-members, counted in
`reward/skip_rate`) and divergent positions that BPE merges move (`{-` is one token)."""

from __future__ import annotations

import math

import pytest
import torch

from selfdistill.config import ModelConfig, RewardConfig, TinyModelConfig
from selfdistill.data import encode_prompt
from selfdistill.data.example import Example
from selfdistill.models import build_char_tokenizer, load_model_and_tokenizer, meta_token_ids
from selfdistill.rewards import meta_scorer
from selfdistill.rewards.common import gate
from selfdistill.rewards.meta_scorer import PLACEBO_BLOCK, TeacherForcedPasses, answer_pair, score_meta_head
from selfdistill.rollout.base import RolloutBatch
from tests.chatml_helpers import tiny_chatml_checkpoint
from tests.meta_helpers import spelled, tagged

BELIEF_ARMS = ("pmi", "gm", "pmi_shift")
TOL = 2e-4  # fp32 model: batched right-padded forwards vs one unpadded full forward


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tiny = TinyModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=128)
    model, tok = load_model_and_tokenizer(ModelConfig(tiny=tiny))
    # Random init gives nearly uniform predictions; larger weights make the contrasts non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval(), tok, meta_token_ids(tok)


@pytest.fixture(scope="module")
def bpe_lm(tmp_path_factory):
    """The tiny BPE/ChatML checkpoint loaded as a user's (meta tokens added on spare rows)."""
    model, tok = load_model_and_tokenizer(ModelConfig(path=tiny_chatml_checkpoint(tmp_path_factory)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval(), tok, meta_token_ids(tok)


@pytest.fixture(params=["char", "bpe"])
def any_lm(request):
    return request.getfixturevalue("lm" if request.param == "char" else "bpe_lm")


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def make_batch(tok, examples, rows, with_arm=None, eos=True) -> RolloutBatch:
    """rows: (group, completion) with the completion as text or as a list of token ids."""
    prompts = [encode_prompt(tok, examples[g]) for g, _ in rows]
    comps = [(c if isinstance(c, list) else ids_of(tok, c)) + ([tok.eos_token_id] if eos else []) for _, c in rows]
    T = max(len(c) for c in comps) + 3  # + padding
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    texts = [tok.decode([t for t in c if t != tok.eos_token_id], skip_special_tokens=False) for c in comps]
    arm = torch.ones(len(rows), dtype=torch.bool) if with_arm is None else torch.tensor(with_arm)
    return RolloutBatch(prompts, ids, mask, torch.zeros_like(mask), torch.tensor([g for g, _ in rows]), arm, texts)


def ex(gold: str, decoy: str, q: str = "7-3*(2-5)") -> Example:
    return Example(id=f"{q}|{gold}", prompt=[{"role": "user", "content": q}], gold=gold, decoy=decoy)


def score(lm, arm, examples, rows, grades, **kw):
    model, tok, mids = lm
    batch = make_batch(tok, examples, rows)
    return score_meta_head(RewardConfig(name=arm), batch, torch.tensor(grades), examples, model, tok, mids, **kw)


def record_passes(monkeypatch) -> list[TeacherForcedPasses]:
    seen: list[TeacherForcedPasses] = []
    run = TeacherForcedPasses.run

    def spy(self, *a, **k):
        seen.append(self)
        return run(self, *a, **k)

    monkeypatch.setattr(TeacherForcedPasses, "run", spy)
    return seen


# ----------------------------------------------------------------------------- brute force

def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one unpadded full-sequence forward, float64 [L, V]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), -1)


def brute_answer_logps(model, ctx, answer):
    lp = full_logprobs(model, ctx + answer)
    return [float(lp[len(ctx) + k - 1, answer[k]]) for k in range(len(answer))]


def brute_belief(model, ctx, pair):
    g, d = brute_answer_logps(model, ctx, pair.gold), brute_answer_logps(model, ctx, pair.decoy)
    return sum(g[k] - d[k] for k in pair.divergent), g, d


def brute_cont_logps(model, ctx, cont):
    lp = full_logprobs(model, ctx + cont)
    return torch.tensor([float(lp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)], dtype=torch.float64)


def split(tok, mids, text):
    c = ids_of(tok, text)
    s, e = c.index(mids[0]), c.index(mids[1])
    return c, s, e


# ----------------------------------------------------------------------------- token-level contexts

def test_contexts_are_token_level_splices_of_the_sampled_ids(lm, monkeypatch):
    """Removing or replacing M changes no other token id: the completion's own sampled ids stay, even
    ones whose text would re-tokenize differently (a literal `<|meta|>` spelled in single chars)."""
    model, tok, mids = lm
    spelled = ids_of(tok, "<") + ids_of(tok, "|meta|>")  # 8 char tokens; as text it is the meta tag
    assert len(spelled) == 8 and ids_of(tok, tok.decode(spelled)) == [mids[0]]
    P = ids_of(tok, "2-5=-3 ") + spelled + ids_of(tok, " x")
    M = ids_of(tok, "<|meta|>check the sign<|/meta|>")
    C = ids_of(tok, " so ") + spelled + ids_of(tok, " \\boxed{16}")
    examples = [ex("16", "17")]
    prompt = encode_prompt(tok, examples[0])
    placebo = ids_of(tok, PLACEBO_BLOCK)
    seen = record_passes(monkeypatch)
    score_meta_head(RewardConfig(name="pmi"), make_batch(tok, examples, [(0, P + M + C)]), torch.tensor([1]), examples, model, tok, mids)
    # each scored sequence ends one token before C's last (its state predicts nothing needed)
    expected = {tuple(prompt + P + M + C[:-1]), tuple(prompt + P + C[:-1]), tuple(prompt + P + placebo + C[:-1])}
    assert set(seen[0].seqs) == expected
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert all(eos not in s and pad not in s for s in seen[0].seqs)
    # every read is a token of C, at its own position in its context
    targets = sorted(t for _, _, t in seen[0].reads)
    assert targets == sorted(C * 3)

    seen.clear()
    score_meta_head(RewardConfig(name="gm"), make_batch(tok, examples, [(0, P + M + C)]), torch.tensor([1]), examples, model, tok, mids)
    pair = answer_pair(tok, "16", "17")
    assert pair.divergent == [len(ids_of(tok, "\\boxed{1"))]  # one divergent position: 6 vs 7
    cut = pair.divergent[-1]
    assert set(seen[0].seqs) == {tuple(prompt + P + M + pair.gold[:cut]), tuple(prompt + P + placebo + pair.gold[:cut])}


def test_eos_and_padding_never_enter_a_context(any_lm, monkeypatch):
    model, tok, mids = any_lm
    examples = [ex("16", "25")]  # two divergent positions: the decoy pass runs too
    seen = record_passes(monkeypatch)
    for arm in BELIEF_ARMS:
        seen.clear()
        batch = make_batch(tok, examples, [(0, "a <|meta|>b<|/meta|> c \\boxed{16}"), (0, "<|meta|>bb<|/meta|>cc")])
        values, _, _ = score_meta_head(RewardConfig(name=arm), batch, torch.tensor([1, 0]), examples, model, tok, mids)
        assert torch.isfinite(values).all(), arm
        # after the prompt (a ChatML prompt holds <|im_end|>, the EOS, as its user turn's end)
        prompt = tuple(encode_prompt(tok, examples[0]))
        assert seen[0].seqs and all(s[: len(prompt)] == prompt for s in seen[0].seqs)
        assert all(tok.eos_token_id not in s[len(prompt):] and tok.pad_token_id not in s[len(prompt):] for s in seen[0].seqs)


# ----------------------------------------------------------------------------- brute-force equality

@pytest.mark.parametrize("gold,decoy", [("16", "17"), ("16", "25"), ("-12", "-21"), ("-12", "12"), ("123", "132"),
                                        ("9", "10"), ("\\frac{3}{4}", "\\frac{4}{3}")])
def test_pmi_shift_belief_equals_brute_force(any_lm, gold, decoy):
    lm = any_lm
    model, tok, mids = lm
    text = "2-5=-3, 3*-3=-9, 7-9=-2 <|meta|>check 7--9=16<|/meta|> so \\boxed{16}"
    examples = [ex(gold, decoy)]
    pair = answer_pair(tok, gold, decoy)
    if pair.divergent is None:  # different token lengths: a counted non-member, no crash (SPEC section 1)
        assert len(pair.gold) != len(pair.decoy)
        values, _, m = score(lm, "pmi_shift", examples, [(0, text)], [0])
        assert torch.isnan(values).all() and m["reward/skip_rate"] == 1.0
        assert m["reward/pmi_shift/nonmember/unscorable_pair"] == 1.0
        return
    prompt = encode_prompt(tok, examples[0])
    c, s, e = split(tok, mids, text)
    b_open, _, _ = brute_belief(model, prompt + c[:s], pair)
    b_close, _, _ = brute_belief(model, prompt + c[: e + 1], pair)
    values, route, m = score(lm, "pmi_shift", examples, [(0, text)], [0])
    assert route == "meta"
    assert m["belief/open_mean"] == pytest.approx(b_open, abs=TOL)
    assert m["belief/close_mean"] == pytest.approx(b_close, abs=TOL)
    shift = b_close - b_open
    expected = max(-2.0, min(2.0, shift)) + (1.0 if b_open < 0 < b_close else 0.0) - (2.0 if b_close < 0 < b_open else 0.0)
    assert values.item() == pytest.approx(expected, abs=2 * TOL)
    assert abs(b_open) > 1e-3 and abs(shift) > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("correct", [1, 0])
def test_gm_equals_brute_force(any_lm, correct):
    lm = any_lm
    model, tok, mids = lm
    text = "7-9=-2 <|meta|>sign: 7--9=16<|/meta|> so \\boxed{16}"
    examples = [ex("16", "25")]
    pair = answer_pair(tok, "16", "25")
    prompt = encode_prompt(tok, examples[0])
    c, s, e = split(tok, mids, text)
    placebo = ids_of(tok, PLACEBO_BLOCK)
    _, g_m, d_m = brute_belief(model, prompt + c[: e + 1], pair)
    _, g_p, d_p = brute_belief(model, prompt + c[:s] + placebo, pair)
    did = [max(-2.0, min(2.0, (g_m[k] - g_p[k]) - (d_m[k] - d_p[k]))) for k in pair.divergent]
    x = sum(did) / len(did) + min(did)
    values, _, m = score(lm, "gm", examples, [(0, text)], [correct])
    assert values.item() == pytest.approx(float(gate(x, bool(correct), 2.0)), abs=2 * TOL)
    assert m["belief/meta_mean"] == pytest.approx(sum(g_m[k] - d_m[k] for k in pair.divergent), abs=TOL)
    assert m["belief/placebo_mean"] == pytest.approx(sum(g_p[k] - d_p[k] for k in pair.divergent), abs=TOL)


@pytest.mark.parametrize("agg", ["mean", "sum_clip", "mean_min"])
def test_pmi_equals_brute_force(any_lm, agg):
    lm = any_lm
    model, tok, mids = lm
    text = "7-9=-2 <|meta|>sign slip<|/meta|> 7--9=16 \\boxed{16}"
    examples = [ex("16", "17")]
    prompt = encode_prompt(tok, examples[0])
    c, s, e = split(tok, mids, text)
    C = c[e + 1:]
    placebo = ids_of(tok, PLACEBO_BLOCK)
    real = brute_cont_logps(model, prompt + c[: e + 1], C)
    without = brute_cont_logps(model, prompt + c[:s], C)
    plac = brute_cont_logps(model, prompt + c[:s] + placebo, C)

    def aggregate(d):
        dc = d.clamp(-2, 2)
        return {"mean": d.mean(), "sum_clip": dc.sum(), "mean_min": dc.mean() + dc.min()}[agg]

    x = float(aggregate(real - without) - aggregate(plac - without))
    model_, tok_, mids_ = lm
    batch = make_batch(tok, examples, [(0, text), (0, text)])
    values, _, m = score_meta_head(RewardConfig(name="pmi", agg=agg), batch, torch.tensor([1, 0]), examples, model_, tok_, mids_)
    assert values.tolist() == pytest.approx([float(gate(x, True, 0.1085)), float(gate(x, False, 0.1085))], abs=TOL)
    assert m["pmi/d_real_mean"] == pytest.approx(float((real - without).mean()), abs=TOL)
    assert m["pmi/d_placebo_mean"] == pytest.approx(float((plac - without).mean()), abs=TOL)
    assert m["pmi/continuation_len"] == len(C)


# ----------------------------------------------------------------------------- membership

def test_membership_cases_are_nan_and_counted(any_lm):
    lm = any_lm
    examples = [ex("16", "17"), ex("16", "6", q="4*4")]  # group 1: unequal token lengths
    rows = [
        (0, "7-9=-2 <|meta|>sign<|/meta|> \\boxed{16}"),  # member
        (0, "7-9=-2 \\boxed{-2}"),  # no meta at all
        (0, "7-9=-2 <|meta|>unclosed \\boxed{16}"),  # only an unclosed block
        (0, "<|/meta|> stray close <|meta|>still open"),  # stray close is text; block unclosed
        (0, "7-9=-2 <|meta|>  \n <|/meta|> \\boxed{16}"),  # blank meta
        (0, "7-9=-2 <|meta|>sign<|/meta|>   "),  # blank continuation (pmi, gm only)
        (1, "4*4=16 <|meta|>ok<|/meta|> \\boxed{16}"),  # pair not scorable
        (0, "x <|meta|>it is 16<|/meta|> \\boxed{16}"),  # gold in meta (pmi guard)
    ]
    n = len(rows)
    for arm in BELIEF_ARMS:
        values, _, m = score(lm, arm, examples, rows, [1] * n)
        nan = torch.isnan(values).tolist()
        blank_c_member = arm == "pmi_shift"
        gold_member = arm != "pmi"
        assert nan == [False, True, True, True, True, not blank_c_member, True, not gold_member], arm
        assert m["reward/skip_rate"] == pytest.approx(1 / n)
        assert m[f"reward/{arm}/nan_frac"] == pytest.approx(sum(nan) / n)
        assert m[f"reward/{arm}/nonmember/no_closed_block"] == pytest.approx(3 / n)
        assert m[f"reward/{arm}/nonmember/blank_meta"] == pytest.approx(1 / n)
        assert m[f"reward/{arm}/nonmember/unscorable_pair"] == pytest.approx(1 / n)
        assert m[f"reward/{arm}/nonmember/blank_continuation"] == pytest.approx(0 if blank_c_member else 1 / n)
        assert m[f"reward/{arm}/nonmember/gold_in_meta"] == pytest.approx(1 / n if arm == "pmi" else 0)
        assert m["meta/emission_rate"] == pytest.approx(7 / n)
        assert all(math.isfinite(v) for v in m.values()), arm


def test_no_member_runs_no_pass_and_reports_finite_metrics(lm, monkeypatch):
    seen = record_passes(monkeypatch)
    for arm in BELIEF_ARMS:
        values, _, m = score(lm, arm, [ex("16", "17")], [(0, "7-9=-2 \\boxed{-2}"), (0, "no answer")], [0, 0])
        assert torch.isnan(values).all()
        assert m["reward/meta_mean"] == 0.0 and m[f"reward/{arm}/nan_frac"] == 1.0 and m["scorer/sequences"] == 0.0
    assert all(not p.seqs for p in seen)


def test_missing_decoy_and_missing_scorer_raise(lm):
    model, tok, mids = lm
    e = Example(id="x", prompt=[{"role": "user", "content": "1+1"}], gold="2", decoy=None)
    batch = make_batch(tok, [e], [(0, "a <|meta|>b<|/meta|> c")])
    with pytest.raises(ValueError, match="no decoy"):
        score_meta_head(RewardConfig(name="pmi_shift"), batch, torch.tensor([1]), [e], model, tok, mids)
    with pytest.raises(ValueError, match="needs a scorer"):
        score_meta_head(RewardConfig(name="gm"), batch, torch.tensor([1]), [ex("2", "3")], None, tok, mids)
    with pytest.raises(ValueError, match="no meta head"):
        score_meta_head(RewardConfig(name="base"), batch, torch.tensor([1]), [ex("2", "3")], model, tok, mids)


# ----------------------------------------------------------------------------- batching

BATCH_ROWS = [
    (0, "2-5=-3 <|meta|>check 7--9<|/meta|> so \\boxed{16}"),
    (0, "2-5=-3 <|meta|>check 7--9<|/meta|> so \\boxed{16}"),  # identical rollout (deduplicated pass)
    (0, "7-9=-2 \\boxed{-2}"),
    (0, "<|meta|>hm<|/meta|>7--9=16, \\boxed{16} <|meta|>second<|/meta|>!"),
    (1, "4*4=15 <|meta|>4*4 again<|/meta|> \\boxed{16}"),
    (1, "4*4=16, <|meta|>sure?<|/meta|> yes \\boxed{16}"),
    (1, "<|meta|>q<|/meta|>"),
    (1, "long prefix 1+1+1+1+1+1+1+1 <|meta|>a longer meta block here<|/meta|> continuing \\boxed{17}"),
]
BATCH_EXAMPLES = [ex("16", "17"), ex("16", "25", q="4*4")]
BATCH_GRADES = [1, 1, 0, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("arm", BELIEF_ARMS)
def test_one_batched_call_equals_per_rollout_calls(any_lm, arm, monkeypatch):
    lm = any_lm
    seen = record_passes(monkeypatch)
    values, _, _ = score(lm, arm, BATCH_EXAMPLES, BATCH_ROWS, BATCH_GRADES)
    assert len(seen) == 1 and len(seen[0].chunks(meta_scorer.MAX_BATCH_TOKENS, meta_scorer.MAX_BATCH_SIZE)) == 1
    assert torch.isfinite(values).sum() >= 4
    singles = torch.cat([score(lm, arm, BATCH_EXAMPLES, [row], [g])[0] for row, g in zip(BATCH_ROWS, BATCH_GRADES)])
    torch.testing.assert_close(values, singles, atol=TOL, rtol=0, equal_nan=True)
    # a tiny token budget (one sequence per forward) gives the same values
    chunked, _, _ = score(lm, arm, BATCH_EXAMPLES, BATCH_ROWS, BATCH_GRADES, max_batch_tokens=1)
    torch.testing.assert_close(values, chunked, atol=TOL, rtol=0, equal_nan=True)


def test_identical_rollouts_share_their_passes(lm, monkeypatch):
    seen = record_passes(monkeypatch)
    row = BATCH_ROWS[0]
    score(lm, "pmi_shift", BATCH_EXAMPLES, [row], [1])
    one = len(seen[0].seqs)
    score(lm, "pmi_shift", BATCH_EXAMPLES, [row] * 5, [1] * 5)
    assert len(seen[1].seqs) == one == 2  # open and close after the gold prefix; one divergent position


def test_scorer_mode_and_grad_left_alone(lm):
    model, tok, mids = lm
    model.train()
    try:
        values, _, _ = score(lm, "pmi_shift", BATCH_EXAMPLES, BATCH_ROWS[:2], [1, 1])
        assert model.training and not values.requires_grad
    finally:
        model.eval()


# ----------------------------------------------------------------------------- cf / asym_cf

def test_counterfactual_arms_need_no_scorer_and_count_cases(any_lm):
    _, tok, mids = any_lm
    examples = [ex("16", "17"), ex("4", "5", q="2+2"), ex("1", "2", q="0+1")]
    # group 0: with 2/2 correct, without 1/2 -> gain; group 1: with 0/2, without 2/2 -> loss, meta hurt;
    # group 2: both 2/2 -> both solved
    rows = [(g, "<|meta|>m<|/meta|> \\boxed{1}" if i % 4 < 2 else PLACEBO_BLOCK + " \\boxed{1}") for g in range(3) for i in range(4)]
    arm = [True, True, False, False] * 3
    grades = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    batch = make_batch(tok, examples, rows, with_arm=arm)
    v, route, m = score_meta_head(RewardConfig(name="asym_cf"), batch, grades, examples, None, tok, mids)
    assert route == "answer_with_arm"
    assert v.tolist() == pytest.approx([0.5, 0.5, 0, 0, -2.5, -2.5, 0, 0, -0.5, -0.5, 0, 0])
    assert (m["asym_cf/case_gain"], m["asym_cf/case_loss"], m["asym_cf/case_both_solved"], m["asym_cf/case_tie"]) == (1, 1, 1, 0)
    assert m["asym_cf/acc_with"] == pytest.approx(4 / 6) and m["asym_cf/acc_without"] == pytest.approx(5 / 6)
    v, route, m = score_meta_head(RewardConfig(name="cf"), batch, grades, examples, None, tok, mids)
    # with-arm rollouts emitted meta: group 0 v = 1 - 0.5; group 1 v = 0 - 1 - 0.1; group 2 v = 1 - 1 - 0.1
    assert v.tolist() == pytest.approx([0.5, 0.5, 0, 0, -1.1, -1.1, 0, 0, -0.1, -0.1, 0, 0])
    assert (m["cf/groups_meta_hurt"], m["cf/groups_meta_helped"], m["cf/groups_solved_without"]) == (1, 1, 2)
    # emission counts the with arm only (a without-arm rollout's forced placebo is not the policy's)
    assert m["reward/skip_rate"] == 0.0 and m["meta/emission_rate"] == 1.0 and m["meta/blocks_per_rollout"] == 1.0


# ----------------------------------------------------------------------------- one grammar

def test_a_spelled_out_tag_is_text_for_membership_and_pmi_guards(lm):
    """SPEC section 1: only the special tokens are tags, for the scorer's P / M / C split and for
    the boxed answer PMI's guard compares with M (read from the token-cut outside-meta pieces)."""
    model, tok, mids = lm
    examples = [ex("16", "17")]
    first = tagged(tok, "x <|meta|>it was 7<|/meta|> so 16 ")
    rows = [
        (0, first + tagged(tok, "<|meta|>\\boxed{7}<|/meta|>")),  # box 7 inside a block: no boxed answer
        (0, first + spelled(tok, "<|meta|>\\boxed{7}<|/meta|>")),  # the same text; box 7 is the answer
        (0, spelled(tok, "x <|meta|>it was 7<|/meta|> so \\boxed{16}")),  # no block at all
    ]
    batch = make_batch(tok, examples, rows)
    assert batch.texts[0] == batch.texts[1]
    for arm in BELIEF_ARMS:
        values, _, m = score_meta_head(RewardConfig(name=arm), batch, torch.tensor([0, 0, 1]), examples, model, tok, mids)
        assert torch.isnan(values).tolist() == [False, arm == "pmi", True], arm
        assert m[f"reward/{arm}/nonmember/boxed_in_meta"] == pytest.approx(1 / 3 if arm == "pmi" else 0.0)
        assert m[f"reward/{arm}/nonmember/no_closed_block"] == pytest.approx(1 / 3)
        assert m["meta/emission_rate"] == pytest.approx(2 / 3) and m["meta/blocks_per_rollout"] == pytest.approx(1.0)
