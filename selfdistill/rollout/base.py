"""The rollout interface: prompts in, padded completion token ids and masks out.

A backend generates completions for a list of prompt token-id lists. Meta control is per
rollout (SPEC section 2, counterfactual arms): `allow` samples freely; `ban` masks `<|meta|>` and
`<|/meta|>` out of sampling; `placebo` starts the completion with the placebo block as forced
(given, not sampled) tokens. Forced tokens are part of the completion (so scoring contexts see
them) but marked in `forced_mask`, which keeps them out of the loss, the KL and the entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class MetaMode(str, Enum):
    ALLOW = "allow"
    BAN = "ban"
    PLACEBO = "placebo"


PLACEBO_TEXT = "\nLet me continue.\n"  # between the tags: `<|meta|>\nLet me continue.\n<|/meta|>`


@dataclass
class RolloutBatch:
    """R = prompts x n rollouts. Completions are right-padded to T with the pad id."""

    prompt_ids: list[list[int]]
    completion_ids: Tensor  # [R, T] long
    completion_mask: Tensor  # [R, T] bool: tokens up to and including EOS (padding excluded)
    forced_mask: Tensor  # [R, T] bool: forced placebo tokens (not policy samples)
    group_ids: Tensor  # [R] long: index of the prompt in the batch
    with_arm: Tensor  # [R] bool: meta allowed (cf / asym_cf split); all True otherwise
    texts: list[str] = field(default_factory=list)  # decoded completions, special tokens kept, no pad/EOS
    truncated: Tensor | None = None  # [R] bool: hit max_new_tokens without EOS

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)

    @property
    def loss_mask(self) -> Tensor:
        return self.completion_mask & ~self.forced_mask

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


class RolloutBackend(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], meta_modes: list[MetaMode], *, max_new_tokens: int,
        temperature: float, top_p: float, greedy: bool = False, seeds: list[int] | None = None,
        max_rows_per_call: int | None = None, compile: bool = False,
    ) -> RolloutBatch: ...
    # `seeds`: one per row; when given, row i's sampling depends only on seeds[i] and the model
    # (not on the batch it shares, the rank it runs on, or the global RNG).
    # `max_rows_per_call`: generate at most this many rows at once (same tokens per row).
    # `compile`: a compiled decode step where the backend has one (`rollout.compile`).


def rollout_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys, the same on every process."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]) >> 1


def build_rollout_backend(name: str, model, tokenizer) -> RolloutBackend:
    if name == "hf":
        from selfdistill.rollout.hf import HFRolloutBackend

        return HFRolloutBackend(model, tokenizer)
    if name in ("vllm", "sglang"):
        raise NotImplementedError(f"rollout.backend={name}: not implemented yet; use rollout.backend=hf")
    raise ValueError(f"rollout.backend={name!r} is not valid; choose hf")


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to one length: (ids [B, P], attention_mask [B, P])."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids, mask
