"""Asymmetric counterfactual (`asym_cf`, SPEC section 2): same with/without split as cf,
correctness only, one value per group.

`c0 = acc_without`, `c1 = acc_with`;
`R = alpha*max(0, c1 - c0) - [beta*(c0 - c1) if c0 - c1 > 0.1 else 0]
     - [gamma if c0 >= 0.99 and c1 >= 0.99 else 0]`, alpha = 1, beta = 2.5, gamma = 0.5.
The thresholds are compared on exact fractions of the counts (fractions.Fraction), never floats:
with n/2 = 10, c0 - c1 = 0.1 exactly is *not* > 0.1. Every with-arm rollout of the group gets R;
without-arm rollouts are members with 0; a group lacking either arm -> all non-members.
Worked cases (c0, c1): (0.5, 1) -> +0.5; (1, 0.5) -> -1.25; (1, 1) -> -0.5; (0.5, 0.5) -> 0.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from selfdistill.rewards.common import NAN, arm_counts, arm_split_metrics

ALPHA = 1.0
BETA = 2.5
GAMMA = 0.5
DROP_THRESHOLD = Fraction(1, 10)  # c0 - c1 > 0.1
SOLVED_THRESHOLD = Fraction(99, 100)  # c0 >= 0.99 and c1 >= 0.99
ASYM_CF_CASES = ("both_solved", "gain", "loss", "tie")


def asym_cf_group_value(k_without: int, n_without: int, k_with: int, n_with: int,
                        alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> float:
    """R of one group from its integer counts (both n > 0), thresholds compared exactly."""
    if n_without <= 0 or n_with <= 0:
        raise ValueError(f"asym_cf_group_value: both arms need rollouts; got n_without={n_without}, n_with={n_with}")
    c0 = Fraction(k_without, n_without)
    c1 = Fraction(k_with, n_with)
    # Fraction(float) is the float's exact value, so alpha/beta/gamma enter without rounding.
    r = Fraction(alpha) * max(Fraction(0), c1 - c0)
    if c0 - c1 > DROP_THRESHOLD:
        r -= Fraction(beta) * (c0 - c1)
    if c0 >= SOLVED_THRESHOLD and c1 >= SOLVED_THRESHOLD:
        r -= Fraction(gamma)
    return float(r)


def asym_cf_reward(correct01: Tensor, with_arm: Tensor, group_ids: Tensor,
                   alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> Tensor:
    """asym_cf head value per rollout, float64 [R]; NaN for every rollout of a group lacking an arm.

    correct01: [R] 0/1 (or bool). with_arm: bool [R]. group_ids: integer [R]. alpha, beta, gamma:
    SPEC's 1, 2.5, 0.5.
    """
    cnt = arm_counts(correct01, with_arm, group_ids, "asym_cf_reward")
    per_group = []
    for k0, n0, k1, n1 in zip(cnt["k_without"].tolist(), cnt["n_without"].tolist(),
                              cnt["k_with"].tolist(), cnt["n_with"].tolist()):
        per_group.append(asym_cf_group_value(k0, n0, k1, n1, alpha, beta, gamma) if n0 > 0 and n1 > 0 else NAN)
    group_r = torch.tensor(per_group, dtype=torch.float64, device=cnt["inverse"].device)
    r = group_r[cnt["inverse"]]
    # Without-arm members get 0; NaN (group lacking an arm) stays NaN for everyone.
    return torch.where(cnt["with_arm"] | torch.isnan(r), r, torch.zeros_like(r))


def asym_cf_case(k_without: int, n_without: int, k_with: int, n_with: int) -> str:
    """Which term of R decides a group, exclusive and exact (both n > 0): "both_solved" (the gamma
    penalty), else "gain" (c1 > c0), else "loss" (a drop > 0.1, the beta penalty), else "tie"
    (everything that earns 0: equal accuracy or a drop of at most 0.1)."""
    c0, c1 = Fraction(k_without, n_without), Fraction(k_with, n_with)
    if c0 >= SOLVED_THRESHOLD and c1 >= SOLVED_THRESHOLD:
        return "both_solved"
    if c1 > c0:
        return "gain"
    if c0 - c1 > DROP_THRESHOLD:
        return "loss"
    return "tie"


def asym_cf_metrics(correct01: Tensor, with_arm: Tensor, group_ids: Tensor) -> dict[str, float]:
    """Arm accuracies, groups lacking an arm, and `asym_cf/case_<case>` group counts."""
    metrics, both = arm_split_metrics("asym_cf", arm_counts(correct01, with_arm, group_ids, "asym_cf_metrics"))
    cases = [asym_cf_case(*group) for group in both]
    metrics.update({f"asym_cf/case_{case}": float(cases.count(case)) for case in ASYM_CF_CASES})
    return metrics
