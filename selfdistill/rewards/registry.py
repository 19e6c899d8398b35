"""Reward registry (SPEC section 2): one entry per config name (`reward.name`); the entry drives scoring.

Every arm has the correctness head (`base.correctness_reward`, +1 / -1); a meta arm adds one meta
head, and its entry says everything the scorer (`meta_scorer.score_meta_head`) needs to compute
it, so the scorer knows no arm by name and a new arm is an entry plus its pure function:

- meta_fn: the head's pure function, the float64 formula of SPEC section 2, called with the inputs
  its parameter names ask for (below). A parameter with a default that no input supplies keeps its
  default (pmi_shift's scale and eps, asym_cf's alpha, beta, gamma); a required one that no input
  supplies fails when the entry is made.
- fused_fn: optional, the same head through the fused ops (`selfdistill.ops`, every backend): what
  the scorer runs when the entry has one, on the fused inputs below. Its reductions accumulate and
  decide in float64, so it equals meta_fn on the same per-position values up to the order of
  float64 additions (every threshold decided alike; tests/test_rewards_fused.py). An entry without
  one is scored through meta_fn on the reference inputs (a vocabulary pass per read).
- meta_head: the head's name in the heads dict and in metrics (`reward/<head>/...`).
- meta_route: where its advantage goes (SPEC section 4): ROUTE_META or ROUTE_ANSWER_WITH_ARM.
- passes (`ScorerPasses`): the frozen scorer's teacher-forced passes and the membership rules of
  a head scored from the first closed meta block M; None for a head computed from correctness and
  the arm split alone (no scorer model, no membership rule: the function returns NaN itself).
- metrics_fn: optional head-specific metrics, its inputs bound the same way plus `values` (the
  head's values); returns {metric name: float}.

Inputs by name (R rollouts):
    correct, correct01   bool [R]: graded correct (grade 1; wrong, no answer, timeout -> False)
    with_arm             bool [R]: generated with meta allowed (the cf / asym_cf split)
    group_ids            long [R]: the rollout's prompt
    emitted_meta         bool [R]: the rollout holds a meta block (`MetaRegions.emitted`)
    agg                  str: `reward.agg`
  with passes (reference inputs, for meta_fn):
    member               bool [R]: the membership rules of SPEC section 2 hold
    target "continuation", per context name n:
      logp_<n>           float64 [R, K]: log p of C's tokens teacher-forced after context n
      cont_mask          bool [R, K]: C's tokens (rows of non-members all False)
    target "answers", per context name n:
      gold_logp_<n>, decoy_logp_<n>  float64 [R, K]: log p of the `\\boxed{gold}` / `\\boxed{decoy}`
                         tokens after context n (read at divergent positions only)
      belief_<n>         float64 [R]: B(context n) of SPEC section 1
      divergent_mask     bool [R, K]
  with passes (fused inputs, for fused_fn; on the scorer's device):
    member, cont_mask, divergent_mask  as above
    target "continuation": logp_<n> fp32 [R, K], the fused-linear token log-probs
    target "answers": contrast_<n> fp32 [R, K] (log p(gold) - log p(decoy) per divergent position,
                         0 elsewhere; the first one a dot product with W[gold] - W[decoy]) and
                         belief_<n> float64 [R] (`ops.dispatched_gold_decoy_contrast`)
  metrics_fn is called with whichever set the scorer computed, so it may ask only for the names
  both sets share (belief_<n>, logp_<n>, the masks, member) besides the base inputs and `values`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from selfdistill.rewards.asym_cf import asym_cf_metrics, asym_cf_reward
from selfdistill.rewards.cf import cf_metrics, cf_reward
from selfdistill.rewards.gm import gm_fused, gm_metrics, gm_reward
from selfdistill.rewards.guards import Guard, membership_reason, pmi_guard_reason
from selfdistill.rewards.pmi import pmi_fused, pmi_metrics, pmi_reward
from selfdistill.rewards.pmi_shift import pmi_shift_fused, pmi_shift_metrics, pmi_shift_reward

CORRECTNESS_HEAD = "correctness"
ROUTE_META = "meta"  # the advantage goes to the meta tokens
ROUTE_ANSWER_WITH_ARM = "answer_with_arm"  # to the answer tokens of with-arm rollouts
META_ROUTES = (ROUTE_META, ROUTE_ANSWER_WITH_ARM)

# Scoring contexts (SPEC section 1): the chat-templated prompt, then the completion's own token ids
# up to the first closed meta block M (P), optionally followed by M or by the placebo block.
CONTEXT_PREFIX = "prefix"  # prompt + P
CONTEXT_PREFIX_META = "prefix_meta"  # prompt + P + M (through its <|/meta|>)
CONTEXT_PREFIX_PLACEBO = "prefix_placebo"  # prompt + P + the placebo block (tokenized on its own)
CONTEXTS = (CONTEXT_PREFIX, CONTEXT_PREFIX_META, CONTEXT_PREFIX_PLACEBO)
# What is scored after each context: the continuation C, or the gold and decoy answer strings.
TARGET_CONTINUATION = "continuation"
TARGET_ANSWERS = "answers"
TARGETS = (TARGET_CONTINUATION, TARGET_ANSWERS)

BASE_INPUTS = frozenset({"correct", "correct01", "with_arm", "group_ids", "emitted_meta", "agg"})


@dataclass(frozen=True)
class ScorerPasses:
    """The scorer work of a head scored from the first closed meta block M (SPEC sections 1-2).

    target: TARGET_CONTINUATION (C scored after each context) or TARGET_ANSWERS (gold and decoy
    scored after each context). contexts: (input name, context) pairs, in the order the passes are
    registered; the names become the `logp_<name>` / `gold_logp_<name>` / ... inputs.
    needs_continuation: a C of only whitespace makes a non-member. guard: an extra text rule
    (`guards.Guard`), e.g. PMI's anti-gaming guard. The other membership rules (a closed block,
    a non-blank M, a scorable gold/decoy pair) hold for every such head.
    """

    target: str
    contexts: tuple[tuple[str, str], ...]
    needs_continuation: bool = False
    guard: Optional[Guard] = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"ScorerPasses: target {self.target!r} is not one of {', '.join(TARGETS)}")
        names = [name for name, _ in self.contexts]
        if not names or len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
            raise ValueError(f"ScorerPasses: context names {names} must be distinct identifiers, at least one")
        bad = [ctx for _, ctx in self.contexts if ctx not in CONTEXTS]
        if bad:
            raise ValueError(f"ScorerPasses: contexts {bad} are not valid; choose from {', '.join(CONTEXTS)}")

    @property
    def inputs(self) -> frozenset[str]:
        """The reference input names these passes supply (for meta_fn)."""
        names = [name for name, _ in self.contexts]
        if self.target == TARGET_CONTINUATION:
            return frozenset({"member", "cont_mask", *(f"logp_{n}" for n in names)})
        return frozenset({"member", "divergent_mask",
                          *(f"{kind}_{n}" for n in names for kind in ("gold_logp", "decoy_logp", "belief"))})

    @property
    def fused_inputs(self) -> frozenset[str]:
        """The fused input names these passes supply (for fused_fn)."""
        names = [name for name, _ in self.contexts]
        if self.target == TARGET_CONTINUATION:
            return self.inputs
        return frozenset({"member", "divergent_mask", *(f"{kind}_{n}" for n in names for kind in ("contrast", "belief"))})


@dataclass(frozen=True)
class RewardSpec:
    name: str
    meta_fn: Optional[Callable[..., object]]  # None for base
    meta_head: Optional[str]  # the meta head's name in metrics (reward/<head>/...); None for base
    meta_route: Optional[str]  # one of META_ROUTES; None for base
    passes: Optional[ScorerPasses] = None  # None: no scorer pass (base, cf, asym_cf)
    metrics_fn: Optional[Callable[..., dict]] = None
    fused_fn: Optional[Callable[..., object]] = None  # the head through selfdistill.ops (module docstring)

    @property
    def heads(self) -> tuple[str, ...]:
        """Head names in order: correctness always, then the meta head if any."""
        return (CORRECTNESS_HEAD,) if self.meta_head is None else (CORRECTNESS_HEAD, self.meta_head)

    @property
    def needs_scorer(self) -> bool:
        """The arm runs scorer passes (so it needs a scorer model: the frozen reference, or the
        policy with `reward.use_policy_as_scorer`)."""
        return self.passes is not None

    @property
    def needs_split_arms(self) -> bool:
        """The head compares a group's with-meta and without-meta rollouts (its function reads
        `with_arm`), so the group must be generated split (`rollout.split_arms`, SPEC section 2)."""
        return self.meta_fn is not None and "with_arm" in inspect.signature(self.meta_fn).parameters

    @property
    def inputs(self) -> frozenset[str]:
        """The reference input names the scorer supplies to meta_fn."""
        return BASE_INPUTS | (self.passes.inputs if self.passes is not None else frozenset())

    @property
    def metric_inputs(self) -> frozenset[str]:
        """The input names metrics_fn may ask for: those of every path the scorer may run."""
        if self.fused_fn is None or self.passes is None:
            return self.inputs
        return BASE_INPUTS | (self.passes.inputs & self.passes.fused_inputs)

    def __post_init__(self) -> None:
        if (self.meta_fn is None) != (self.meta_head is None) or (self.meta_head is None) != (self.meta_route is None):
            raise ValueError(f"RewardSpec {self.name!r}: meta_fn, meta_head and meta_route are set together or not at all")
        if self.meta_route is not None and self.meta_route not in META_ROUTES:
            raise ValueError(f"RewardSpec {self.name!r}: meta_route {self.meta_route!r} is not one of {', '.join(META_ROUTES)}")
        if self.meta_head == CORRECTNESS_HEAD:
            raise ValueError(f"RewardSpec {self.name!r}: meta_head may not be {CORRECTNESS_HEAD!r} (every arm has that head)")
        if self.meta_fn is None and (self.passes is not None or self.metrics_fn is not None):
            raise ValueError(f"RewardSpec {self.name!r}: passes and metrics_fn need a meta head (meta_fn)")
        if self.fused_fn is not None and self.passes is None:
            raise ValueError(f"RewardSpec {self.name!r}: fused_fn runs on scorer passes; the entry declares none")
        if self.meta_fn is not None:
            _check_binding(self.meta_fn, self.inputs, f"RewardSpec {self.name!r}: meta_fn")
        if self.fused_fn is not None:
            _check_binding(self.fused_fn, BASE_INPUTS | self.passes.fused_inputs, f"RewardSpec {self.name!r}: fused_fn")
        if self.metrics_fn is not None:
            _check_binding(self.metrics_fn, self.metric_inputs | {"values"}, f"RewardSpec {self.name!r}: metrics_fn")


def _check_binding(fn: Callable, available: frozenset[str], where: str) -> None:
    """Every required parameter of `fn` is an available input, and all can be passed by name."""
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"{where} {getattr(fn, '__name__', fn)!r}: parameter {name!r} cannot be bound by name")
        if p.default is p.empty and name not in available:
            raise ValueError(f"{where} {getattr(fn, '__name__', fn)!r} needs input {name!r}, which this entry does not "
                             f"supply; it supplies: {', '.join(sorted(available))}")


def call_with_inputs(fn: Callable, inputs: Mapping[str, object]):
    """`fn` called with the inputs its parameters name (the others keep their defaults)."""
    params = inspect.signature(fn).parameters
    return fn(**{name: inputs[name] for name in params if name in inputs})


REWARDS: dict[str, RewardSpec] = {
    "base": RewardSpec("base", None, None, None),
    "pmi": RewardSpec(
        "pmi", pmi_reward, "pmi", ROUTE_META,
        passes=ScorerPasses(
            TARGET_CONTINUATION,
            (("real", CONTEXT_PREFIX_META), ("without", CONTEXT_PREFIX), ("placebo", CONTEXT_PREFIX_PLACEBO)),
            needs_continuation=True, guard=pmi_guard_reason,
        ),
        metrics_fn=pmi_metrics, fused_fn=pmi_fused,
    ),
    "cf": RewardSpec("cf", cf_reward, "cf", ROUTE_ANSWER_WITH_ARM, metrics_fn=cf_metrics),
    "gm": RewardSpec(
        "gm", gm_reward, "gm", ROUTE_META,
        passes=ScorerPasses(TARGET_ANSWERS, (("meta", CONTEXT_PREFIX_META), ("placebo", CONTEXT_PREFIX_PLACEBO)),
                            needs_continuation=True),
        metrics_fn=gm_metrics, fused_fn=gm_fused,
    ),
    "asym_cf": RewardSpec("asym_cf", asym_cf_reward, "asym_cf", ROUTE_ANSWER_WITH_ARM, metrics_fn=asym_cf_metrics),
    "pmi_shift": RewardSpec(
        "pmi_shift", pmi_shift_reward, "pmi_shift", ROUTE_META,
        passes=ScorerPasses(TARGET_ANSWERS, (("open", CONTEXT_PREFIX), ("close", CONTEXT_PREFIX_META))),
        metrics_fn=pmi_shift_metrics, fused_fn=pmi_shift_fused,
    ),
}


def get_reward(name: str) -> RewardSpec:
    """The registry entry for config name `name`; ValueError naming the valid ones otherwise."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown reward {name!r} (config reward.name); valid rewards: {', '.join(REWARDS)}"
        ) from None


def belief_membership_reason(
    head: str,
    *,
    has_closed_block: bool,
    meta_text: str,
    continuation_text: str,
    gold: Optional[str] = None,
    boxed: Optional[str] = None,
) -> Optional[str]:
    """`guards.membership_reason` with the rules of registered head `head` (one with scorer passes:
    pmi, gm, pmi_shift), or None if the rollout is a member. See `membership_reason`."""
    scored = {spec.meta_head: spec.passes for spec in REWARDS.values() if spec.passes is not None}
    if head not in scored:
        raise ValueError(f"belief_membership_reason: head {head!r} is not scored from a meta block; choose one of "
                         f"{', '.join(scored)}")
    passes = scored[head]
    return membership_reason(has_closed_block=has_closed_block, meta_text=meta_text, continuation_text=continuation_text,
                             needs_continuation=passes.needs_continuation, guard=passes.guard, gold=gold, boxed=boxed)
