"""One dataset row after validation: the unit every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class DataError(ValueError):
    """A dataset file or row does not follow the schema (SPEC section 9), or its gold has no decoy."""


class _LazyDecoy:
    """`Example.decoy`: given explicitly, or built from (gold, decoy_seed) on first read and cached
    on the row (SPEC section 3's rule, deferred: selfdistill.data.loading explains when and why).
    A gold with no valid decoy raises DataError naming the row, on every read."""

    def __get__(self, ex, owner=None):
        if ex is None:
            return None  # the dataclass field's default
        value = ex.__dict__.get("_decoy")
        if value is None and ex.decoy_seed is not None:
            from selfdistill.data.decoys import DecoyError, make_decoy

            try:
                value = ex.__dict__["_decoy"] = make_decoy(ex.gold, ex.decoy_seed)
            except DecoyError as e:
                where = f"{ex.origin}: " if ex.origin else ""
                raise DataError(f"{where}field 'reward_model.ground_truth': row id {ex.id!r} is rejected, no decoy "
                                f"can be built (SPEC section 3): {e}") from e
        return value

    def __set__(self, ex, value) -> None:
        # `field(default=...)` hands __init__ the descriptor itself as the default: that means "not given"
        ex.__dict__["_decoy"] = None if isinstance(value, _LazyDecoy) else value


@dataclass
class Example:
    id: str
    prompt: list[dict]  # chat messages [{role, content}], verl schema (SPEC section 9)
    gold: str  # reward_model.ground_truth, stripped
    data_source: str = "unknown"
    ability: str = "math"
    domain: str = "unknown"  # extra_info.domain
    difficulty: Optional[str] = None  # extra_info.difficulty (band label or level), as a string
    # SPEC section 3; built on first read when decoy_seed is set (not in repr: printing a row must
    # not run math-verify, or raise for a row without a decoy)
    decoy: Optional[str] = field(default=_LazyDecoy(), repr=False)
    solution: Optional[str] = None  # worked solution for SFT, when the data has one
    demonstration: Optional[str] = None  # the row's `demonstration` field (SDFT's teacher context)
    extra: dict = field(default_factory=dict)
    decoy_seed: Optional[int] = field(default=None, compare=False, repr=False)  # None: `decoy` as given
    origin: Optional[str] = field(default=None, compare=False, repr=False)  # "file: row i", for errors

    @property
    def teacher_demonstration(self) -> Optional[str]:
        """The demonstration SDFT's teacher reads (SPEC section 6): the row's `demonstration` field
        when it has one, else its worked solution (verl `extra_info.solution`; the synthetic task's)."""
        return self.demonstration if self.demonstration is not None else self.solution
