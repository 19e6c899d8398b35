"""Meta blocks and completion regions from token ids (SPEC sections 1 and 4).

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
from typing import Optional, Sequence

import torch
from torch import Tensor


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

    @property
    def non_meta(self) -> Tensor:
        """body + answer: where the correctness advantage goes (SPEC section 4)."""
        return self.valid & ~self.meta

    @property
    def has_closed_block(self) -> Tensor:
        return self.first_closed_start >= 0


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
    )


def meta_block_spans(ids: Sequence[int], meta_open_id: int, meta_close_id: int) -> list[tuple[int, Optional[int]]]:
    """The meta blocks of one completion (already trimmed to its length) as (open, close) token
    positions, close None for an unclosed block. The plain per-token automaton of SPEC section 1;
    `meta_regions` is its vectorised form and is tested against it."""
    if meta_open_id == meta_close_id:
        raise ValueError(f"meta_open_id and meta_close_id are both {meta_open_id}; they must differ")
    spans: list[tuple[int, Optional[int]]] = []
    start: Optional[int] = None
    for i, tok in enumerate(ids):
        if start is None:
            if tok == meta_open_id:
                start = i
            # a <|/meta|> here is stray: ordinary text
        elif tok == meta_close_id:
            spans.append((start, i))
            start = None
        # a <|meta|> inside an open block is content
    if start is not None:
        spans.append((start, None))
    return spans
