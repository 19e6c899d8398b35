"""Supervised fine-tuning: teacher-forced cross-entropy on worked solutions, masked to the completion."""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.algo.logprobs import completion_logprobs


def encode_solutions(tokenizer, solutions: list[str]) -> list[list[int]]:
    """Completion token ids of each solution, EOS appended (the tokens SFT trains)."""
    return [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in solutions]


def pad_completions(completions: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded completion ids [B, T] and their mask."""
    T = max(len(c) for c in completions)
    ids = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), T), dtype=torch.bool)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    return ids, mask


def sft_loss(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[Tensor, int]:
    """Mean token cross-entropy over completion tokens (prompt tokens carry no loss), and their count."""
    ids, mask = pad_completions(completions, pad_id)
    logp, _ = completion_logprobs(model, prompts, ids, mask, pad_id)
    n = int(mask.sum())
    return -(logp.sum() / max(n, 1)), n
