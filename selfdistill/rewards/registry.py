"""Reward registry (SPEC section 2): one entry per config name (`reward.name`).

Every arm has the correctness head; a meta arm adds one meta head. An entry says which function
computes the meta head, where its advantage goes (SPEC section 4) and which scorer passes it needs,
so the scorer runs exactly those passes and nothing else:

- needs_pmi_passes: continuation C scored after P+M, P, P+placebo (`pmi_reward`).
- needs_gm_passes: gold and decoy scored after X+M and X+placebo (`gm_reward`).
- needs_belief_open_close: gold and decoy scored after the open and close contexts (`belief` twice,
  then `pmi_shift_reward`).
- needs_split_arms: the group is generated as n/2 with meta, n/2 without (`rollout.split_arms`).
- needs_text_membership: the scorer decodes M and C and applies
  `guards.belief_membership_reason(meta_head, ...)` (needs gold and the boxed answer for pmi).
- uses_agg: the function takes `agg=cfg.reward.agg`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from selfdistill.rewards.asym_cf import asym_cf_reward
from selfdistill.rewards.base import correctness_reward
from selfdistill.rewards.cf import cf_reward
from selfdistill.rewards.gm import gm_reward
from selfdistill.rewards.pmi import pmi_reward
from selfdistill.rewards.pmi_shift import pmi_shift_reward

CORRECTNESS_HEAD = "correctness"
ROUTE_META = "meta"  # the advantage goes to the meta tokens
ROUTE_ANSWER_WITH_ARM = "answer_with_arm"  # to the answer tokens of with-arm rollouts
META_ROUTES = (ROUTE_META, ROUTE_ANSWER_WITH_ARM)


@dataclass(frozen=True)
class RewardSpec:
    name: str
    meta_fn: Optional[Callable[..., object]]  # None for base
    meta_head: Optional[str]  # the meta head's name in metrics (reward/<head>/...); None for base
    meta_route: Optional[str]  # one of META_ROUTES; None for base
    needs_pmi_passes: bool = False
    needs_gm_passes: bool = False
    needs_belief_open_close: bool = False
    needs_split_arms: bool = False
    needs_text_membership: bool = False
    uses_agg: bool = False
    correctness_fn: Callable[..., object] = correctness_reward

    @property
    def heads(self) -> tuple[str, ...]:
        """Head names in order: correctness always, then the meta head if any."""
        return (CORRECTNESS_HEAD,) if self.meta_head is None else (CORRECTNESS_HEAD, self.meta_head)

    def __post_init__(self) -> None:
        if (self.meta_fn is None) != (self.meta_head is None) or (self.meta_head is None) != (self.meta_route is None):
            raise ValueError(f"RewardSpec {self.name!r}: meta_fn, meta_head and meta_route are set together or not at all")
        if self.meta_route is not None and self.meta_route not in META_ROUTES:
            raise ValueError(f"RewardSpec {self.name!r}: meta_route {self.meta_route!r} is not one of {', '.join(META_ROUTES)}")


REWARDS: dict[str, RewardSpec] = {
    "base": RewardSpec("base", None, None, None),
    "pmi": RewardSpec(
        "pmi", pmi_reward, "pmi", ROUTE_META,
        needs_pmi_passes=True, needs_text_membership=True, uses_agg=True,
    ),
    "cf": RewardSpec("cf", cf_reward, "cf", ROUTE_ANSWER_WITH_ARM, needs_split_arms=True),
    "gm": RewardSpec("gm", gm_reward, "gm", ROUTE_META, needs_gm_passes=True, needs_text_membership=True),
    "asym_cf": RewardSpec("asym_cf", asym_cf_reward, "asym_cf", ROUTE_ANSWER_WITH_ARM, needs_split_arms=True),
    "pmi_shift": RewardSpec(
        "pmi_shift", pmi_shift_reward, "pmi_shift", ROUTE_META,
        needs_belief_open_close=True, needs_text_membership=True,
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
