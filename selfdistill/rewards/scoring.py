"""Reward heads for one rollout batch: correctness always, plus the arm's meta head.

This is the seam between the trainer (model, tokenizer, rollouts) and the pure reward functions
of `selfdistill.rewards`: it grades, runs the frozen scorer's passes the arm needs, and returns
one value per rollout per head (NaN = non-member, SPEC section 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.config import RewardConfig
from selfdistill.rollout.base import RolloutBatch


def correctness_head(grades: Tensor) -> Tensor:
    """+1 correct, -1 otherwise (wrong, no boxed answer, grader timeout), SPEC section 1."""
    return torch.where(grades == 1, 1.0, -1.0)


def compute_reward_heads(cfg: RewardConfig, batch: RolloutBatch, grades: Tensor, examples, scorer, tokenizer,
                         meta_ids: tuple[int, int]) -> tuple[dict[str, Tensor], str | None, dict[str, float]]:
    """(heads {name: [R]}, meta routing region or None, metrics)."""
    heads = {"correctness": correctness_head(grades)}
    if cfg.name == "base":
        return heads, None, {}
    from selfdistill.rewards.meta_scorer import score_meta_head

    values, route, metrics = score_meta_head(cfg, batch, grades, examples, scorer, tokenizer, meta_ids)
    heads[cfg.name] = values
    return heads, route, metrics
