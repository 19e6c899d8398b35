"""Test helpers for the meta grammar: completions built from token ids, and tags spelled out of
ordinary char tokens (which the char tokenizer can sample and which decode to the tag's text)."""

from __future__ import annotations

import torch

from selfdistill.rollout.base import RolloutBatch


def spelled(tok, text: str) -> list[int]:
    """Token ids of `text` one char token per character: a `<|meta|>` written in it stays eight
    ordinary tokens, never the special token."""
    ids = tok.convert_tokens_to_ids(list(text))
    assert tok.unk_token_id not in ids, text
    return ids


def tagged(tok, text: str) -> list[int]:
    """Token ids of `text` as the tokenizer encodes it: a written `<|meta|>` becomes the tag token."""
    return tok(text, add_special_tokens=False)["input_ids"]


def rollout_batch(tok, completions: list[list[int]], group_ids: list[int] | None = None,
                  with_arm: list[bool] | None = None, prompts: list[list[int]] | None = None) -> RolloutBatch:
    """A right-padded batch of these completions, each ended by EOS (in the mask, as generation
    leaves it), texts decoded the way the rollout backend does."""
    rows = [c + [tok.eos_token_id] for c in completions]
    T = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    return RolloutBatch(
        prompt_ids=prompts if prompts is not None else [tagged(tok, "Q: ?\nA: ")] * len(rows),
        completion_ids=ids, completion_mask=mask, forced_mask=torch.zeros_like(mask),
        group_ids=torch.tensor(group_ids if group_ids is not None else [0] * len(rows)),
        with_arm=torch.tensor(with_arm if with_arm is not None else [True] * len(rows)),
        texts=[tok.decode(c, skip_special_tokens=False) for c in completions],
    )
