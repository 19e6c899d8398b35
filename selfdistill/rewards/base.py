"""Correctness head (`base`, SPEC sections 1-2): +1 for a correct rollout, -1 otherwise.

Every reward arm carries this head; `base` carries only it (the matched twin of every meta arm).
`correct` comes from the grader (math-verify on the last `\\boxed{}` outside meta blocks; no
boxed answer or a grader timeout = wrong), so the head is always defined.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.rewards.common import as_bool


def correctness_reward(correct: Tensor) -> Tensor:
    """+1.0 / -1.0 per rollout, float64 [R]."""
    c = as_bool(correct, "correct")
    return torch.where(c, 1.0, -1.0).to(torch.float64)
