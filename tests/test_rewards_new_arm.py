"""A new reward arm is a registry entry plus its pure function (SPEC section 2, registry.py).

The arms below exist only in this file. Registered, each runs through the trainer's reward seam
(`scoring.compute_reward_heads` -> `meta_scorer.score_meta_head`) and the advantage assembly
(`algo.grpo.assemble_advantages`) with no edit in either, and its values equal a brute-force
full forward of the same scoring contexts.
"""

from __future__ import annotations

import pytest
import torch

from selfdistill.algo.grpo import assemble_advantages
from selfdistill.config import Config, RewardConfig
from selfdistill.data import encode_prompt
from selfdistill.models import build_char_tokenizer, meta_token_ids
from selfdistill.rewards import (
    CONTEXT_PREFIX,
    CONTEXT_PREFIX_META,
    CONTEXT_PREFIX_PLACEBO,
    REWARDS,
    ROUTE_ANSWER_WITH_ARM,
    ROUTE_META,
    TARGET_ANSWERS,
    TARGET_CONTINUATION,
    RewardSpec,
    ScorerPasses,
    apply_membership,
    masked_mean,
)
from selfdistill.rewards.common import mean_or_zero
from selfdistill.rewards.meta_scorer import PLACEBO_BLOCK, answer_pair
from selfdistill.rewards.scoring import compute_reward_heads
from tests.test_meta_scorer import TOL, brute_belief, brute_cont_logps, ex, ids_of, lm, make_batch, split  # noqa: F401 (lm: fixture)


# ----------------------------------------------------------------------------- the arms (pure functions)

def belief_gain(belief_after: torch.Tensor, belief_before: torch.Tensor, correct: torch.Tensor, *,
                member: torch.Tensor) -> torch.Tensor:
    """How far M moved belief past the placebo block, + for a correct rollout, - for a wrong one."""
    x = belief_after - belief_before
    return apply_membership(torch.where(correct, x, -x), member, "belief_gain")


def belief_gain_metrics(belief_after: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
    ok = torch.isfinite(values)
    return {"belief_gain/members": float(ok.sum()), "belief_gain/after_mean": mean_or_zero(belief_after[ok])}


def continuation_lift(logp_after: torch.Tensor, logp_bare: torch.Tensor, cont_mask: torch.Tensor, *,
                      member: torch.Tensor) -> torch.Tensor:
    """Mean log-prob gain of C's tokens when M precedes them."""
    return apply_membership(masked_mean(logp_after - logp_bare, cont_mask), member, "continuation_lift")


def arm_gap(correct01: torch.Tensor, with_arm: torch.Tensor) -> torch.Tensor:
    """+1 / -1 for a correct / wrong with-arm rollout, 0 for the without arm: no scorer pass."""
    return torch.where(with_arm, torch.where(correct01, 1.0, -1.0), 0.0).double()


NEW_ARMS = {
    "belief_gain": RewardSpec(
        "belief_gain", belief_gain, "belief_gain", ROUTE_META,
        passes=ScorerPasses(TARGET_ANSWERS, (("after", CONTEXT_PREFIX_META), ("before", CONTEXT_PREFIX_PLACEBO))),
        metrics_fn=belief_gain_metrics,
    ),
    "continuation_lift": RewardSpec(
        "continuation_lift", continuation_lift, "continuation_lift", ROUTE_META,
        passes=ScorerPasses(TARGET_CONTINUATION, (("after", CONTEXT_PREFIX_META), ("bare", CONTEXT_PREFIX)),
                            needs_continuation=True),
    ),
    "arm_gap": RewardSpec("arm_gap", arm_gap, "arm_gap", ROUTE_ANSWER_WITH_ARM),
}


@pytest.fixture
def new_arms(monkeypatch):
    for name, spec in NEW_ARMS.items():
        monkeypatch.setitem(REWARDS, name, spec)


def expected_tokens(T, lengths, meta_spans, correctness_adv, meta_adv, w, meta_route_rows=None):
    """Per-token advantages by hand (SPEC section 4): positions inside a row's meta span get
    w * meta_adv (route meta), every other real position gets correctness_adv. With
    `meta_route_rows` (route answer_with_arm, rows without meta), those rows add w * meta_adv to
    every position."""
    out = torch.zeros(len(lengths), T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        for t in range(n):
            span = meta_spans[i]
            if span is not None and span[0] <= t <= span[1]:
                out[i, t] = w * meta_adv[i]
            else:
                out[i, t] = correctness_adv[i] + (w * meta_adv[i] if meta_route_rows and meta_route_rows[i] else 0.0)
    return out


# ----------------------------------------------------------------------------- the tests

def test_new_belief_arm_runs_through_scorer_and_advantages(lm, new_arms):
    model, tok, mids = lm
    texts = ["7-9=-2 <|meta|>sign: 7--9=16<|/meta|> so \\boxed{16}", "2-5=-3 <|meta|>check 7--9<|/meta|> so \\boxed{25}",
             "7-9=-2 \\boxed{-2}"]
    examples = [ex("16", "25")]  # two divergent positions: the decoy pass runs too
    batch = make_batch(tok, examples, [(0, t) for t in texts])
    grades = torch.tensor([1, 0, 0])
    heads, route, m = compute_reward_heads(RewardConfig(name="belief_gain"), batch, grades, examples, model, tok, mids)
    assert route == "meta" and set(heads) == {"correctness", "belief_gain"}

    prompt, pair = encode_prompt(tok, examples[0]), answer_pair(tok, "16", "25")
    placebo = ids_of(tok, PLACEBO_BLOCK)
    expected, spans = [], []
    for text, correct in zip(texts[:2], (True, False)):
        c, s, e = split(tok, mids, text)
        after, _, _ = brute_belief(model, prompt + c[: e + 1], pair)
        before, _, _ = brute_belief(model, prompt + c[:s] + placebo, pair)
        expected.append((after - before) if correct else (before - after))
        spans.append((s, e))
    values = heads["belief_gain"]
    assert values[:2].tolist() == pytest.approx(expected, abs=2 * TOL) and torch.isnan(values[2])
    assert abs(expected[0]) > 1e-3 and abs(expected[1]) > 1e-3  # not vacuous
    assert m["belief_gain/members"] == 2.0 and m["reward/belief_gain/nan_frac"] == pytest.approx(1 / 3)
    assert m["reward/belief_gain/nonmember/no_closed_block"] == pytest.approx(1 / 3) and m["scorer/sequences"] > 0
    assert m["meta/emission_rate"] == pytest.approx(2 / 3)

    cfg = Config()
    adv = assemble_advantages(batch, heads, route, mids, cfg, steps_applied=cfg.reward.meta_warmup_steps)
    ca = [1 + 1 / 3, -1 + 1 / 3, -1 + 1 / 3]  # correctness (1, -1, -1) centred on its mean -1/3
    v = values[:2].tolist()  # routing is checked on the head's own values (their accuracy is checked above)
    ma = [v[0] - (v[0] + v[1]) / 2, v[1] - (v[0] + v[1]) / 2, 0.0]  # the non-member gets 0
    want = expected_tokens(adv.tokens.shape[1], batch.lengths.tolist(), spans + [None], ca, ma, cfg.reward.meta_weight)
    torch.testing.assert_close(adv.tokens.double(), want, rtol=0, atol=1e-6)


def test_new_continuation_arm_equals_brute_force(lm, new_arms):
    model, tok, mids = lm
    text = "7-9=-2 <|meta|>sign slip<|/meta|> 7--9=16 \\boxed{16}"
    examples = [ex("16", "17")]
    batch = make_batch(tok, examples, [(0, text), (0, "7-9=-2 <|meta|>sign slip<|/meta|>  ")])  # 2nd: blank C
    heads, route, m = compute_reward_heads(RewardConfig(name="continuation_lift"), batch, torch.tensor([1, 1]),
                                           examples, model, tok, mids)
    prompt = encode_prompt(tok, examples[0])
    c, s, e = split(tok, mids, text)
    lift = brute_cont_logps(model, prompt + c[: e + 1], c[e + 1:]) - brute_cont_logps(model, prompt + c[:s], c[e + 1:])
    values = heads["continuation_lift"]
    assert values[0].item() == pytest.approx(float(lift.mean()), abs=TOL) and torch.isnan(values[1])
    assert m["reward/continuation_lift/nonmember/blank_continuation"] == 0.5


def test_new_arm_without_passes_needs_no_scorer(new_arms):
    tok = build_char_tokenizer()
    mids = meta_token_ids(tok)
    examples = [ex("4", "5", q="2+2")]
    batch = make_batch(tok, examples, [(0, "\\boxed{4}"), (0, "\\boxed{5}"), (0, "\\boxed{4}"), (0, "\\boxed{3}")],
                       with_arm=[True, True, False, False])
    grades = torch.tensor([1, 0, 1, -1])
    heads, route, m = compute_reward_heads(RewardConfig(name="arm_gap"), batch, grades, examples, None, tok, mids)
    assert route == "answer_with_arm" and heads["arm_gap"].tolist() == [1.0, -1.0, 0.0, 0.0]
    assert m["reward/skip_rate"] == 0.0 and m["reward/arm_gap/nan_frac"] == 0.0
    cfg = Config()
    adv = assemble_advantages(batch, heads, route, mids, cfg, steps_applied=cfg.reward.meta_warmup_steps)
    ca = [1.0, -1.0, 1.0, -1.0]  # correctness (1, -1, 1, -1): group mean 0
    ma = [1.0, -1.0, 0.0, 0.0]  # arm_gap (1, -1, 0, 0): group mean 0
    want = expected_tokens(adv.tokens.shape[1], batch.lengths.tolist(), [None] * 4, ca, ma, cfg.reward.meta_weight,
                           [True, True, False, False])
    torch.testing.assert_close(adv.tokens.double(), want, rtol=0, atol=1e-6)


def test_entries_are_checked_when_made():
    answers = ScorerPasses(TARGET_ANSWERS, (("after", CONTEXT_PREFIX_META),))
    with pytest.raises(ValueError, match="needs input 'logp_after'"):
        RewardSpec("bad", continuation_lift, "bad", ROUTE_META, passes=answers)  # wants continuation inputs
    with pytest.raises(ValueError, match="needs input 'belief_before'"):
        RewardSpec("bad", belief_gain, "bad", ROUTE_META, passes=answers)  # no context named before
    with pytest.raises(ValueError, match="needs input 'belief_after'"):
        RewardSpec("bad", arm_gap, "bad", ROUTE_ANSWER_WITH_ARM, metrics_fn=belief_gain_metrics)
    with pytest.raises(ValueError, match="by name"):
        RewardSpec("bad", lambda correct, /: correct, "bad", ROUTE_META)
    with pytest.raises(ValueError, match="contexts"):
        ScorerPasses(TARGET_ANSWERS, (("x", "prefix_plus_answer"),))
    with pytest.raises(ValueError, match="distinct"):
        ScorerPasses(TARGET_ANSWERS, (("x", CONTEXT_PREFIX), ("x", CONTEXT_PREFIX_META)))
    with pytest.raises(ValueError, match="target"):
        ScorerPasses("logits", (("x", CONTEXT_PREFIX),))
    with pytest.raises(ValueError, match="need a meta head"):
        RewardSpec("bad", None, None, None, passes=answers)
    with pytest.raises(ValueError, match="meta_route"):
        RewardSpec("bad", arm_gap, "bad", "everywhere")
