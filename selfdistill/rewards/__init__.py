"""Rewards of SPEC section 2: pure functions on tensors and plain values.

A scorer (selfdistill.rollout / engine side) runs the model passes a reward's registry entry asks
for and calls these; nothing here touches a model or a tokenizer. Each head returns float64 [R],
NaN for a non-member; `selfdistill.algo.advantages` turns heads into routed token advantages.
"""

from selfdistill.rewards.asym_cf import asym_cf_group_value, asym_cf_reward
from selfdistill.rewards.base import correctness_reward
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
from selfdistill.rewards.gm import gm_reward
from selfdistill.rewards.guards import (
    belief_membership_reason,
    contains_standalone,
    copies_continuation,
    pmi_guard_reason,
)
from selfdistill.rewards.pmi import PMI_AGGS, pmi_aggregate, pmi_reward
from selfdistill.rewards.pmi_shift import pmi_shift_reward
from selfdistill.rewards.regions import MetaRegions, meta_block_spans, meta_regions
from selfdistill.rewards.registry import (
    CORRECTNESS_HEAD,
    META_ROUTES,
    REWARDS,
    ROUTE_ANSWER_WITH_ARM,
    ROUTE_META,
    RewardSpec,
    get_reward,
)

__all__ = [
    "CORRECTNESS_HEAD", "META_ROUTES", "PMI_AGGS", "REWARDS", "ROUTE_ANSWER_WITH_ARM", "ROUTE_META",
    "MetaRegions", "RewardSpec",
    "apply_membership", "asym_cf_group_value", "asym_cf_reward", "belief", "belief_membership_reason",
    "cf_reward", "clip", "contains_standalone", "copies_continuation", "correctness_reward",
    "divergent_positions", "gate", "get_reward", "gm_reward", "masked_mean", "masked_min", "masked_sum",
    "meta_block_spans", "meta_regions", "nonfinite_to_nan", "pmi_aggregate", "pmi_guard_reason",
    "pmi_reward", "pmi_shift_reward",
]
