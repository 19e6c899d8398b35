"""Packed rows for the log-prob forward: no padding, and each distinct prompt computed once.

A batch of rows (prompt + completion) laid out as [rows, prompt + completion] pays for every pad
position and recomputes a prompt for each of the n rows of its group. Packed, the rows become one
sequence of N tokens:

    [distinct prompt 0 | ... | distinct prompt U-1 | completion 0 | ... | completion R-1]

with each token at the position it has in its own row (a completion's first token sits right after
its prompt), so the decoder's projections, norms and MLPs run on the real tokens only, and a prompt
shared by n rows once. Attention is the one place the rows meet: `grouped_prefix_attention` (an HF
attention implementation, registered under `GROUPED_PREFIX`) gathers each distinct prompt's queries
and keys into [U, P] (causal), and each completion's queries into [R, T] against the keys of its
own prompt and its own completion ([R, P + T], causal within the completion), runs SDPA on both and
writes the outputs back to the packed order. Gathers are differentiable (`index_select`), so the
gradient a prompt key receives from its group's rows sums into that one prompt token.

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


@dataclass
class GroupedPrefixLayout:
    """Where each packed token sits in the per-prompt and per-completion views attention uses.

    Packed indices of pad slots point at token 0 (finite values, masked out as keys, their outputs
    dropped). Every query row, pad rows included, sees at least one key, so no softmax is empty."""

    prompt_index: Tensor  # [U, P] packed index of prompt slot j of distinct prompt u (right-padded)
    prompt_real: Tensor  # [U, P] bool
    prompt_mask: Tensor  # [U, 1, P, P] bool: key j' <= j and j' a real prompt token
    completion_index: Tensor  # [R, T] packed index of completion slot t of row r (right-padded)
    completion_real: Tensor  # [R, T] bool
    key_index: Tensor  # [R, P + T] packed index of row r's keys: its prompt's slots, then its completion's
    completion_mask: Tensor  # [R, 1, T, P + T] bool: a real prompt key, or a completion key at t' <= t
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
    """The packed sequence of the rows (prompts deduplicated by content) and its attention layout."""
    index: dict[tuple[int, ...], int] = {}
    source = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompt_ids], dtype=torch.long)
    prompts = [list(p) for p in index]
    p_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    c_len = completion_mask.sum(1).long()
    U, (R, T), P = len(prompts), completion_ids.shape, int(p_len.max())
    p_start = torch.cumsum(p_len, 0) - p_len
    c_start = int(p_len.sum()) + torch.cumsum(c_len, 0) - c_len

    slots_p, slots_t = torch.arange(P), torch.arange(T)
    prompt_real = slots_p < p_len[:, None]
    prompt_index = torch.where(prompt_real, p_start[:, None] + slots_p, 0)
    completion_real = slots_t < c_len[:, None]
    completion_index = torch.where(completion_real, c_start[:, None] + slots_t, 0)
    key_index = torch.cat([prompt_index[source], completion_index], dim=1)
    causal_p = slots_p[None, :] <= slots_p[:, None]  # [P(query), P(key)]
    prompt_mask = (causal_p[None] & prompt_real[:, None, :])[:, None]
    key_prompt = prompt_real[source][:, None, :].expand(R, T, P)
    key_completion = (slots_t[None, :] <= slots_t[:, None])[None].expand(R, T, T)
    completion_mask_4d = torch.cat([key_prompt, key_completion], dim=2)[:, None]

    input_ids = torch.cat([torch.tensor([t for p in prompts for t in p], dtype=torch.long),
                           completion_ids[completion_real]])
    position_ids = torch.cat([slots_p.expand(U, P)[prompt_real], (p_len[source][:, None] + slots_t)[completion_real]])
    # Completion token t of row r is predicted by the state before it: its prompt's last token for
    # t = 0, its own token t - 1 after that.
    before = torch.where(slots_t == 0, (p_start + p_len - 1)[source][:, None], completion_index - 1)
    predictors = before[completion_real]

    def dev(x):
        return x.to(device, non_blocking=True)

    layout = GroupedPrefixLayout(dev(prompt_index), dev(prompt_real), dev(prompt_mask), dev(completion_index),
                                 dev(completion_real), dev(key_index), dev(completion_mask_4d))
    return PackedRows(dev(input_ids)[None], dev(position_ids)[None], layout, dev(predictors))


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x [N, H, D] gathered to [n, H, S, D] by a packed index [n, S]."""
    n, S = index.shape
    return x.index_select(0, index.reshape(-1)).view(n, S, *x.shape[1:]).transpose(1, 2)


def grouped_prefix_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, grouped_layout: GroupedPrefixLayout | None = None,
                             **kwargs) -> tuple[Tensor, None]:
    """Attention over a packed sequence ([1, heads, N, head_dim] each), per `grouped_layout`; an
    ordinary SDPA attention for a forward without one."""
    if grouped_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    lay = grouped_layout
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [N, heads, D]
    out_p, _ = sdpa_attention_forward(module, _rows(q, lay.prompt_index), _rows(k, lay.prompt_index),
                                      _rows(v, lay.prompt_index), lay.prompt_mask, dropout=dropout, scaling=scaling)
    out_c, _ = sdpa_attention_forward(module, _rows(q, lay.completion_index), _rows(k, lay.key_index),
                                      _rows(v, lay.key_index), lay.completion_mask, dropout=dropout, scaling=scaling)
    lay.calls += 1
    # [n, S, heads, D] -> the real slots, in packed order (prompts, then completions, row-major)
    return torch.cat([out_p[lay.prompt_real], out_c[lay.completion_real]])[None], None


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
