"""Supervised fine-tuning: teacher-forced cross-entropy on worked solutions, masked to the completion."""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill.algo.logprobs import completion_logprobs


def encode_sft_pairs(tokenizer, prompts: list[list[int]], solutions: list[str]) -> tuple[Tensor, Tensor]:
    """Right-padded completion ids (solution + EOS) and their mask."""
    comps = [tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in solutions]
    T = max(len(c) for c in comps)
    ids = torch.full((len(comps), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(comps), T), dtype=torch.bool)
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    return ids, mask


def sft_loss(model, tokenizer, prompts: list[list[int]], solutions: list[str]) -> tuple[Tensor, int]:
    """Mean token cross-entropy over completion tokens (prompt tokens carry no loss)."""
    ids, mask = encode_sft_pairs(tokenizer, prompts, solutions)
    logp, _ = completion_logprobs(model, prompts, ids, mask, tokenizer.pad_token_id)
    n = int(mask.sum())
    return -(logp.sum() / max(n, 1)), n
