"""Correctness head (`base`, SPEC sections 1-2): +1 for a correct rollout, -1 otherwise.

Every reward arm carries this head; `base` carries only it (the matched twin of every meta arm).
`correct` comes from the grader (math-verify on the last `\\boxed{}` outside meta blocks; no
boxed answer or a grader timeout = wrong), so the head is always defined.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.rewards.common import as_bool

GRADE_CORRECT = 1  # the grader's verdicts: 1 correct, 0 wrong, -1 timeout or crash (counted as wrong)


def correct_from_grades(grades: Tensor) -> Tensor:
    """bool [R]: the grader said correct (1); wrong (0) and timeouts / crashes (-1) are False."""
    g = torch.as_tensor(grades)
    if g.dim() != 1 or g.dtype == torch.bool or g.is_complex():
        raise ValueError(f"grades must be a tensor [R] of 1 / 0 / -1 (Grader.grade); got dtype {g.dtype}, shape {tuple(g.shape)}")
    bad = (g != 1) & (g != 0) & (g != -1)
    if bad.any():
        raise ValueError(f"grades must hold only 1 / 0 / -1 (Grader.grade); got {g[bad][:4].tolist()} among them")
    return g == GRADE_CORRECT


def correctness_reward(correct: Tensor) -> Tensor:
    """+1.0 / -1.0 per rollout, float64 [R]."""
    c = as_bool(correct, "correct")
    return torch.where(c, 1.0, -1.0).to(torch.float64)
