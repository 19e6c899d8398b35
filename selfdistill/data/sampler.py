"""Deterministic, resumable prompt sampler: a seeded permutation per epoch and a cursor.

Its whole state is (epoch, cursor), so a resumed run draws exactly the batches the uninterrupted
run would have drawn. Under data parallelism each rank takes a contiguous slice of every global
batch, so all n completions of a prompt stay on one rank (group integrity).
"""

from __future__ import annotations

import random


class PromptSampler:
    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise ValueError("the prompt sampler needs at least one example; the train split is empty")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.num_items))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def next_batch(self, size: int) -> list[int]:
        out = []
        while len(out) < size:
            if self.cursor == self.num_items:
                self.epoch += 1
                self.cursor = 0
                self._perm = self._permutation(self.epoch)
            take = min(size - len(out), self.num_items - self.cursor)
            out.extend(self._perm[self.cursor: self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint sampler was built for {state['num_items']} items with seed {state['seed']}, "
                f"this run has {self.num_items} items with seed {self.seed}; resume with the same data and seed"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)


def rank_slice(items: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s contiguous share of a global batch (its length must divide evenly)."""
    if len(items) % world_size:
        raise ValueError(f"global batch of {len(items)} prompts does not split over {world_size} ranks; make grpo.batch_size a multiple of the world size")
    k = len(items) // world_size
    return items[rank * k: (rank + 1) * k]
