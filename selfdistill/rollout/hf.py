"""Rollouts with HF `generate` (KV cache), for the tiny model and single-GPU runs."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

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


class SeededSampling(LogitsProcessor):
    """Sampling with one random stream per row: temperature, top-p, then Gumbel-max.

    argmax(logits / T + Gumbel noise) is an exact sample of softmax(logits / T) (within the top-p
    set), and each row draws its noise from its own generator seeded by `seeds[row]`, one draw per
    decode step. So a row's completion depends on its seed and the model only: the same whether it
    is generated with 1 or 8 ranks, in a batch of 4 or 64, before or after a resume. `generate`
    then runs greedy (argmax) over these scores."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))


class HFRolloutBackend:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.meta_ids = list(meta_token_ids(tokenizer))
        self.placebo_ids = tokenizer(META_OPEN + PLACEBO_TEXT + META_CLOSE, add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompt_ids, meta_modes, *, max_new_tokens, temperature, top_p, greedy=False, seeds=None) -> RolloutBatch:
        if len(prompt_ids) != len(meta_modes):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(meta_modes)} meta modes")
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds")
        forced = [self.placebo_ids if m == MetaMode.PLACEBO else [] for m in meta_modes]
        device = next(self.model.parameters()).device
        ids, attn = pad_left([p + f for p, f in zip(prompt_ids, forced)], self.pad_id)
        ids, attn = ids.to(device), attn.to(device)
        ban_rows = torch.tensor([m == MetaMode.BAN for m in meta_modes])
        processors = [BanTokensForRows(self.meta_ids, ban_rows)]
        sample = not greedy and seeds is None  # HF sampling from the global RNG
        if not greedy and seeds is not None:
            processors.append(SeededSampling(seeds, temperature, top_p, device))
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=0 if sample else None,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            logits_processor=LogitsProcessorList(processors),
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
