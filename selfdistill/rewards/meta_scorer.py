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
`TeacherForcedPasses`, which drops exact duplicates (identical rollouts are common), sorts by length
and runs them in as few right-padded forwards as a token budget allows. Only the hidden states
that predict a scored token go through the LM head (`ops.sequence_token_logprobs`), at
temperature 1.0, under `torch.no_grad()`, in eval mode. Belief passes use the first-divergent-
position shortcut of SPEC section 1: before the first divergent position gold and decoy agree, so
the gold pass's row there gives both log-probs (one softmax normaliser), and the decoy pass is run
only for answers with a second divergent position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.config import RewardConfig
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN
from selfdistill.rewards.base import correct_from_grades
from selfdistill.rewards.common import belief, divergent_positions, mean_or_zero
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
from selfdistill.rollout.base import PLACEBO_TEXT, RolloutBatch

SCORER_TEMPERATURE = 1.0  # SPEC section 1: the scorer is evaluated at temperature 1.0
PLACEBO_BLOCK = META_OPEN + PLACEBO_TEXT + META_CLOSE
MAX_BATCH_TOKENS = 32768  # padded tokens per scorer forward
MAX_BATCH_SIZE = 256  # sequences per scorer forward


def answer_text(answer: str) -> str:
    """The text an answer is scored as (SPEC section 1)."""
    return f"\\boxed{{{answer}}}"


class TeacherForcedPasses:
    """Teacher-forced sequences and the log-probs to read from them, run in few batched forwards.

    `add(seq, reads)` registers reads `(t, target)`: log p(target | seq[:t]), t >= 1. The target is
    usually seq[t]; the first-divergent-position shortcut also reads the decoy token from the gold
    sequence's row. `run` returns every read's log-prob in registration order.
    """

    def __init__(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}
        self.seqs: list[tuple[int, ...]] = []
        self.reads: list[tuple[int, int, int]] = []  # (sequence, t, target)

    def add(self, seq: Sequence[int], reads: Sequence[tuple[int, int]]) -> list[int]:
        if not reads:
            return []
        last = max(t for t, _ in reads)
        if min(t for t, _ in reads) < 1 or last > len(seq):
            raise ValueError(f"TeacherForcedPasses.add: read positions must lie in [1, {len(seq)}]; got {[t for t, _ in reads]}")
        key = tuple(seq[:last])  # the state predicting position `last` sees seq[:last] only
        s = self._index.setdefault(key, len(self.seqs))
        if s == len(self.seqs):
            self.seqs.append(key)
        start = len(self.reads)
        self.reads.extend((s, t, int(target)) for t, target in reads)
        return list(range(start, len(self.reads)))

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    def chunks(self, max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
        """Sequence indices grouped into forwards: longest first, padded size within the budget."""
        order = sorted(range(len(self.seqs)), key=lambda s: -len(self.seqs[s]))
        out: list[list[int]] = []
        for s in order:
            if out and len(out[-1]) < max_batch_size and (len(out[-1]) + 1) * len(self.seqs[out[-1][0]]) <= max_batch_tokens:
                out[-1].append(s)
            else:
                out.append([s])
        return out

    @torch.no_grad()
    def run(self, model, pad_id: int, max_batch_tokens: int = MAX_BATCH_TOKENS, max_batch_size: int = MAX_BATCH_SIZE) -> Tensor:
        """float64 [len(reads)] log-probs, on the CPU. `model`: a plain HF causal LM (`_check_scorer`)."""
        out = torch.full((len(self.reads),), float("nan"), dtype=torch.float64)
        if not self.reads:
            return out
        hf = _check_scorer(model)
        decoder, head = hf.get_decoder(), hf.get_output_embeddings()
        device = next(hf.parameters()).device
        reads_of: dict[int, list[int]] = {}
        for r, (s, _, _) in enumerate(self.reads):
            reads_of.setdefault(s, []).append(r)
        for chunk in self.chunks(max_batch_tokens, max_batch_size):
            L = len(self.seqs[chunk[0]])
            # Right padding: a causal model's real positions never attend to the pads after them,
            # and position ids 0..len-1 are those the sequence had during generation.
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), L), dtype=torch.long)
            rows, cols, targets, dest = [], [], [], []
            for b, s in enumerate(chunk):
                seq = self.seqs[s]
                ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attn[b, : len(seq)] = 1
                for r in reads_of[s]:
                    _, t, target = self.reads[r]
                    rows.append(b)
                    cols.append(t - 1)  # the state at t - 1 predicts token t
                    targets.append(target)
                    dest.append(r)
            pos = torch.arange(L).unsqueeze(0).expand(len(chunk), L)
            hidden = decoder(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device)).last_hidden_state
            h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            out[torch.tensor(dest)] = _head_logprobs(h, head, torch.tensor(targets, device=device)).double().cpu()
        return out


def _head_logprobs(h: Tensor, head, targets: Tensor) -> Tensor:
    """log p(target) of the LM head at the gathered rows, never [N, V] logits for other rows."""
    if getattr(head, "bias", None) is not None:  # rare biased heads: plain log_softmax of these rows
        return torch.log_softmax(head(h).float() / SCORER_TEMPERATURE, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp, _ = ops.sequence_token_logprobs(h, head.weight, targets, SCORER_TEMPERATURE)
    return lp


def _check_scorer(model):
    """The scorer is a plain HF causal LM: the trainer passes the gathered frozen reference or
    `engine.unwrapped()`, never an engine wrapper (whose `.module` this package does not open:
    engine handling belongs to the trainer side)."""
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"the scorer must be a plain HF causal LM (the gathered reference, or engine.unwrapped()); "
                        f"got {type(model).__name__}")
    return model


@contextlib.contextmanager
def _eval_mode(model):
    hf = _check_scorer(model)
    was_training = hf.training
    hf.eval()
    try:
        yield
    finally:
        hf.train(was_training)


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
                    max_batch_size: int = MAX_BATCH_SIZE) -> tuple[Tensor, str, dict[str, float]]:
    """(values float64 [R] with NaN for non-members, the head's routing region, metrics).

    grades: [R] 1 correct / 0 wrong / -1 grader timeout (= wrong). examples: one per group, indexed
    by `batch.group_ids`, each with `.gold` and `.decoy`. scorer: the frozen reference (or the
    policy when `reward.use_policy_as_scorer`) as a plain HF causal LM; unused (may be None) when
    the entry declares no passes (cf / asym_cf). Metrics include `meta_structure_metrics`.
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
    else:
        if scorer is None:
            raise ValueError(f"score_meta_head: reward {cfg.name!r} needs a scorer model; got None")
        scored, pass_metrics = _scored_inputs(spec, batch, ids, regions, _examples_per_row(batch, examples), scorer,
                                              tokenizer, meta_ids, max_batch_tokens, max_batch_size)
        inputs.update(scored)
        metrics.update(pass_metrics)
    values = call_with_inputs(spec.meta_fn, inputs)
    if spec.metrics_fn is not None:
        metrics.update(call_with_inputs(spec.metrics_fn, {**inputs, "values": values}))
    metrics.update(value_metrics(spec.meta_head, values))
    return values, spec.meta_route, metrics


def _scored_inputs(spec: RewardSpec, batch: RolloutBatch, ids: list[list[int]], regions: MetaRegions, row_examples: list,
                   scorer, tokenizer, meta_ids: tuple[int, int], max_batch_tokens: int,
                   max_batch_size: int) -> tuple[dict[str, object], dict[str, float]]:
    """Membership, then every pass the entry declares for every member, run batched, laid out as
    the inputs `registry` documents."""
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
    with _eval_mode(scorer):
        lp = passes.run(scorer, tokenizer.pad_token_id, max_batch_tokens, max_batch_size)
    metrics["scorer/sequences"] = float(len(passes.seqs))
    metrics["scorer/tokens"] = float(passes.num_tokens)

    # 3. [R, K] arrays (rows without a plan stay masked out -> NaN in the head)
    names = [name for name, _ in passes_spec.contexts]
    if passes_spec.target == TARGET_CONTINUATION:
        inputs = _continuation_inputs(names, lp, plans, R)
    else:
        inputs = _answer_inputs(names, lp, plans, row_pairs)
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


def _continuation_inputs(names: list[str], lp: Tensor, plans: dict[int, dict], R: int) -> dict[str, object]:
    """`logp_<name>` [R, K] per context (C's tokens, position by position) and `cont_mask`."""
    K = max([len(plan[names[0]]) for plan in plans.values()] or [0])
    logp = {name: torch.zeros(R, K, dtype=torch.float64) for name in names}
    mask = torch.zeros(R, K, dtype=torch.bool)
    for i, plan in plans.items():
        for name, idx in plan.items():
            logp[name][i, : len(idx)] = lp[idx]
        mask[i, : len(plan[names[0]])] = True
    return {**{f"logp_{name}": x for name, x in logp.items()}, "cont_mask": mask}


def _answer_inputs(names: list[str], lp: Tensor, plans: dict[int, dict], row_pairs: list[AnswerPair]) -> dict[str, object]:
    """`gold_logp_<name>`, `decoy_logp_<name>` [R, K] at the divergent positions, `belief_<name>`
    [R] per context, and `divergent_mask` [R, K]."""
    R = len(row_pairs)
    K = max([len(p.gold) for p in row_pairs] or [0])
    g = {name: torch.zeros(R, K, dtype=torch.float64) for name in names}
    d = {name: torch.zeros(R, K, dtype=torch.float64) for name in names}
    div = torch.zeros(R, K, dtype=torch.bool)
    for i, plan in plans.items():
        ks = row_pairs[i].divergent
        div[i, ks] = True
        for name in names:
            g[name][i, ks], d[name][i, ks] = lp[plan[name][0]], lp[plan[name][1]]
    inputs: dict[str, object] = {"divergent_mask": div}
    for name in names:
        inputs[f"gold_logp_{name}"], inputs[f"decoy_logp_{name}"] = g[name], d[name]
        inputs[f"belief_{name}"] = belief(g[name], d[name], div)
    return inputs


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
    (identical prefixes there); the decoy pass runs only for later divergent positions."""
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
