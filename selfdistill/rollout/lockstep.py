"""Keeping ranks in step while they generate from a sharded model.

Under FSDP2 with `engine.gather_for_generation=false` every forward all-gathers each layer's
shards, so every rank must run the same number of forwards: a rank whose rows all finished (or
that has fewer rows, or fewer generation calls) keeps running one-token filler forwards until
every rank is done, as HF `generate(synced_gpus=True)` does. The engine turns this on around its
rollout phase (`generation_lockstep()`); the decode loop asks `any_rank` once per step.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.distributed as dist

_ACTIVE: ContextVar[bool] = ContextVar("selfdistill_generation_lockstep", default=False)


@contextlib.contextmanager
def generation_lockstep():
    """Within this context, generation keeps every rank of the default process group in step."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def in_lockstep() -> bool:
    return _ACTIVE.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` over the ranks (local value when not in lockstep)."""
    if not in_lockstep():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on some rank (the local flag when not in lockstep)."""
    return bool(max_over_ranks(int(flag), device))


@torch.no_grad()
def filler_forward(model, pad_id: int, device: torch.device) -> None:
    """One forward on a single pad token: joins the sharded model's collectives, result unused."""
    model(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)
