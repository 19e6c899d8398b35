"""The meta head of one rollout batch: scoring contexts, batched scorer passes, reward, metrics.

This is where the pure reward functions of this package meet the scorer model (SPEC sections 1-2).
The scorer knows no arm by name: it executes what the arm's registry entry (`registry.RewardSpec`)
declares, the passes (`ScorerPasses`: which contexts, what is scored after them, which
membership rules), the head's pure function and its metrics, bound to the inputs they name.

Contexts (SPEC section 1). Every context is the chat-templated prompt exactly as the policy saw it
followed by the completion's own sampled token ids; nothing is re-tokenized. Spliced pieces (the
placebo block, the answer strings `\\boxed{gold}` / `\\boxed{decoy}`) are tokenized on their own
and concatenated at token level. EOS and padding are cut off first, so they are never part of a
context or of a scored span. With P = completion before the first closed meta block M and C = the
completion after it, the registered arms declare:

    pmi        C scored after  prompt+P+M  |  prompt+P  |  prompt+P+placebo
    gm         gold, decoy after  prompt+P+M  |  prompt+P+placebo          (X = prompt+P)
    pmi_shift  gold, decoy after  prompt+P (open)  |  prompt+P+M (close)
    cf, asym_cf  correctness only: no scorer pass

Membership (SPEC section 2) is settled before any pass, so non-members cost nothing: no closed
block, blank M, blank C (entries with `needs_continuation`: pmi, gm), the entry's guard (PMI's;
it reads the rollout's boxed answer from its outside-meta pieces, cut at token level), and a gold
/ decoy pair that is not scorable (different token lengths or no divergent position, counted in
`reward/skip_rate`; the SPEC lists this rule for all three belief heads, pmi included).

Passes. Every teacher-forced sequence of the step (all rollouts, all pass kinds) goes into one
`scorer_passes.TeacherForcedPasses`, which drops exact duplicates (identical rollouts are common),
sorts by length and runs them in as few right-padded forwards as a token budget allows, at
temperature 1.0, under `torch.no_grad()`, in eval mode; only the final hidden states that predict a
scored token leave a forward.

The LM-head work has two paths. The fused path (the default, for every entry with a `fused_fn`):
belief heads read the hidden states at the answers' divergent positions through
`ops.dispatched_gold_decoy_contrast` -- the first divergent position of a row is one dot product
`h . (W[gold] - W[decoy]) / T` (SPEC section 1: the prefixes agree, the normaliser cancels; no
vocabulary pass, no logits), later ones the fused-linear log-probs of both passes, so the decoy
pass runs only for answers with a second divergent position -- and PMI reads C's tokens through the
fused-linear token log-probs; the entry's `fused_fn` then reduces them with the dispatched row
kernels in float64 (every backend: `ops.backend`). The reference path (`fused=False`, or an entry
without a `fused_fn`): one fused-linear log-prob per read, the first divergent position's decoy token
included (a full vocabulary pass, read from the gold pass's row), then the entry's float64 `meta_fn`.
Both give the head within fp32 rounding of each other (tests/test_rewards_fused.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from selfdistill.config import RewardConfig
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN
from selfdistill.rewards.base import correct_from_grades
from selfdistill.rewards.common import divergent_positions, mean_or_zero
from selfdistill.rewards.grader import extract_boxed_answer
from selfdistill.rewards.guards import NONMEMBER_REASONS, UNSCORABLE_PAIR, membership_reason
from selfdistill.rewards.regions import MetaRegions, content_regions, meta_structure_metrics, outside_meta_texts
from selfdistill.rewards.registry import (
    CONTEXT_PREFIX,
    CONTEXT_PREFIX_META,
    CONTEXT_PREFIX_PLACEBO,
    TARGET_CONTINUATION,
    RewardSpec,
    ScorerPasses,
    call_with_inputs,
    get_reward,
)
from selfdistill.rewards.scorer_passes import (  # noqa: F401  (TeacherForcedPasses, limits: importable here)
    MAX_BATCH_SIZE,
    MAX_BATCH_TOKENS,
    HiddenStates,
    TeacherForcedPasses,
    TokenLogprobs,
    answer_inputs_fused,
    answer_inputs_reference,
    continuation_inputs,
    eval_mode,
    lm_head,
)
from selfdistill.rollout.base import PLACEBO_TEXT, RolloutBatch

PLACEBO_BLOCK = META_OPEN + PLACEBO_TEXT + META_CLOSE


def answer_text(answer: str) -> str:
    """The text an answer is scored as (SPEC section 1)."""
    return f"\\boxed{{{answer}}}"


# ----------------------------------------------------------------------------- per-rollout inputs

@dataclass(frozen=True)
class AnswerPair:
    """Token ids of `\\boxed{gold}` and `\\boxed{decoy}` and their divergent positions (None when
    the pair is not scorable: different lengths or no divergent position)."""

    gold: list[int]
    decoy: list[int]
    divergent: Optional[list[int]]


def answer_pair(tokenizer, gold: str, decoy: str) -> AnswerPair:
    g = tokenizer(answer_text(gold), add_special_tokens=False)["input_ids"]
    d = tokenizer(answer_text(decoy), add_special_tokens=False)["input_ids"]
    ks = divergent_positions(g, d).nonzero().flatten().tolist()
    return AnswerPair(g, d, ks if len(g) == len(d) and ks else None)


def _examples_per_row(batch: RolloutBatch, examples: Sequence) -> list:
    gids = batch.group_ids.tolist()
    bad = sorted({g for g in gids if not 0 <= g < len(examples)})
    if bad:
        raise ValueError(f"score_meta_head: group ids {bad[:5]} have no example; got {len(examples)} examples "
                         "(one per group, indexed by group id)")
    return [examples[g] for g in gids]


# ----------------------------------------------------------------------------- the entry point

def score_meta_head(cfg: RewardConfig, batch: RolloutBatch, grades: Tensor, examples: Sequence, scorer, tokenizer,
                    meta_ids: tuple[int, int], *, max_batch_tokens: int = MAX_BATCH_TOKENS,
                    max_batch_size: int = MAX_BATCH_SIZE, fused: bool = True) -> tuple[Tensor, str, dict[str, float]]:
    """(values float64 [R] with NaN for non-members, the head's routing region, metrics).

    grades: [R] 1 correct / 0 wrong / -1 grader timeout (= wrong). examples: one per group, indexed
    by `batch.group_ids`, each with `.gold` and `.decoy`. scorer: the frozen reference (or the
    policy when `reward.use_policy_as_scorer`) as a plain HF causal LM; unused (may be None) when
    the entry declares no passes (cf / asym_cf). fused: run the entry's `fused_fn` on the fused
    LM-head path (module docstring); False forces the reference path (benchmarks/bench_scoring.py
    compares the two). Metrics include `meta_structure_metrics`.
    """
    spec = get_reward(cfg.name)
    if spec.meta_head is None:
        raise ValueError(f"score_meta_head: reward {cfg.name!r} has no meta head; the scorer is for meta arms only")
    R = len(batch)
    grades = torch.as_tensor(grades)
    if tuple(grades.shape) != (R,):
        raise ValueError(f"score_meta_head: grades has shape {tuple(grades.shape)}, expected ({R},)")
    correct = correct_from_grades(grades.cpu())
    ids, regions = content_regions(batch, tokenizer.eos_token_id, meta_ids)
    metrics = meta_structure_metrics(regions, batch.with_arm.cpu())
    inputs: dict[str, object] = {
        "correct": correct, "correct01": correct, "with_arm": batch.with_arm.cpu(), "group_ids": batch.group_ids.cpu(),
        "emitted_meta": regions.emitted, "agg": cfg.agg,
    }
    if spec.passes is None:
        metrics["reward/skip_rate"] = 0.0  # no gold/decoy pair is scored
        values = call_with_inputs(spec.meta_fn, inputs)
    else:
        if scorer is None:
            raise ValueError(f"score_meta_head: reward {cfg.name!r} needs a scorer model; got None")
        scored, pass_metrics = _scored_inputs(spec, batch, ids, regions, _examples_per_row(batch, examples), scorer,
                                              tokenizer, meta_ids, max_batch_tokens, max_batch_size,
                                              fused and spec.fused_fn is not None)
        head_fn = spec.fused_fn if fused and spec.fused_fn is not None else spec.meta_fn
        with torch.no_grad():
            values = call_with_inputs(head_fn, {**inputs, **scored}).double().cpu()
        inputs.update(_on_cpu(scored))  # what metrics_fn reads, whichever path ran
        metrics.update(pass_metrics)
    if spec.metrics_fn is not None:
        metrics.update(call_with_inputs(spec.metrics_fn, {**inputs, "values": values}))
    metrics.update(value_metrics(spec.meta_head, values))
    return values, spec.meta_route, metrics


def _on_cpu(inputs: dict[str, object]) -> dict[str, object]:
    """Tensors on the CPU, floating ones as float64 (for the metrics)."""
    return {k: (v.detach().cpu().double() if v.is_floating_point() else v.cpu()) if isinstance(v, Tensor) else v
            for k, v in inputs.items()}


@torch.no_grad()
def _scored_inputs(spec: RewardSpec, batch: RolloutBatch, ids: list[list[int]], regions: MetaRegions, row_examples: list,
                   scorer, tokenizer, meta_ids: tuple[int, int], max_batch_tokens: int, max_batch_size: int,
                   fused: bool) -> tuple[dict[str, object], dict[str, float]]:
    """Membership, then every pass the entry declares for every member, run batched, laid out as
    the fused or the reference inputs `registry` documents."""
    head, passes_spec, R = spec.meta_head, spec.passes, len(ids)
    starts, ends = regions.first_closed_start.tolist(), regions.first_closed_end.tolist()
    # 1. membership, before any pass
    reasons, row_pairs = _membership(passes_spec, ids, starts, ends, row_examples, tokenizer, meta_ids)
    member = torch.tensor([r is None for r in reasons], dtype=torch.bool)
    metrics = {f"reward/{head}/nonmember/{k}": sum(r == k for r in reasons) / max(R, 1) for k in NONMEMBER_REASONS}
    metrics["reward/skip_rate"] = sum(p.divergent is None for p in row_pairs) / max(R, 1)

    # 2. every pass of the step, registered once, run batched
    placebo = tokenizer(PLACEBO_BLOCK, add_special_tokens=False)["input_ids"]
    passes = TeacherForcedPasses()
    plans: dict[int, dict[str, object]] = {}
    for i in member.nonzero().flatten().tolist():
        c, e = ids[i], ends[i]
        for name, ctx in passes_spec.contexts:
            context = _context(ctx, batch.prompt_ids[i], c, starts[i], e, placebo)
            plans.setdefault(i, {})[name] = (_add_continuation(passes, context, c[e + 1:])
                                             if passes_spec.target == TARGET_CONTINUATION
                                             else _add_belief(passes, context, row_pairs[i]))
    names = [name for name, _ in passes_spec.contexts]
    weight, bias = lm_head(scorer)
    n = len(passes.reads)

    # 3. the LM-head work on the reads' hidden states -> [R, K] inputs (rows without a plan stay
    # masked out -> NaN in the head)
    with eval_mode(scorer):
        run = lambda reader: passes.run(scorer, tokenizer.pad_token_id, reader, max_batch_tokens, max_batch_size)  # noqa: E731
        if passes_spec.target == TARGET_CONTINUATION:
            inputs = continuation_inputs(names, run(TokenLogprobs(n, weight, bias, fused=fused)).out, plans, R)
        elif fused:
            inputs = answer_inputs_fused(names, run(HiddenStates(n)).hidden, plans, row_pairs, weight, bias)
        else:
            inputs = answer_inputs_reference(names, run(TokenLogprobs(n, weight, bias, fused=False)).out, plans, row_pairs)
    metrics["scorer/sequences"] = float(len(passes.seqs))
    metrics["scorer/tokens"] = float(passes.num_tokens)
    inputs["member"] = member
    return inputs, metrics


def _membership(passes: ScorerPasses, ids: list[list[int]], starts: list[int], ends: list[int], row_examples: list,
                tokenizer, meta_ids: tuple[int, int]) -> tuple[list[Optional[str]], list[AnswerPair]]:
    """Per rollout: the first failing membership rule (None for a member) and its answer pair."""
    # The rollout's own boxed answer, for a guard: searched in its outside-meta pieces, cut at tag
    # tokens exactly as the grader's (one grammar: a spelled-out `<|meta|>` is text here too).
    boxed = [extract_boxed_answer(p) for p in outside_meta_texts(ids, tokenizer, meta_ids)] if passes.guard else [None] * len(ids)
    pairs: dict[tuple[str, str], AnswerPair] = {}
    reasons: list[Optional[str]] = []
    row_pairs: list[AnswerPair] = []
    for i, ex in enumerate(row_examples):
        if ex.decoy is None:
            raise ValueError(f"score_meta_head: example {ex.id!r} has no decoy; decoys are built at load (SPEC section 3)")
        if (ex.gold, ex.decoy) not in pairs:
            pairs[(ex.gold, ex.decoy)] = answer_pair(tokenizer, ex.gold, ex.decoy)
        pair = pairs[(ex.gold, ex.decoy)]
        row_pairs.append(pair)
        s, e = starts[i], ends[i]
        closed = s >= 0
        reason = membership_reason(
            has_closed_block=closed,
            meta_text=tokenizer.decode(ids[i][s + 1:e], skip_special_tokens=False) if closed else "",
            continuation_text=tokenizer.decode(ids[i][e + 1:], skip_special_tokens=False) if closed else "",
            needs_continuation=passes.needs_continuation, guard=passes.guard, gold=ex.gold, boxed=boxed[i],
        )
        if reason is None and pair.divergent is None:
            reason = UNSCORABLE_PAIR
        reasons.append(reason)
    return reasons, row_pairs


def _context(kind: str, prompt: list[int], completion: list[int], start: int, end: int, placebo: list[int]) -> list[int]:
    """The token ids of scoring context `kind` (registry.CONTEXTS) of one rollout whose first
    closed meta block M spans completion[start:end + 1]."""
    if kind == CONTEXT_PREFIX:
        return prompt + completion[:start]
    if kind == CONTEXT_PREFIX_META:
        return prompt + completion[: end + 1]
    if kind == CONTEXT_PREFIX_PLACEBO:
        return prompt + completion[:start] + placebo
    raise ValueError(f"unknown scoring context {kind!r}")


def _add_continuation(passes: TeacherForcedPasses, ctx: list[int], cont: list[int]) -> list[int]:
    """Reads of every token of `cont` teacher-forced after `ctx`."""
    n = len(ctx)
    return passes.add(ctx + cont, [(n + j, t) for j, t in enumerate(cont)])


def _add_belief(passes: TeacherForcedPasses, ctx: list[int], pair: AnswerPair) -> tuple[list[int], list[int]]:
    """Reads of the gold and decoy log-probs at each divergent position after `ctx` (aligned with
    `pair.divergent`). The first divergent position is read from the gold pass for both answers
    (identical prefixes there: the fused path takes one dot product from that row, the reference
    path two log-probs); the decoy pass runs only for later divergent positions."""
    ks, n = pair.divergent, len(ctx)
    idx = passes.add(ctx + pair.gold, [(n + k, pair.gold[k]) for k in ks] + [(n + ks[0], pair.decoy[ks[0]])])
    gold_idx, decoy_idx = idx[: len(ks)], idx[len(ks):]
    decoy_idx += passes.add(ctx + pair.decoy, [(n + k, pair.decoy[k]) for k in ks[1:]])
    return gold_idx, decoy_idx


# ----------------------------------------------------------------------------- metrics

def value_metrics(head: str, values: Tensor) -> dict[str, float]:
    """Mean and (population) std of the head over its members, and its non-member share.
    An empty member set reports 0.0 so every rank logs the same finite keys; nan_frac = 1 says so."""
    ok = torch.isfinite(values)
    v = values[ok].double()
    return {
        "reward/meta_mean": mean_or_zero(v),
        "reward/meta_std": float(v.std(correction=0)) if v.numel() else 0.0,
        f"reward/{head}/nan_frac": float((~ok).double().mean()) if values.numel() else 0.0,
    }


__all__ = ["AnswerPair", "TeacherForcedPasses", "answer_pair", "answer_text", "score_meta_head", "value_metrics"]
