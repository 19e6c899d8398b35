"""Reward heads for one rollout batch: correctness always, plus the arm's meta head.

This is the seam between the trainer (model, tokenizer, rollouts) and the pure reward functions
of `selfdistill.rewards`: from the grades it computes the correctness head, has the scorer run
the meta head the arm's registry entry declares, and returns one value per rollout per head (NaN =
non-member, SPEC section 2) with the step's reward metrics, `meta_structure_metrics` included for
every arm (base too).
"""

from __future__ import annotations

from torch import Tensor

from selfdistill.config import RewardConfig
from selfdistill.rewards.base import correct_from_grades, correctness_reward
from selfdistill.rewards.regions import content_regions, meta_structure_metrics
from selfdistill.rewards.registry import CORRECTNESS_HEAD, get_reward
from selfdistill.rollout.base import RolloutBatch


def compute_reward_heads(cfg: RewardConfig, batch: RolloutBatch, grades: Tensor, examples, scorer, tokenizer,
                         meta_ids: tuple[int, int]) -> tuple[dict[str, Tensor], str | None, dict[str, float]]:
    """(heads {name: float64 [R]}, the meta head's routing region or None, metrics)."""
    spec = get_reward(cfg.name)
    heads = {CORRECTNESS_HEAD: correctness_reward(correct_from_grades(grades.cpu()))}
    if spec.meta_head is None:
        _, regions = content_regions(batch, tokenizer.eos_token_id, meta_ids)
        return heads, None, meta_structure_metrics(regions, batch.with_arm.cpu())
    from selfdistill.rewards.meta_scorer import score_meta_head

    values, route, metrics = score_meta_head(cfg, batch, grades, examples, scorer, tokenizer, meta_ids)
    heads[spec.meta_head] = values
    return heads, route, metrics
