"""Packed rows for the log-prob forward: no padding, and each distinct prompt computed once.

A batch of rows (prompt + completion) laid out as [rows, prompt + completion] pays for every pad
position and recomputes a prompt for each of the n rows of its group. Packed, the rows become one
sequence of N tokens:

    [distinct prompt 0 | ... | distinct prompt U-1 | completions, longest first]

with each token at the position it has in its own row (a completion's first token sits right after
its prompt), so the decoder's projections, norms and MLPs run on the real tokens only, and a prompt
shared by n rows once. A row's last completion token is left out altogether: its state predicts
nothing and nothing attends to it. Attention is the one place the rows meet:
`grouped_prefix_attention` (an HF attention implementation, registered under `GROUPED_PREFIX`)
gathers the distinct prompts' queries and keys into [U, P] (causal), and the completions, in blocks
of `ROWS_PER_BLOCK` rows of similar length, into [n, T] queries against the keys of each row's
prompt and its own completion ([n, P + T], causal within the completion); it runs SDPA on each
block and writes the outputs back in packed order. Gathers are differentiable (`index_select`), so
the gradient a prompt key receives from its group's rows sums into that one prompt token.

Numerically this is the padded forward's computation on the same real tokens: the same positions,
the same set of keys per query, the same weights; only the float rounding of differently shaped
kernels differs.

`pack_rows` builds the sequence and its `GroupedPrefixLayout`; `grouped_prefix_attention_on`
switches the model to `GROUPED_PREFIX` (`config._attn_implementation`), and the packed forward
passes the layout as a keyword argument that HF hands on to every attention call. A forward
without a layout under the switch is an ordinary SDPA forward (its mask built by `sdpa_mask`), so
the switch may stay on over code that also runs unpacked forwards. A caller whose backward
recomputes the forward (activation checkpointing) keeps the switch on over the backward as well:
the recomputed layers look their attention function up again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

GROUPED_PREFIX = "selfdistill_grouped_prefix"
# A packed forward's attention mask: any 4D tensor makes HF's mask creation return it as it is (so
# no [N, N] mask is built for the packed sequence); `grouped_prefix_attention` ignores it.
NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


ROWS_PER_BLOCK = 16  # completion rows per attention call; rows of similar length share one (less padding)


@dataclass
class AttentionBlock:
    """One attention call over a [n, S] view of the packed sequence: query slots, their keys, the mask.

    Packed indices of pad slots point at token 0 (finite values, masked out as keys, their outputs
    dropped). Every query slot, pad slots included, sees at least one key, so no softmax is empty."""

    queries: Tensor  # [n, S] packed index of each query slot
    real: Tensor  # [n, S] bool: a real token (its output is kept)
    keys: Tensor  # [n, K] packed index of each key slot
    mask: Tensor  # [n, 1, S, K] bool: query slot s attends key slot k


@dataclass
class GroupedPrefixLayout:
    """The blocks attention runs: the distinct prompts (causal), then the completions in blocks of
    rows of similar length (each row against its prompt and, causally, its own completion). The
    packed sequence holds the blocks' real query tokens in this order, row-major."""

    blocks: list[AttentionBlock]
    calls: int = 0  # attention calls served (one per decoder layer per forward): proof the model used it


@dataclass
class PackedRows:
    input_ids: Tensor  # [1, N]
    position_ids: Tensor  # [1, N]
    layout: GroupedPrefixLayout
    predictors: Tensor  # [M] packed index of the state that predicts each completion token (row-major over the mask)


def packable(prompt_ids: list[list[int]], completion_mask: Tensor) -> bool:
    """Rows pack when every prompt has a token and every completion mask is a prefix (right padding)."""
    if not all(prompt_ids) or not bool(completion_mask.any()):
        return False
    lengths = completion_mask.sum(1, keepdim=True)
    return bool((completion_mask == (torch.arange(completion_mask.shape[1]) < lengths)).all())


def pack_rows(prompt_ids: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, device) -> PackedRows:
    """The packed sequence of the rows and its attention layout. Prompts are deduplicated by
    content. A row's last completion token is left out: its state predicts nothing and no later
    token attends to it. Completion rows enter in order of decreasing length, so each attention
    block pads to the longest of similar rows."""
    index: dict[tuple[int, ...], int] = {}
    source = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompt_ids], dtype=torch.long)
    prompts = [list(p) for p in index]
    p_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    P = int(p_len.max())
    c_len = completion_mask.sum(1).long()
    c_in = (c_len - 1).clamp(min=0)  # completion tokens that enter the sequence
    order = torch.argsort(c_in, descending=True, stable=True)
    order = order[c_in[order] > 0]
    p_start = torch.cumsum(p_len, 0) - p_len
    c_start = torch.zeros_like(c_len)
    c_start[order] = int(p_len.sum()) + torch.cumsum(c_in[order], 0) - c_in[order]

    slots_p = torch.arange(P)
    prompt_real = slots_p < p_len[:, None]
    prompt_index = torch.where(prompt_real, p_start[:, None] + slots_p, 0)
    causal_p = slots_p[None, :] <= slots_p[:, None]  # [query, key]
    blocks = [AttentionBlock(prompt_index, prompt_real, prompt_index, (causal_p[None] & prompt_real[:, None, :])[:, None])]
    ids, positions = [torch.tensor([t for p in prompts for t in p], dtype=torch.long)], [slots_p.expand(len(prompts), P)[prompt_real]]
    for rows in order.split(ROWS_PER_BLOCK) if len(order) else ():  # (split of nothing gives one empty chunk)
        T = int(c_in[rows[0]])
        slots_t = torch.arange(T)
        real = slots_t < c_in[rows][:, None]
        queries = torch.where(real, c_start[rows][:, None] + slots_t, 0)
        causal = (slots_t[None, :] <= slots_t[:, None])[None].expand(len(rows), T, T)
        mask = torch.cat([prompt_real[source[rows]][:, None, :].expand(len(rows), T, P), causal], dim=2)[:, None]
        blocks.append(AttentionBlock(queries, real, torch.cat([prompt_index[source[rows]], queries], dim=1), mask))
        ids.append(completion_ids[rows, :T][real])
        positions.append((p_len[source[rows]][:, None] + slots_t)[real])
    # Completion token t of row r is predicted by the state before it: its prompt's last token for
    # t = 0, its own token t - 1 after that.
    slots = torch.arange(completion_ids.shape[1])
    before = torch.where(slots == 0, (p_start + p_len - 1)[source][:, None], c_start[:, None] + slots - 1)

    def dev(x):
        return x.to(device, non_blocking=True)

    layout = GroupedPrefixLayout([AttentionBlock(*(dev(t) for t in (b.queries, b.real, b.keys, b.mask))) for b in blocks])
    return PackedRows(dev(torch.cat(ids))[None], dev(torch.cat(positions))[None], layout,
                      dev(before[completion_mask.bool()]))


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x [N, H, D] gathered to [n, H, S, D] by a packed index [n, S]."""
    n, S = index.shape
    return x.index_select(0, index.reshape(-1)).view(n, S, *x.shape[1:]).transpose(1, 2)


def _sdpa(module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout: float, scaling: float | None) -> Tensor:
    """[n, S, heads, D]. On CPU, SDPA reads each KV head for its group of query heads (`enable_gqa`;
    measured ~25% faster forward + backward than a repeated copy here); elsewhere HF's SDPA
    attention, which repeats K and V where a masked GQA call would fall back to the math kernel."""
    if q.device.type == "cpu" and q.shape[1] != k.shape[1]:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2)
    return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling)[0]


def grouped_prefix_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, grouped_layout: GroupedPrefixLayout | None = None,
                             **kwargs) -> tuple[Tensor, None]:
    """Attention over a packed sequence ([1, heads, N, head_dim] each), per `grouped_layout`; an
    ordinary SDPA attention for a forward without one."""
    if grouped_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, D]
    outputs = [_sdpa(module, _rows(q, b.queries), _rows(k, b.keys), _rows(v, b.keys), b.mask, dropout, scaling)[b.real]
               for b in grouped_layout.blocks]  # [n, S, heads, D] -> the real query slots, row-major
    grouped_layout.calls += 1
    return torch.cat(outputs)[None], None


AttentionInterface.register(GROUPED_PREFIX, grouped_prefix_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_PREFIX, sdpa_mask)


def supports_grouped_prefix(hf_model) -> bool:
    """The model's attention goes through HF's attention interface (so the switch reaches it), every
    layer attends fully causally (no sliding window), and it runs sdpa or eager (flash-attention and
    flex models keep their own kernels: the padded path)."""
    config = hf_model.config
    layer_types = getattr(config, "layer_types", None)
    full = all(t == "full_attention" for t in layer_types) if layer_types else getattr(config, "sliding_window", None) is None
    return (bool(getattr(type(hf_model), "_supports_attention_backend", False)) and full
            and config._attn_implementation in ("sdpa", "eager", GROUPED_PREFIX))


@contextlib.contextmanager
def grouped_prefix_attention_on(hf_model):
    """The model attends with `grouped_prefix_attention` inside (restored after; nests)."""
    config = hf_model.config
    previous = config._attn_implementation
    if previous == GROUPED_PREFIX:
        yield
        return
    config._attn_implementation = GROUPED_PREFIX
    try:
        yield
    finally:
        config._attn_implementation = previous
