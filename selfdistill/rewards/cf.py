"""Counterfactual reward (`cf`, SPEC section 2): meta on vs meta off on the same prompt.

The first n/2 rollouts of a group generate with meta allowed (with arm), the rest without (the
placebo block forced, or the tags banned). With c in {1, 0}, `acc_without` / `acc_with` = mean c
over each arm. With-arm rollout i: `v_i = c_i - acc_without`; if `acc_with < acc_without` (meta hurt
this group) a positive v_i is set to 0; if `acc_without = 1` and rollout i emitted a meta block,
`v_i -= 0.1`. Without-arm rollouts are members with v = 0. A group lacking either arm -> all
non-members. Accuracy comparisons are done on integer counts, so they are exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.rewards.common import NAN, arm_counts, arm_split_metrics, as_bool

SOLVED_WITHOUT_META_PENALTY = 0.1


def cf_reward(correct01: Tensor, with_arm: Tensor, group_ids: Tensor, emitted_meta: Tensor) -> Tensor:
    """cf head value per rollout, float64 [R]; NaN for every rollout of a group lacking an arm.

    correct01: [R] 0/1 (or bool) correctness. with_arm: bool [R], True for the with-meta arm.
    group_ids: integer [R], one id per prompt. emitted_meta: bool [R], the rollout has a meta block
    (`MetaRegions.emitted`; only read for with-arm rollouts).
    """
    cnt = arm_counts(correct01, with_arm, group_ids, "cf_reward")
    emitted = as_bool(emitted_meta, "emitted_meta")
    if emitted.shape != cnt["correct"].shape:
        raise ValueError(f"cf_reward: emitted_meta has shape {tuple(emitted.shape)}, expected {tuple(cnt['correct'].shape)}")
    inv = cnt["inverse"]
    n1, k1 = cnt["n_with"][inv], cnt["k_with"][inv]
    n0, k0 = cnt["n_without"][inv], cnt["k_without"][inv]
    both_arms = (n0 > 0) & (n1 > 0)

    c = cnt["correct"].to(torch.float64)
    acc_without = k0.to(torch.float64) / n0.clamp(min=1).to(torch.float64)
    v = c - acc_without
    meta_hurt = k1 * n0 < k0 * n1  # acc_with < acc_without, cross-multiplied
    v = torch.where(meta_hurt & (v > 0), torch.zeros_like(v), v)
    solved_without = k0 == n0  # acc_without = 1
    v = v - SOLVED_WITHOUT_META_PENALTY * (solved_without & emitted).to(torch.float64)

    v = torch.where(cnt["with_arm"], v, torch.zeros_like(v))
    return torch.where(both_arms, v, torch.full_like(v, NAN))


def cf_metrics(correct01: Tensor, with_arm: Tensor, group_ids: Tensor) -> dict[str, float]:
    """Arm accuracies, groups lacking an arm, and among groups with both arms those where meta
    hurt (acc_with < acc_without), helped (>) and those solved without meta (acc_without = 1)."""
    metrics, both = arm_split_metrics("cf", arm_counts(correct01, with_arm, group_ids, "cf_metrics"))
    metrics["cf/groups_meta_hurt"] = float(sum(k1 * n0 < k0 * n1 for k0, n0, k1, n1 in both))
    metrics["cf/groups_meta_helped"] = float(sum(k1 * n0 > k0 * n1 for k0, n0, k1, n1 in both))
    metrics["cf/groups_solved_without"] = float(sum(k0 == n0 for k0, n0, _, _ in both))
    return metrics
