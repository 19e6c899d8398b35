"""Rewards of SPEC section 2: pure functions on tensors and plain values, a registry whose entries
drive the scorer, and the one meta grammar (`regions`, on token ids).

The scorer (`meta_scorer`) runs the model passes a reward's registry entry declares and calls
these; the reward functions touch no model or tokenizer. Each head returns float64 [R], NaN for a
non-member; `selfdistill.algo.advantages` turns heads into routed token advantages. Dependency
direction: `selfdistill.algo` imports from here, never the reverse.
"""

from selfdistill.rewards.asym_cf import asym_cf_group_value, asym_cf_reward
from selfdistill.rewards.base import correct_from_grades, correctness_reward
from selfdistill.rewards.cf import cf_reward
from selfdistill.rewards.common import (
    apply_membership,
    belief,
    clip,
    divergent_positions,
    gate,
    masked_mean,
    masked_min,
    masked_sum,
    nonfinite_to_nan,
)
from selfdistill.rewards.gm import gm_fused, gm_reward
from selfdistill.rewards.guards import contains_standalone, copies_continuation, membership_reason, pmi_guard_reason
from selfdistill.rewards.pmi import PMI_AGGS, pmi_aggregate, pmi_fused, pmi_reward
from selfdistill.rewards.pmi_shift import pmi_shift_fused, pmi_shift_reward
from selfdistill.rewards.regions import (
    MetaRegions,
    content_ids,
    content_regions,
    meta_block_spans,
    meta_emitted,
    meta_regions,
    meta_structure_metrics,
    outside_meta_texts,
    rollout_outside_meta_texts,
)
from selfdistill.rewards.registry import (
    CONTEXT_PREFIX,
    CONTEXT_PREFIX_META,
    CONTEXT_PREFIX_PLACEBO,
    CORRECTNESS_HEAD,
    META_ROUTES,
    REWARDS,
    ROUTE_ANSWER_WITH_ARM,
    ROUTE_META,
    TARGET_ANSWERS,
    TARGET_CONTINUATION,
    RewardSpec,
    ScorerPasses,
    belief_membership_reason,
    get_reward,
)

__all__ = [
    "CONTEXT_PREFIX", "CONTEXT_PREFIX_META", "CONTEXT_PREFIX_PLACEBO", "CORRECTNESS_HEAD", "META_ROUTES", "PMI_AGGS",
    "REWARDS", "ROUTE_ANSWER_WITH_ARM", "ROUTE_META", "TARGET_ANSWERS", "TARGET_CONTINUATION",
    "MetaRegions", "RewardSpec", "ScorerPasses",
    "apply_membership", "asym_cf_group_value", "asym_cf_reward", "belief", "belief_membership_reason",
    "cf_reward", "clip", "contains_standalone", "content_ids", "content_regions", "copies_continuation",
    "correct_from_grades", "correctness_reward", "divergent_positions", "gate", "get_reward", "gm_fused", "gm_reward",
    "masked_mean", "masked_min", "masked_sum", "membership_reason", "meta_block_spans", "meta_emitted", "meta_regions",
    "meta_structure_metrics", "nonfinite_to_nan", "outside_meta_texts", "pmi_aggregate", "pmi_fused", "pmi_guard_reason",
    "pmi_reward", "pmi_shift_fused", "pmi_shift_reward", "rollout_outside_meta_texts",
]
