"""The decode loop: prefill each distinct prefix once, then decode every row with its own seeded
random stream, finished rows leaving the batch.

    prefixes (prompt + forced tokens) --distinct--> prefill (one forward of the distinct ones)
        -> each row's KV copied from its prefix's (`RowKVCache.from_prefill`)
        -> for t in 0 .. max_new_tokens-1: logits -> ban -> sample with (row seed, t) -> a stop id
           ends the row; once finished rows are 1/8 of the batch they are dropped (KV freed)

A row's tokens depend only on its prefix, its seed and the model: prefix sharing, compaction,
the number of rows per call and the compiled step change which rows share a forward, never what
a row computes (up to the float rounding of batched kernels, far below what flips a sample in
practice; the tests compare token ids bitwise). Positions follow the attention mask, as in
`selfdistill.algo.logprobs.build_sequences`: a prefix's first real token is at position 0, so
left padding changes nothing.

The prefill is the HF model's own forward (any HF decoder with full attention); decode steps run
`DirectDecoder` (the same decoder math straight from the model's weights, without the HF forward's
fixed cost per call; Qwen3 / Qwen2 / Llama) where it applies, else the HF forward. The loop owns
the cache, the masks, the sampling and the stopping. Under `lockstep` (FSDP2 without gathered weights) a
rank that is done keeps joining its peers' forwards until every rank is done.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from selfdistill.rollout import compiled as compiled_step
from selfdistill.rollout import lockstep
from selfdistill.rollout.direct_step import DirectDecoder
from selfdistill.rollout.kv_cache import RowKVCache
from selfdistill.rollout.sampling import sample_tokens

COMPACT_FRACTION = 8  # eager: drop finished rows once they are >= 1/8 of the batch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


@dataclass(frozen=True)
class DecodeOptions:
    """How a call decodes; none of these changes a row's tokens."""

    share_prefix: bool = True  # prefill each distinct prefix once (else once per row)
    compact: bool = True  # finished rows leave the batch
    compiled: bool = False  # torch.compile'd decode step over a static cache (`selfdistill.rollout.compiled`)
    direct: bool = True  # eager steps by `DirectDecoder` where it applies (else the HF forward)


def distinct_prefixes(prefixes: list[list[int]]) -> tuple[list[list[int]], Tensor]:
    """(the distinct prefixes in order of first appearance, index of each row's prefix)."""
    index: dict[tuple[int, ...], int] = {}
    source = [index.setdefault(tuple(p), len(index)) for p in prefixes]
    return [list(p) for p in index], torch.tensor(source, dtype=torch.long)


@dataclass
class _Batch:
    """The rows in the decode batch; every tensor is indexed by batch row."""

    rows: Tensor  # [B] the row's index in the call
    live: Tensor  # [B] bool: not finished
    positions: Tensor  # [B] position of the row's first generated token (its real prefix length)
    seeds: Tensor  # [B]
    banned: Tensor | None  # [B, V] bool
    mask: Tensor  # [B, capacity] long: attention mask over the cache columns

    def select(self, keep: Tensor) -> "_Batch":
        return _Batch(self.rows[keep], self.live[keep], self.positions[keep], self.seeds[keep],
                      None if self.banned is None else self.banned[keep], self.mask[keep])


@torch.no_grad()
def decode(model, prefixes: list[list[int]], seeds: Tensor, params: SamplingParams, *, stop_ids: list[int], pad_id: int,
           ban_rows: Tensor | None = None, ban_ids: list[int] = (), options: DecodeOptions = DecodeOptions()) -> Tensor:
    """Generated token ids [R, max_new_tokens] (CPU): each row's sampled tokens up to and including
    its first stop id, `pad_id` after. `seeds` [R] int64 keys each row's random stream (unused
    when greedy); rows where `ban_rows` [R] is set never sample `ban_ids` (meta `ban` mode)."""
    device = next(model.parameters()).device
    R, T = len(prefixes), params.max_new_tokens
    if R == 0:  # a rank with no rows in this call still joins its peers' forwards
        if lockstep.in_lockstep():
            lockstep.filler_forward(model, pad_id, device)
            _idle_until_all_done(model, pad_id, device)
        return torch.full((0, T), pad_id, dtype=torch.long)
    empty = [i for i, p in enumerate(prefixes) if not p]
    if empty:
        raise ValueError(f"decode: rows {empty[:5]} have an empty prompt; every row needs at least one token (e.g. BOS)")
    uniq, source = distinct_prefixes(prefixes) if options.share_prefix else ([list(p) for p in prefixes], torch.arange(R))
    logits, prefill, attn = _prefill(model, uniq, pad_id, device)
    source = source.to(device)
    P = attn.shape[1]
    capacity = compiled_step.round_capacity(P + T) if options.compiled else P + T
    cache = RowKVCache.from_prefill(prefill, source, capacity, static=options.compiled)
    del prefill
    batch = _Batch(rows=torch.arange(R, device=device), live=torch.ones(R, dtype=torch.bool, device=device),
                   positions=attn.sum(1).index_select(0, source), seeds=seeds.to(device=device, dtype=torch.long),
                   banned=_banned(ban_rows, ban_ids, logits.shape[-1], device),
                   mask=torch.zeros((R, capacity), dtype=torch.long, device=device))
    batch.mask[:, :P] = attn.index_select(0, source)
    logits = logits.index_select(0, source)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out = torch.full((R, T), pad_id, dtype=torch.long, device=device)
    step = compiled_step.compiled_decode_step(model) if options.compiled else _eager_step(model, options)
    sampler = compiled_step.compiled_sampler() if options.compiled else sample_tokens
    packed = options.compiled and compiled_step.uses_packed_attention(model)
    t = 0
    with compiled_step.packed_attention(model) if packed else contextlib.nullcontext():
        while True:
            tokens = _sample(sampler, logits, batch, t, params)
            tokens = torch.where(batch.live, tokens, pad_id)
            out[batch.rows, t] = tokens
            batch.live &= ~torch.isin(tokens, stops)
            done = t + 1 == T or not bool(batch.live.any())
            if not lockstep.any_rank(not done, device):
                break
            if done:  # this rank is done, a peer is not: match its forwards
                lockstep.filler_forward(model, pad_id, device)
                _idle_until_all_done(model, pad_id, device)
                break
            if options.compact:
                batch, tokens = _compact(batch, tokens, cache, options.compiled)
            t += 1
            batch.mask[:, P + t - 1] = 1  # the column the fed token is written to
            if packed:  # a ready boolean mask: no per-step mask construction, fixed shape
                mask = batch.mask[:, None, None, :].bool()
            else:
                mask = batch.mask if options.compiled else batch.mask[:, : P + t]
            logits = step(model, tokens[:, None], (batch.positions + t - 1)[:, None], mask, cache)
    return out.cpu()


def _eager_step(model, options: DecodeOptions):
    """`DirectDecoder` where it applies; the HF forward otherwise and in lockstep (whose peers'
    filler forwards are HF forwards over sharded weights)."""
    if options.direct and not lockstep.in_lockstep():
        direct = DirectDecoder.build(model)
        if direct is not None:
            return direct
    return compiled_step.decode_step


def _prefill(model, prefixes: list[list[int]], pad_id: int, device) -> tuple[Tensor, DynamicCache, Tensor]:
    """Last-position logits [U, V], the prefill's KV cache and the attention mask [U, P] of the
    left-padded distinct prefixes."""
    from selfdistill.rollout.base import pad_left

    ids, attn = pad_left(prefixes, pad_id)
    ids, attn = ids.to(device), attn.to(device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0), cache=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], cache, attn


def _banned(ban_rows: Tensor | None, ban_ids, vocab_size: int, device) -> Tensor | None:
    """[R, V] bool: `ban_ids` on the `ban_rows`; None when no row bans."""
    if ban_rows is None or not bool(ban_rows.any()) or not len(ban_ids):
        return None
    banned = torch.zeros((len(ban_rows), vocab_size), dtype=torch.bool, device=device)
    banned[ban_rows.to(device).nonzero(as_tuple=True)[0][:, None], torch.tensor(list(ban_ids), device=device)] = True
    return banned


def _sample(sampler, logits: Tensor, batch: _Batch, t: int, params: SamplingParams) -> Tensor:
    if batch.banned is not None:
        logits = logits.masked_fill(batch.banned, float("-inf"))
    step = torch.tensor(t, dtype=torch.long, device=logits.device)  # a tensor: one compiled sampler for every step
    return sampler(logits, batch.seeds, step, temperature=params.temperature, top_p=params.top_p, greedy=params.greedy)


def _compact(batch: _Batch, tokens: Tensor, cache: RowKVCache, compiled: bool) -> tuple[_Batch, Tensor]:
    """Drop finished rows once enough of them sit in the batch. Eager: when they are >= 1/8 of it.
    Compiled: only to power-of-two sizes, finished rows filling up to the size, so the compiled
    step sees few batch shapes."""
    B, live = len(batch.rows), int(batch.live.sum())
    size = compiled_step.bucket_size(live) if compiled else live
    if (compiled and size >= B) or (not compiled and B - live < max(1, B // COMPACT_FRACTION)):
        return batch, tokens
    keep = torch.argsort((~batch.live).to(torch.int8), stable=True)[:size]  # live rows first, in order
    cache.select_rows(keep)
    return batch.select(keep), tokens[keep]


def _idle_until_all_done(model, pad_id: int, device) -> None:
    """Lockstep: filler forwards while a peer still decodes."""
    while lockstep.any_rank(False, device):
        lockstep.filler_forward(model, pad_id, device)
