"""One meta grammar (SPEC section 1): only the special tokens `<|meta|>` / `<|/meta|>` are tags.

The characters `<|meta|>` spelled out of ordinary char tokens decode to the same text as the tag
token; they must be ordinary text for regions and routing, for the emission metric (trainer and
evaluation) and for evaluation's grading. (Grading itself: tests/test_grader.py; the scorer's
membership and PMI's boxed guard: tests/test_meta_scorer.py.)
"""

from __future__ import annotations

import pytest
import torch

from selfdistill.algo.grpo import assemble_advantages
from selfdistill.config import Config, RewardConfig
from selfdistill.data.example import Example
from selfdistill.eval import evaluate
from selfdistill.models import build_char_tokenizer, meta_token_ids
from selfdistill.rewards.grader import extract_boxed_answer
from selfdistill.rewards.regions import meta_regions
from selfdistill.rewards.scoring import compute_reward_heads
from tests.meta_helpers import rollout_batch, spelled, tagged

TOK = build_char_tokenizer()
MIDS = meta_token_ids(TOK)
TEXT = "a<|meta|>b<|/meta|>c"


def test_spelled_out_tags_decode_like_tags_but_make_no_block():
    real, fake = tagged(TOK, TEXT), spelled(TOK, TEXT)
    assert TOK.decode(real) == TOK.decode(fake) == TEXT
    assert len(real) == 5 and len(fake) == len(TEXT)
    batch = rollout_batch(TOK, [real, fake])
    r = meta_regions(batch.completion_ids, batch.lengths, *MIDS)
    assert r.meta[0].nonzero().flatten().tolist() == [1, 2, 3] and r.emitted.tolist() == [True, False]
    assert not r.meta[1].any() and r.answer[1].sum() == len(fake) + 1  # every token, EOS included, is answer


def test_spelled_out_tags_get_no_meta_advantage():
    """SPEC section 4 routing with a real and a spelled-out block in one group: correctness on the
    non-meta tokens, the meta head (weight w = 0.8 after the warmup) on the real block's tokens only."""
    batch = rollout_batch(TOK, [tagged(TOK, TEXT), spelled(TOK, TEXT)])
    heads = {"correctness": torch.tensor([1.0, -1.0], dtype=torch.float64),
             "pmi": torch.tensor([0.3, 0.1], dtype=torch.float64)}
    cfg = Config()
    adv = assemble_advantages(batch, heads, "meta", MIDS, cfg, steps_applied=cfg.reward.meta_warmup_steps)
    # centred: correctness (1, -1); pmi (0.1, -0.1) * 0.8
    row0 = [1.0, 0.08, 0.08, 0.08, 1.0, 1.0]  # a, <|meta|>, b, <|/meta|>, c, EOS
    row1 = [-1.0] * (len(TEXT) + 1)  # no meta token: the -0.08 goes nowhere
    T = batch.completion_ids.shape[1]
    expected = torch.tensor([row0 + [0.0] * (T - len(row0)), row1 + [0.0] * (T - len(row1))])
    torch.testing.assert_close(adv.tokens, expected.to(adv.tokens.dtype), rtol=0, atol=1e-6)


def test_emission_rate_counts_tag_tokens_on_the_trainer_path():
    """`meta/emission_rate` comes from token ids for every arm, base included (the trainer's
    record takes it from compute_reward_heads)."""
    batch = rollout_batch(TOK, [tagged(TOK, TEXT), spelled(TOK, TEXT), tagged(TOK, "no meta"), tagged(TOK, "<|meta|>x")])
    grades = torch.tensor([1, 0, -1, 0])
    heads, route, metrics = compute_reward_heads(RewardConfig(name="base"), batch, grades, [], None, TOK, MIDS)
    assert route is None and heads["correctness"].tolist() == [1.0, -1.0, -1.0, -1.0]
    assert metrics == {"meta/emission_rate": 0.5, "meta/blocks_per_rollout": 0.5, "meta/mean_len": pytest.approx((3 + 2) / 2)}


class _FixedBackend:
    """Returns the given completions (token ids) for whatever prompts it is asked for."""

    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompts, meta_modes, **kw):
        return rollout_batch(TOK, self.completions[: len(prompts)], prompts=prompts)


class _SpyGrader:
    """Records what evaluation hands the grader; grades by exact match of the extracted answer."""

    def __init__(self):
        self.seen = []

    def grade(self, completions, golds):
        self.seen.extend(completions)
        return [int(extract_boxed_answer(p) == g) for p, g in zip(completions, golds)]


def test_evaluation_grades_and_counts_meta_from_token_ids():
    text = "\\boxed{1}<|meta|>\\boxed{2}<|/meta|>"
    completions = [tagged(TOK, text), spelled(TOK, text)]
    examples = [Example(id=str(i), prompt=[{"role": "user", "content": "1+1"}], gold="2") for i in range(2)]
    grader = _SpyGrader()
    out = evaluate(_FixedBackend(completions), TOK, examples, grader, max_new_tokens=8, batch_size=2,
                   prefix="heldout").metrics
    assert grader.seen == [["\\boxed{1}", ""], [text]]  # token-cut pieces, not decoded texts
    assert out["heldout/accuracy"] == 0.5  # only the spelled-out rollout's answer is 2
    assert out["heldout/meta_emission_rate"] == 0.5
