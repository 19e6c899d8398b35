"""Deterministic, resumable prompt sampler: one permutation per epoch and a cursor.

Its whole state is (order, limit, epoch, cursor), so a resumed run draws exactly the batches the
uninterrupted run would have drawn. Batches are cut from the stream of epochs one after another (a
batch may straddle two epochs). Under data parallelism each rank takes a contiguous slice of every
global batch, so all n completions of a prompt stay on one rank (group integrity).

Orders (`set_order`; SDFT's curriculum and batching, SPEC section 6):
- `shuffled` (default): every epoch a seeded permutation.
- `sorted`: every epoch in curriculum order, ascending sort key (ties by index): easy first.
- `three_pass`: epochs cycle sorted, shuffled (seeded), sorted. SPEC's reading of the seed's
  "3-pass curriculum batching": each pass a full epoch over the items, the step budget running
  across them; after the third pass the cycle starts again.
A stage may also draw from the first `limit` items only (SDFT's fixed subset of training pairs).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

ORDERS = ("shuffled", "sorted", "three_pass")


class PromptSampler:
    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise ValueError("the prompt sampler needs at least one example; the train split is empty")
        self.num_items = num_items
        self.seed = seed
        self.order = "shuffled"
        self.limit: Optional[int] = None  # draw from items [0, limit) only
        self.epoch = 0
        self.cursor = 0
        self._sort_keys: Optional[list] = None
        self._perm: Optional[list[int]] = None  # of `self.epoch`, built on first use

    @property
    def size(self) -> int:
        """Items drawn from: the first `limit`, or all."""
        return self.limit if self.limit is not None else self.num_items

    def set_order(self, order: str, sort_keys: Optional[Sequence] = None, restart: bool = True,
                  limit: Optional[int] = None) -> None:
        """Draw in `order` from the first `limit` items (None: all) from now on. `sort_keys` (one per
        drawn item) rank the items for the sorted passes. `restart`: begin at epoch 0, cursor 0 (a
        stage's first step); else keep the position (a resumed stage), which must have been drawn
        with the same order and limit."""
        if order not in ORDERS:
            raise ValueError(f"sampler order {order!r} is not valid; choose one of {', '.join(ORDERS)}")
        if limit is not None and not 1 <= limit <= self.num_items:
            raise ValueError(f"sampler limit {limit} must be in [1, {self.num_items}] (the items there are)")
        size = limit if limit is not None else self.num_items
        if order != "shuffled" and (sort_keys is None or len(sort_keys) != size):
            raise ValueError(f"sampler order {order!r} needs one sort key per item ({size}), "
                             f"got {None if sort_keys is None else len(sort_keys)}")
        if not restart and (order, limit) != (self.order, self.limit):
            raise ValueError(f"cannot continue the sampler in order {order!r} over {size} items: its position was drawn "
                             f"in order {self.order!r} over {self.size} (resume with the same sdft settings)")
        self.order, self.limit = order, limit
        self._sort_keys = list(sort_keys) if sort_keys is not None else None
        if restart:
            self.epoch, self.cursor = 0, 0
        self._perm = None

    def epoch_kind(self, epoch: int) -> str:
        """`sorted` or `shuffled`: how epoch `epoch` is ordered."""
        if self.order == "three_pass":
            return "shuffled" if epoch % 3 == 1 else "sorted"
        return self.order

    def _permutation(self, epoch: int) -> list[int]:
        if self.epoch_kind(epoch) == "sorted":
            if self._sort_keys is None:
                raise RuntimeError(f"sampler order {self.order!r} was restored from a checkpoint without its sort keys; "
                                   "the stage must call set_order(order, sort_keys, restart=False) before drawing")
            return sorted(range(self.size), key=lambda i: (self._sort_keys[i], i))
        perm = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def next_batch(self, size: int) -> list[int]:
        out = []
        while len(out) < size:
            if self.cursor >= self.size:
                self.epoch += 1
                self.cursor = 0
                self._perm = None
            if self._perm is None:
                self._perm = self._permutation(self.epoch)
            take = min(size - len(out), self.size - self.cursor)
            out.extend(self._perm[self.cursor: self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_items": self.num_items,
                "order": self.order, "limit": self.limit}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint sampler was built for {state['num_items']} items with seed {state['seed']}, "
                f"this run has {self.num_items} items with seed {self.seed}; resume with the same data and seed"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = state.get("order", "shuffled")  # checkpoints from before the orders existed
        self.limit = state.get("limit")
        self._perm = None


def rank_slice(items: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s contiguous share of a global batch (its length must divide evenly)."""
    if len(items) % world_size:
        raise ValueError(f"global batch of {len(items)} prompts does not split over {world_size} ranks; make grpo.batch_size a multiple of the world size")
    k = len(items) // world_size
    return items[rank * k: (rank + 1) * k]
