"""Meta blocks and completion regions from token ids (SPEC sections 1 and 4): the one
implementation of the meta grammar.

Everything that needs to know where meta blocks are reads it from here: the region masks and
routing (`meta_regions`), the scorer's P / M / C split, the text the grader and PMI's boxed guard
search (`outside_meta_texts`, the pieces between blocks cut at token positions and decoded one by
one) and the emission metrics (`meta_structure_metrics`). Only the two special tokens count as
tags: the characters `<|meta|>` spelled out of ordinary tokens (a char tokenizer can sample them)
are ordinary text everywhere, so a decoded completion is never parsed for tags.

Block grammar (SPEC section 1): `<|meta|>` outside a block opens one; inside an open block a
further `<|meta|>` is content and the first `<|/meta|>` closes it; a `<|/meta|>` outside any block
is ordinary text; an opening tag with no closing tag makes a block that runs to the end.

That automaton has one bit of state, and the bit after any token is simply "the most recent tag
so far is `<|meta|>`": an open tag leaves us inside (opening or content), a close tag leaves us
outside (closing or stray). So the whole scan is one `cummax` over tag positions, no loop.

Regions (SPEC section 4): meta = every block including both tags (an unclosed block runs to the
end); answer = the tokens after the last meta block (the whole completion when there is none);
body = the rest. Padding (positions >= length) is in no region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

from selfdistill.rewards.common import mean_or_zero

if TYPE_CHECKING:
    from selfdistill.rollout.base import RolloutBatch


@dataclass(frozen=True)
class MetaRegions:
    """Per-row meta structure of a [B, T] batch of completions. Positions are 0-based indices
    into the completion; -1 means "none".

    valid, meta, answer, body: bool [B, T]; meta | answer | body == valid, pairwise disjoint.
    block_count: long [B], meta blocks (closed or not). closed_block_count: long [B].
    emitted: bool [B], block_count > 0 (cf's "rollout emitted a meta block").
    unclosed: bool [B], the last block has no closing tag (so the answer region is empty).
    first_open: long [B], position of the first block's `<|meta|>` (gm's X and PMI-shift's open
    context end just before it).
    first_closed_start / first_closed_end: long [B], positions of the `<|meta|>` and `<|/meta|>`
    of the first closed block M, both inclusive (-1 when the row has no closed block). Only the
    last block can be unclosed, so M is always the first block when it exists: prefix P =
    ids[:start], M = ids[start:end + 1], continuation C = ids[end + 1:length].
    opening / closing: bool [B, T], the tags that open / close a block (a `<|meta|>` inside an
    open block and a stray `<|/meta|>` are neither).
    """

    valid: Tensor
    meta: Tensor
    answer: Tensor
    body: Tensor
    block_count: Tensor
    closed_block_count: Tensor
    emitted: Tensor
    unclosed: Tensor
    first_open: Tensor
    first_closed_start: Tensor
    first_closed_end: Tensor
    opening: Tensor
    closing: Tensor

    @property
    def non_meta(self) -> Tensor:
        """body + answer: where the correctness advantage goes (SPEC section 4)."""
        return self.valid & ~self.meta

    @property
    def has_closed_block(self) -> Tensor:
        return self.first_closed_start >= 0

    def block_spans(self, row: int) -> list[tuple[int, Optional[int]]]:
        """The meta blocks of one row as (open, close) token positions, both inclusive; close is
        None for an unclosed block (only the last one can be)."""
        opens = self.opening[row].nonzero().flatten().tolist()
        closes = self.closing[row].nonzero().flatten().tolist()
        return [(o, closes[k] if k < len(closes) else None) for k, o in enumerate(opens)]

    def outside_spans(self, row: int) -> list[tuple[int, int]]:
        """The pieces of one row between its meta blocks as [start, end) token positions, in order
        (SPEC section 1): before the first block, between blocks, after the last closed one. A
        piece may be empty (two adjacent blocks); an unclosed block leaves no piece after it."""
        pieces, pos = [], 0
        for start, end in self.block_spans(row):
            pieces.append((pos, start))
            if end is None:
                return pieces
            pos = end + 1
        pieces.append((pos, int(self.valid[row].sum())))
        return pieces


def _first_index(mask: Tensor) -> Tensor:
    """Index of the first True per row of [B, T], -1 where none."""
    if mask.shape[1] == 0:
        return torch.full(mask.shape[:1], -1, dtype=torch.long, device=mask.device)
    # argmax returns the first maximal index (documented), so this is the first True.
    idx = mask.to(torch.int8).argmax(dim=1)
    return torch.where(mask.any(dim=1), idx, torch.full_like(idx, -1))


def meta_regions(completion_ids: Tensor, lengths: Tensor, meta_open_id: int, meta_close_id: int) -> MetaRegions:
    """Meta blocks and region masks of padded completions, vectorised over the batch.

    completion_ids: long [B, T], right-padded (pad values are ignored). lengths: [B], the number
    of real tokens of each row; regions cover positions < length. Pass the length the region masks
    should cover: the loss's tokens (EOS included if the loss trains it). Scored spans exclude EOS
    (SPEC section 1): the scorer trims C itself.
    """
    if meta_open_id == meta_close_id:
        raise ValueError(f"meta_open_id and meta_close_id are both {meta_open_id}; they must be two different special tokens")
    if completion_ids.dim() != 2:
        raise ValueError(f"meta_regions: completion_ids must be [B, T]; got {tuple(completion_ids.shape)}")
    B, T = completion_ids.shape
    lengths = torch.as_tensor(lengths, device=completion_ids.device).long()
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"meta_regions: lengths has shape {tuple(lengths.shape)}, expected ({B},)")
    if ((lengths < 0) | (lengths > T)).any():
        raise ValueError(f"meta_regions: lengths must lie in [0, {T}]; got {lengths.tolist()}")

    pos = torch.arange(T, device=completion_ids.device).unsqueeze(0).expand(B, T)
    valid = pos < lengths.unsqueeze(1)
    is_open = (completion_ids == meta_open_id) & valid
    is_close = (completion_ids == meta_close_id) & valid
    is_tag = is_open | is_close

    # State after token t = "the last tag at or before t is <|meta|>".
    last_tag = torch.where(is_tag, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    inside_after = (last_tag >= 0) & is_open.gather(1, last_tag.clamp(min=0))
    inside_before = torch.cat([torch.zeros_like(inside_after[:, :1]), inside_after[:, :-1]], dim=1)
    opening = is_open & ~inside_before  # a <|meta|> that starts a block
    closing = is_close & inside_before  # the <|/meta|> that ends one

    meta = (inside_after | closing) & valid
    last_meta = torch.where(meta, pos, torch.full_like(pos, -1)).max(dim=1).values if T else lengths.new_full((B,), -1)
    answer = valid & (pos > last_meta.unsqueeze(1))
    body = valid & ~meta & ~answer

    block_count = opening.sum(dim=1)
    closed_count = closing.sum(dim=1)
    last_valid = (lengths - 1).clamp(min=0).unsqueeze(1)
    unclosed = (lengths > 0) & inside_after.gather(1, last_valid).squeeze(1) if T else torch.zeros(B, dtype=torch.bool)
    first_open = _first_index(opening)
    first_close = _first_index(closing)
    has_closed = first_close >= 0
    none = torch.full_like(first_open, -1)
    return MetaRegions(
        valid=valid,
        meta=meta,
        answer=answer,
        body=body,
        block_count=block_count,
        closed_block_count=closed_count,
        emitted=block_count > 0,
        unclosed=unclosed,
        first_open=first_open,
        first_closed_start=torch.where(has_closed, first_open, none),
        first_closed_end=torch.where(has_closed, first_close, none),
        opening=opening,
        closing=closing,
    )


def _padded(ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Unpadded id lists as (ids [B, T], lengths [B]); the padding value is never read."""
    T = max((len(x) for x in ids), default=0)
    out = torch.zeros((len(ids), T), dtype=torch.long)
    for b, x in enumerate(ids):
        out[b, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
    return out, torch.tensor([len(x) for x in ids], dtype=torch.long)


def meta_block_spans(ids: Sequence[int], meta_open_id: int, meta_close_id: int) -> list[tuple[int, Optional[int]]]:
    """The meta blocks of one completion (already trimmed to its length) as (open, close) token
    positions, close None for an unclosed block: `meta_regions` of that one row."""
    padded, lengths = _padded([ids])
    return meta_regions(padded, lengths, meta_open_id, meta_close_id).block_spans(0)


def content_ids(batch: "RolloutBatch", eos_id: Optional[int]) -> list[list[int]]:
    """Each completion's sampled (and forced) ids without padding and without a final EOS: what
    scoring contexts, the grader's text and the meta structure are taken from (SPEC section 1)."""
    out = []
    for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist()):
        ids = row[: int(n)]
        if ids and eos_id is not None and ids[-1] == eos_id:
            ids = ids[:-1]
        out.append(ids)
    return out


def content_regions(batch: "RolloutBatch", eos_id: Optional[int], meta_ids: tuple[int, int]) -> tuple[list[list[int]], MetaRegions]:
    """(`content_ids` of the batch, their `meta_regions` on the CPU): the completions' meta
    structure as the scorer and the meta metrics see it (EOS and padding cut)."""
    ids = content_ids(batch, eos_id)
    return ids, meta_regions(batch.completion_ids.cpu(), torch.tensor([len(x) for x in ids]), *meta_ids)


def outside_meta_texts(ids: Sequence[Sequence[int]], tokenizer, meta_ids: tuple[int, int]) -> list[list[str]]:
    """Per completion (unpadded ids, EOS cut: `content_ids`), the text of each piece outside its
    meta blocks (`MetaRegions.outside_spans`), in order. This is what the grader and PMI's boxed
    guard search (SPEC section 1: the last complete `\\boxed{}` lying inside one piece).

    Pieces are cut at the tag tokens and decoded one by one with special tokens kept, so a stray
    `<|/meta|>` token reads as its text (it is ordinary text) and a `<|meta|>` spelled out of
    ordinary tokens stays text inside its piece. (A SentencePiece-style tokenizer may decode a
    piece's leading space differently from the whole text; answers are stripped, so no answer
    changes.)
    """
    padded, lengths = _padded(ids)
    regions = meta_regions(padded, lengths, *meta_ids)
    spans = [regions.outside_spans(b) for b in range(len(ids))]
    flat = [list(ids[b][start:end]) for b, row in enumerate(spans) for start, end in row]
    decoded = iter(tokenizer.batch_decode(flat, skip_special_tokens=False) if flat else [])
    return [[next(decoded) for _ in row] for row in spans]


def rollout_outside_meta_texts(batch: "RolloutBatch", tokenizer, meta_ids: tuple[int, int]) -> list[list[str]]:
    """`outside_meta_texts` of a rollout batch: the grader's input for these completions."""
    return outside_meta_texts(content_ids(batch, tokenizer.eos_token_id), tokenizer, meta_ids)


def meta_emitted(regions: MetaRegions, with_arm: Tensor) -> Tensor:
    """bool [rollouts allowed to write meta]: for each with-arm rollout, whether its token ids hold
    a meta block (an opening `<|meta|>` token, closed or not). Without-arm rollouts are left out:
    their forced placebo block is not the policy's meta, and under `ban` they cannot write one."""
    arm = torch.as_tensor(with_arm, device=regions.emitted.device).bool()
    if arm.shape != regions.emitted.shape:
        raise ValueError(f"meta_emitted: with_arm has shape {tuple(arm.shape)}, expected {tuple(regions.emitted.shape)}")
    return regions.emitted[arm]


def meta_structure_metrics(regions: MetaRegions, with_arm: Tensor) -> dict[str, float]:
    """The policy's meta writing, over the with-arm rollouts (`meta_emitted`), from token ids:
    `meta/emission_rate` = share of them with a meta block (SPEC section 6 asks to measure it);
    `meta/blocks_per_rollout` = mean number of blocks; `meta/mean_len` = mean meta tokens (tags
    included) of those that wrote one. 0.0 for an empty set, so every rank logs finite keys."""
    arm = torch.as_tensor(with_arm, device=regions.emitted.device).bool()
    emitted = meta_emitted(regions, arm)
    return {
        "meta/emission_rate": mean_or_zero(emitted),
        "meta/blocks_per_rollout": mean_or_zero(regions.block_count[arm]),
        "meta/mean_len": mean_or_zero(regions.meta.sum(1)[arm][emitted]),
    }
