"""Rollouts with HF `generate` (KV cache), for the tiny model and single-GPU runs."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from selfdistill.models.loading import meta_token_ids
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN
from selfdistill.rollout.base import PLACEBO_TEXT, MetaMode, RolloutBatch, pad_left


class BanTokensForRows(LogitsProcessor):
    """Set the logits of `token_ids` to -inf on the rows in `rows` (meta `ban` mode)."""

    def __init__(self, token_ids: list[int], rows: torch.Tensor):
        self.token_ids = token_ids
        self.rows = rows

    def __call__(self, input_ids, scores):
        if self.rows.any():
            scores[self.rows.to(scores.device).nonzero(as_tuple=True)[0].unsqueeze(1), torch.tensor(self.token_ids, device=scores.device)] = float("-inf")
        return scores


class HFRolloutBackend:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.meta_ids = list(meta_token_ids(tokenizer))
        self.placebo_ids = tokenizer(META_OPEN + PLACEBO_TEXT + META_CLOSE, add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompt_ids, meta_modes, *, max_new_tokens, temperature, top_p, greedy=False) -> RolloutBatch:
        if len(prompt_ids) != len(meta_modes):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(meta_modes)} meta modes")
        forced = [self.placebo_ids if m == MetaMode.PLACEBO else [] for m in meta_modes]
        device = next(self.model.parameters()).device
        ids, attn = pad_left([p + f for p, f in zip(prompt_ids, forced)], self.pad_id)
        ids, attn = ids.to(device), attn.to(device)
        ban_rows = torch.tensor([m == MetaMode.BAN for m in meta_modes])
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None,
            top_k=0 if not greedy else None,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            logits_processor=LogitsProcessorList([BanTokensForRows(self.meta_ids, ban_rows)]),
            use_cache=True,
        )
        self.model.train(was_training)
        gen = out[:, ids.shape[1]:].cpu()
        return self._assemble(prompt_ids, forced, gen, meta_modes)

    def _assemble(self, prompt_ids, forced, gen, meta_modes) -> RolloutBatch:
        R = gen.shape[0]
        is_eos = gen == self.eos_id
        has_eos = is_eos.any(1)
        first_eos = torch.where(has_eos, is_eos.float().argmax(1), torch.full((R,), gen.shape[1]))
        gen_len = torch.where(has_eos, first_eos + 1, torch.full((R,), gen.shape[1]))  # EOS included
        F = torch.tensor([len(f) for f in forced])
        lengths = F + gen_len
        T = int(lengths.max()) if R else 0
        comp = torch.full((R, T), self.pad_id, dtype=torch.long)
        forced_mask = torch.zeros((R, T), dtype=torch.bool)
        for i in range(R):
            f = forced[i]
            if f:
                comp[i, : len(f)] = torch.tensor(f)
                forced_mask[i, : len(f)] = True
            comp[i, len(f): int(lengths[i])] = gen[i, : int(gen_len[i])]
        mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
        texts = [
            self.tokenizer.decode([t for t in comp[i, : int(lengths[i])].tolist() if t not in (self.eos_id, self.pad_id)], skip_special_tokens=False)
            for i in range(R)
        ]
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=comp,
            completion_mask=mask,
            forced_mask=forced_mask,
            group_ids=torch.zeros(R, dtype=torch.long),
            with_arm=torch.tensor([m == MetaMode.ALLOW for m in meta_modes], dtype=torch.bool),
            texts=texts,
            truncated=~has_eos,
        )
