"""The frozen reference / scorer model, replicated or sharded across ranks (`engine.shard_reference`).

Replicated (the default): every rank holds a full, plain copy of the reference (SPEC section 1).
Sharded: at rest every rank keeps only its 1/world_size slice of each flattened parameter; the
scoring and KL phases gather the full weights once (`gathered()`, a collective every rank enters
together), run their passes on a plain model, and free the gathered copy on exit. The trade-off
mirrors the policy's gather for generation: reference memory outside those phases drops from one
full copy to 1/world_size of one, while inside them a full copy is resident transiently. The
passes themselves need no collectives, so ranks may run different numbers of them.

The EMA self-teacher (SPEC section 6) is such a copy too, moved towards the student after every
applied optimizer step by `ema_update_` (each rank blends what it holds: all of it, or its slice).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class ReplicatedReference:
    """A full frozen copy on every rank; `gathered()` is a no-op."""

    def __init__(self, model):
        self.model = model

    @contextlib.contextmanager
    def gathered(self):
        yield self.model

    @torch.no_grad()
    def ema_update_(self, student: dict[str, torch.Tensor], tau: float) -> None:
        """theta <- (1 - tau) theta + tau theta_student, `student` = full parameters by name."""
        for name, p in self.model.named_parameters():
            p.lerp_(student[name].to(p.device, p.dtype), tau)


class ShardedReference:
    """Each rank keeps a 1/world_size slice of every parameter; `gathered()` rebuilds the model."""

    def __init__(self, model, rank: int, world_size: int):
        # Tied weights (embedding = LM head) are one parameter: named_parameters lists it once.
        self.model, self.rank, self.world_size = model, rank, world_size
        self._shards: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            per = -(-flat.numel() // world_size)  # ceil: the last rank's slice is zero-padded
            padded = torch.zeros(per * world_size, dtype=flat.dtype, device=flat.device)
            padded[: flat.numel()] = flat
            self._shards[name] = padded[rank * per: (rank + 1) * per].clone()
            self._shapes[name] = p.shape
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # the full tensor is released

    @contextlib.contextmanager
    def gathered(self):
        """Every rank must enter together: one all-gather per parameter, then the plain model."""
        try:
            for name, p in self.model.named_parameters():
                shard = self._shards[name]
                parts = [torch.empty_like(shard) for _ in range(self.world_size)]
                dist.all_gather(parts, shard)
                numel = self._shapes[name].numel()
                p.data = torch.cat(parts)[:numel].view(self._shapes[name])
            yield self.model
        finally:
            for p in self.model.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def ema_update_(self, student: dict[str, torch.Tensor], tau: float) -> None:
        """theta <- (1 - tau) theta + tau theta_student on this rank's slices (no collective)."""
        for name, shard in self._shards.items():
            flat = student[name].reshape(-1).to(shard.device, shard.dtype)
            start = self.rank * shard.numel()
            piece = flat[start: start + shard.numel()]
            shard[: piece.numel()].lerp_(piece, tau)  # the zero padding past the end stays zero

    def local_numel(self) -> int:
        """Elements this rank holds at rest (its shards)."""
        return sum(s.numel() for s in self._shards.values())


def build_reference(model, cfg, rank: int, world_size: int):
    """Wrap a frozen copy per `engine.shard_reference` (sharding needs more than one rank)."""
    if cfg.engine.shard_reference and world_size > 1:
        return ShardedReference(model, rank, world_size)
    return ReplicatedReference(model)
