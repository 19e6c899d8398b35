"""The meta head of one rollout batch: scoring contexts, batched scorer passes, reward, metrics.

This is where the pure reward functions of this package meet the scorer model (SPEC sections 1-2).

Contexts (SPEC section 1). Every context is the chat-templated prompt exactly as the policy saw it
followed by the completion's own sampled token ids; nothing is re-tokenized. Spliced pieces (the
placebo block, the answer strings `\\boxed{gold}` / `\\boxed{decoy}`) are tokenized on their own
and concatenated at token level. EOS and padding are cut off first, so they are never part of a
context or of a scored span. With P = completion before the first closed meta block M and C = the
completion after it:

    pmi        C scored after  prompt+P+M  |  prompt+P  |  prompt+P+placebo
    gm         gold, decoy after  prompt+P+M  |  prompt+P+placebo          (X = prompt+P)
    pmi_shift  gold, decoy after  prompt+P (open)  |  prompt+P+M (close)
    cf, asym_cf  correctness only: no scorer pass

Membership (SPEC section 2) is settled before any pass, so non-members cost nothing: no closed
block, blank M, blank C (pmi, gm), PMI's guards (`guards.belief_membership_reason`), and a gold /
decoy pair that is not scorable (different token lengths or no divergent position, counted in
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
from fractions import Fraction
from typing import Optional, Sequence

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.algo.logprobs import unwrap
from selfdistill.config import RewardConfig
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN
from selfdistill.rewards.asym_cf import DROP_THRESHOLD, SOLVED_THRESHOLD, asym_cf_reward
from selfdistill.rewards.cf import cf_reward
from selfdistill.rewards.common import arm_counts, belief, divergent_positions
from selfdistill.rewards.gm import gm_reward
from selfdistill.rewards.grader import extract_boxed_answer
from selfdistill.rewards.guards import belief_membership_reason
from selfdistill.rewards.pmi import pmi_reward
from selfdistill.rewards.pmi_shift import DEFAULT_EPS, pmi_shift_reward
from selfdistill.rewards.regions import MetaRegions, meta_regions
from selfdistill.rewards.registry import RewardSpec, get_reward
from selfdistill.rollout.base import PLACEBO_TEXT, RolloutBatch

SCORER_TEMPERATURE = 1.0  # SPEC section 1: the scorer is evaluated at temperature 1.0
PLACEBO_BLOCK = META_OPEN + PLACEBO_TEXT + META_CLOSE
MAX_BATCH_TOKENS = 32768  # padded tokens per scorer forward
MAX_BATCH_SIZE = 256  # sequences per scorer forward
# Non-member reasons, in the order the rules are applied (the first failing one is counted).
NONMEMBER_REASONS = ("no_closed_block", "blank_meta", "blank_continuation", "gold_in_meta", "boxed_in_meta",
                     "copied_continuation", "unscorable_pair")


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
        """float64 [len(reads)] log-probs, on the CPU."""
        out = torch.full((len(self.reads),), float("nan"), dtype=torch.float64)
        if not self.reads:
            return out
        hf = unwrap(model)
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


@contextlib.contextmanager
def _eval_mode(model):
    hf = unwrap(model)
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


def content_ids(batch: RolloutBatch, eos_id: Optional[int]) -> list[list[int]]:
    """Each completion's sampled (and forced) ids without padding and without a final EOS."""
    out = []
    for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist()):
        ids = row[: int(n)]
        if ids and eos_id is not None and ids[-1] == eos_id:
            ids = ids[:-1]
        out.append(ids)
    return out


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
    policy when `reward.use_policy_as_scorer`); unused by cf / asym_cf.
    """
    spec = get_reward(cfg.name)
    if spec.meta_head is None:
        raise ValueError(f"score_meta_head: reward {cfg.name!r} has no meta head; the scorer is for meta arms only")
    R = len(batch)
    grades = torch.as_tensor(grades)
    if tuple(grades.shape) != (R,):
        raise ValueError(f"score_meta_head: grades has shape {tuple(grades.shape)}, expected ({R},)")
    correct = grades.cpu() == 1
    ids = content_ids(batch, tokenizer.eos_token_id)
    regions = meta_regions(batch.completion_ids.cpu(), torch.tensor([len(x) for x in ids]), *meta_ids)
    metrics = meta_structure_metrics(regions, batch.with_arm.cpu())
    if spec.needs_split_arms:
        values, head_metrics = _counterfactual_head(spec, correct, batch, regions)
        head_metrics["reward/skip_rate"] = 0.0
    else:
        if scorer is None:
            raise ValueError(f"score_meta_head: reward {cfg.name!r} needs a scorer model; got None")
        values, head_metrics = _belief_head(spec, cfg, correct, batch, ids, regions, _examples_per_row(batch, examples),
                                            scorer, tokenizer, max_batch_tokens, max_batch_size)
    metrics.update(head_metrics)
    metrics.update(value_metrics(spec.meta_head, values))
    return values, spec.meta_route, metrics


def _belief_head(spec: RewardSpec, cfg: RewardConfig, correct: Tensor, batch: RolloutBatch, ids: list[list[int]],
                 regions: MetaRegions, row_examples: list, scorer, tokenizer, max_batch_tokens: int,
                 max_batch_size: int) -> tuple[Tensor, dict[str, float]]:
    head, R = spec.meta_head, len(ids)
    starts, ends = regions.first_closed_start.tolist(), regions.first_closed_end.tolist()
    # 1. membership, before any pass
    reasons, row_pairs = _membership(head, batch, ids, starts, ends, row_examples, tokenizer)
    member = torch.tensor([r is None for r in reasons], dtype=torch.bool)
    metrics = {f"reward/{head}/nonmember/{k}": sum(r == k for r in reasons) / max(R, 1) for k in NONMEMBER_REASONS}
    metrics["reward/skip_rate"] = sum(p.divergent is None for p in row_pairs) / max(R, 1)

    # 2. every pass of the step, registered once, run batched
    placebo = tokenizer(PLACEBO_BLOCK, add_special_tokens=False)["input_ids"]
    passes = TeacherForcedPasses()
    plans: dict[int, dict] = {}
    for i in member.nonzero().flatten().tolist():
        p, c, s, e, pair = batch.prompt_ids[i], ids[i], starts[i], ends[i], row_pairs[i]
        if head == "pmi":
            plans[i] = {arm: _add_continuation(passes, ctx, c[e + 1:]) for arm, ctx in (
                ("real", p + c[: e + 1]), ("without", p + c[:s]), ("placebo", p + c[:s] + placebo))}
        elif head == "gm":
            plans[i] = {"meta": _add_belief(passes, p + c[: e + 1], pair), "placebo": _add_belief(passes, p + c[:s] + placebo, pair)}
        else:  # pmi_shift
            plans[i] = {"open": _add_belief(passes, p + c[:s], pair), "close": _add_belief(passes, p + c[: e + 1], pair)}
    with _eval_mode(scorer):
        lp = passes.run(scorer, tokenizer.pad_token_id, max_batch_tokens, max_batch_size)
    metrics["scorer/sequences"] = float(len(passes.seqs))
    metrics["scorer/tokens"] = float(passes.num_tokens)

    # 3. the reward function on [R, K] arrays (rows without a plan stay masked out -> NaN)
    if head == "pmi":
        values, head_metrics = _pmi_values(cfg, lp, plans, R, correct, member)
    else:
        values, head_metrics = _belief_values(head, lp, plans, row_pairs, correct, member)
    return values, {**metrics, **head_metrics}


def _membership(head: str, batch: RolloutBatch, ids: list[list[int]], starts: list[int], ends: list[int],
                row_examples: list, tokenizer) -> tuple[list[Optional[str]], list[AnswerPair]]:
    """Per rollout: the first failing membership rule (None for a member) and its answer pair."""
    R = len(ids)
    texts = batch.texts if len(batch.texts) == R else [tokenizer.decode(x, skip_special_tokens=False) for x in ids]
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
        reason = belief_membership_reason(
            head, has_closed_block=closed,
            meta_text=tokenizer.decode(ids[i][s + 1:e], skip_special_tokens=False) if closed else "",
            continuation_text=tokenizer.decode(ids[i][e + 1:], skip_special_tokens=False) if closed else "",
            gold=ex.gold, boxed=extract_boxed_answer(texts[i]) if head == "pmi" else None,
        )
        if reason is None and pair.divergent is None:
            reason = "unscorable_pair"
        reasons.append(reason)
    return reasons, row_pairs


def _pmi_values(cfg: RewardConfig, lp: Tensor, plans: dict[int, dict], R: int, correct: Tensor,
                member: Tensor) -> tuple[Tensor, dict[str, float]]:
    K = max([len(plan["real"]) for plan in plans.values()] or [0])
    arrs = {arm: torch.zeros(R, K, dtype=torch.float64) for arm in ("real", "without", "placebo")}
    mask = torch.zeros(R, K, dtype=torch.bool)
    for i, plan in plans.items():
        for arm, idx in plan.items():
            arrs[arm][i, : len(idx)] = lp[idx]
        mask[i, : len(plan["real"])] = True
    values = pmi_reward(arrs["real"], arrs["without"], arrs["placebo"], mask, correct, cfg.agg, member=member)
    ok = torch.isfinite(values)
    return values, {
        "pmi/d_real_mean": _mean(_masked_row_mean(arrs["real"] - arrs["without"], mask)[ok]),
        "pmi/d_placebo_mean": _mean(_masked_row_mean(arrs["placebo"] - arrs["without"], mask)[ok]),
        "pmi/continuation_len": _mean(mask.sum(1)[ok].double()),
    }


def _belief_values(head: str, lp: Tensor, plans: dict[int, dict], row_pairs: list[AnswerPair], correct: Tensor,
                   member: Tensor) -> tuple[Tensor, dict[str, float]]:
    R = len(row_pairs)
    arms = ("meta", "placebo") if head == "gm" else ("open", "close")
    K = max([len(p.gold) for p in row_pairs] or [0])
    g = {a: torch.zeros(R, K, dtype=torch.float64) for a in arms}
    d = {a: torch.zeros(R, K, dtype=torch.float64) for a in arms}
    div = torch.zeros(R, K, dtype=torch.bool)
    for i, plan in plans.items():
        ks = row_pairs[i].divergent
        div[i, ks] = True
        for a in arms:
            g[a][i, ks], d[a][i, ks] = lp[plan[a][0]], lp[plan[a][1]]
    b = {a: belief(g[a], d[a], div) for a in arms}
    if head == "gm":
        values = gm_reward(g["meta"], g["placebo"], d["meta"], d["placebo"], div, correct, member=member)
    else:
        values = pmi_shift_reward(b["open"], b["close"], member=member)
    ok = torch.isfinite(values)
    # belief without vs with the block: gm compares X + placebo with X + M, pmi_shift open with close
    before, after = (b["placebo"], b["meta"]) if head == "gm" else (b["open"], b["close"])
    metrics = {f"belief/{a}_mean": _mean(b[a][ok]) for a in arms}
    metrics["belief/shift_mean"] = _mean((after - before)[ok])
    metrics["belief/flips_decoy_to_gold"] = float(((before < -DEFAULT_EPS) & (after > DEFAULT_EPS) & ok).sum())
    metrics["belief/flips_gold_to_decoy"] = float(((before > DEFAULT_EPS) & (after < -DEFAULT_EPS) & ok).sum())
    return values, metrics


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


# ----------------------------------------------------------------------------- cf / asym_cf

def _counterfactual_head(spec: RewardSpec, correct: Tensor, batch: RolloutBatch,
                         regions: MetaRegions) -> tuple[Tensor, dict[str, float]]:
    """cf / asym_cf from correctness (1 / 0), the arm split and emission: no scorer pass."""
    with_arm, gids = batch.with_arm.cpu(), batch.group_ids.cpu()
    if spec.name == "cf":
        values = cf_reward(correct, with_arm, gids, regions.emitted)
    else:
        values = asym_cf_reward(correct, with_arm, gids)
    cnt = arm_counts(correct, with_arm, gids, f"score_meta_head[{spec.name}]")
    groups = list(zip(cnt["k_without"].tolist(), cnt["n_without"].tolist(), cnt["k_with"].tolist(), cnt["n_with"].tolist()))
    both = [(k0, n0, k1, n1) for k0, n0, k1, n1 in groups if n0 > 0 and n1 > 0]
    n_with, n_without = int(cnt["n_with"].sum()), int(cnt["n_without"].sum())
    p = spec.name
    m = {
        f"{p}/acc_with": int(cnt["k_with"].sum()) / n_with if n_with else 0.0,
        f"{p}/acc_without": int(cnt["k_without"].sum()) / n_without if n_without else 0.0,
        f"{p}/groups_missing_arm": float(len(groups) - len(both)),
    }
    if p == "cf":
        m["cf/groups_meta_hurt"] = float(sum(k1 * n0 < k0 * n1 for k0, n0, k1, n1 in both))
        m["cf/groups_meta_helped"] = float(sum(k1 * n0 > k0 * n1 for k0, n0, k1, n1 in both))
        m["cf/groups_solved_without"] = float(sum(k0 == n0 for k0, n0, _, _ in both))
        return values, m
    # asym_cf cases, exclusive and exact (the thresholds of asym_cf.py): both_solved, then gain,
    # loss (drop > 0.1), tie (everything that earns 0: equal accuracy or a drop of at most 0.1).
    cases = {"case_both_solved": 0, "case_gain": 0, "case_loss": 0, "case_tie": 0}
    for k0, n0, k1, n1 in both:
        c0, c1 = Fraction(k0, n0), Fraction(k1, n1)
        if c0 >= SOLVED_THRESHOLD and c1 >= SOLVED_THRESHOLD:
            cases["case_both_solved"] += 1
        elif c1 > c0:
            cases["case_gain"] += 1
        elif c0 - c1 > DROP_THRESHOLD:
            cases["case_loss"] += 1
        else:
            cases["case_tie"] += 1
    m.update({f"asym_cf/{k}": float(v) for k, v in cases.items()})
    return values, m


# ----------------------------------------------------------------------------- metrics

def meta_structure_metrics(regions: MetaRegions, with_arm: Tensor) -> dict[str, float]:
    """Emission rate, blocks per rollout and meta tokens (tags included) per emitting rollout, over
    the with-arm rollouts: the without arm's forced placebo block is not the policy's meta."""
    arm = with_arm.bool()
    emitted = regions.emitted[arm]
    return {
        "meta/emission_rate": _mean(emitted.double()),
        "meta/blocks_per_rollout": _mean(regions.block_count[arm].double()),
        "meta/mean_len": _mean(regions.meta.sum(1)[arm][emitted].double()),
    }


def value_metrics(head: str, values: Tensor) -> dict[str, float]:
    """Mean and (population) std of the head over its members, and its non-member share.
    An empty member set reports 0.0 so every rank logs the same finite keys; nan_frac = 1 says so."""
    ok = torch.isfinite(values)
    v = values[ok].double()
    return {
        "reward/meta_mean": _mean(v),
        "reward/meta_std": float(v.std(correction=0)) if v.numel() else 0.0,
        f"reward/{head}/nan_frac": float((~ok).double().mean()) if values.numel() else 0.0,
    }


def _mean(x: Tensor) -> float:
    """Mean as a float; 0.0 for an empty set (see `value_metrics`)."""
    return float(x.double().mean()) if x.numel() else 0.0


def _masked_row_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum(1) / mask.sum(1).clamp(min=1)


__all__ = ["AnswerPair", "TeacherForcedPasses", "answer_pair", "answer_text", "content_ids", "meta_structure_metrics",
           "score_meta_head", "value_metrics"]
