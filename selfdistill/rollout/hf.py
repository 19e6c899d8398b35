"""The rollout backend for HF models: our decode loop (`selfdistill.rollout.decode`) over the
model's own forward, for the tiny model and single-GPU runs.

Rows are generated in calls of at most `max_rows_per_call` rows (all at once by default). Meta
control (`selfdistill.rollout.base`): `ban` rows cannot sample `<|meta|>`/`<|/meta|>`; `placebo`
rows start from the prompt followed by the forced placebo block. Generation stops at any stop id:
the tokenizer's EOS plus the model's generation-config `eos_token_id` (an int or a list; a ChatML
model ends its turns with `<|im_end|>`).
"""

from __future__ import annotations

import torch

from selfdistill.models.loading import meta_token_ids
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN
from selfdistill.rollout import lockstep
from selfdistill.rollout.base import PLACEBO_TEXT, MetaMode, RolloutBatch
from selfdistill.rollout.decode import DecodeOptions, SamplingParams, decode


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the generation config's `eos_token_id` (int or list), deduplicated."""
    ids = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    out = sorted({int(i) for i in ids if i is not None})
    if not out:
        raise ValueError("no stop token: the tokenizer has no eos_token and the model's generation config no eos_token_id")
    return out


class HFRolloutBackend:
    """`share_prefix` / `compact` / `direct_step` exist for tests and benchmarks: none changes a row's
    tokens (`direct_step=False` decodes with the HF forward instead of `DirectDecoder`)."""

    def __init__(self, model, tokenizer, *, share_prefix: bool = True, compact: bool = True, direct_step: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.meta_ids = list(meta_token_ids(tokenizer))
        self.placebo_ids = tokenizer(META_OPEN + PLACEBO_TEXT + META_CLOSE, add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.share_prefix, self.compact, self.direct_step = share_prefix, compact, direct_step

    def generate(self, prompt_ids, meta_modes, *, max_new_tokens, temperature, top_p, greedy=False, seeds=None,
                 max_rows_per_call: int | None = None, compile: bool = False) -> RolloutBatch:
        """`seeds`: one per row (row i's sample depends only on seeds[i] and the model); None draws
        them from the global torch RNG. `compile`: the torch.compile'd decode step."""
        R = len(prompt_ids)
        if R != len(meta_modes):
            raise ValueError(f"{R} prompts but {len(meta_modes)} meta modes")
        if seeds is not None and len(seeds) != R:
            raise ValueError(f"{R} prompts but {len(seeds)} seeds")
        if max_rows_per_call is not None and max_rows_per_call < 1:
            raise ValueError(f"max_rows_per_call={max_rows_per_call} must be >= 1 (or None for one call)")
        forced = [self.placebo_ids if m == MetaMode.PLACEBO else [] for m in meta_modes]
        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, (R,), dtype=torch.long) if not greedy else torch.zeros(R, dtype=torch.long)
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        ban_rows = torch.tensor([m == MetaMode.BAN for m in meta_modes], dtype=torch.bool)
        params = SamplingParams(max_new_tokens, temperature, top_p, greedy)
        options = DecodeOptions(share_prefix=self.share_prefix, compact=self.compact, compiled=compile, direct=self.direct_step)
        step = max_rows_per_call or max(R, 1)
        device = next(self.model.parameters()).device
        calls = lockstep.max_over_ranks(-(-R // step), device)  # in lockstep every rank makes as many calls
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [
                decode(self.model, [p + f for p, f in zip(prompt_ids[s:s + step], forced[s:s + step])], seeds[s:s + step], params,
                       stop_ids=self.stop_ids, pad_id=self.pad_id, ban_rows=ban_rows[s:s + step], ban_ids=self.meta_ids,
                       options=options)
                for s in range(0, calls * step, step)
            ]
        finally:
            self.model.train(was_training)
        gen = torch.cat(parts) if parts else torch.full((0, max_new_tokens), self.pad_id, dtype=torch.long)
        return self._assemble(prompt_ids, forced, gen, meta_modes)

    def _assemble(self, prompt_ids, forced, gen, meta_modes) -> RolloutBatch:
        R = gen.shape[0]
        is_stop = torch.isin(gen, torch.tensor(self.stop_ids))
        has_stop = is_stop.any(1)
        gen_len = torch.where(has_stop, is_stop.float().argmax(1) + 1, torch.full((R,), gen.shape[1]))  # stop id included
        F = torch.tensor([len(f) for f in forced], dtype=torch.long)
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
        drop = {*self.stop_ids, self.pad_id}
        texts = [self.tokenizer.decode([t for t in comp[i, : int(lengths[i])].tolist() if t not in drop], skip_special_tokens=False)
                 for i in range(R)]
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=comp,
            completion_mask=mask,
            forced_mask=forced_mask,
            group_ids=torch.zeros(R, dtype=torch.long),
            with_arm=torch.tensor([m == MetaMode.ALLOW for m in meta_modes], dtype=torch.bool),
            texts=texts,
            truncated=~has_stop,
        )
