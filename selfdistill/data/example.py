"""One dataset row after validation: the unit every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Example:
    id: str
    prompt: list[dict]  # chat messages [{role, content}], verl schema (SPEC section 9)
    gold: str  # reward_model.ground_truth, stripped
    data_source: str = "unknown"
    ability: str = "math"
    domain: str = "unknown"  # extra_info.domain
    difficulty: Optional[str] = None  # extra_info.difficulty (band label or level), as a string
    decoy: Optional[str] = None  # built at load time from (gold, decoy_seed), SPEC section 3
    solution: Optional[str] = None  # worked solution for SFT, when the data has one
    demonstration: Optional[str] = None  # the row's `demonstration` field (SDFT's teacher context)
    extra: dict = field(default_factory=dict)

    @property
    def teacher_demonstration(self) -> Optional[str]:
        """The demonstration SDFT's teacher reads (SPEC section 6): the row's `demonstration` field
        when it has one, else its worked solution (verl `extra_info.solution`; the synthetic task's)."""
        return self.demonstration if self.demonstration is not None else self.solution
