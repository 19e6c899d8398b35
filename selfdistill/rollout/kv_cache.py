"""The decode loop's KV cache: one preallocated [rows, kv_heads, capacity, head_dim] buffer per layer.

Column layout (the same for every row): the left-padded prefixes fill columns [0, P), and decode
step t writes column P + t - 1 for every row in the batch. The prefixes are prefilled once per
distinct prefix into an HF `DynamicCache`; `RowKVCache.from_prefill` copies each prefix's keys and
values into the rows that start from it (the prefill's compute is shared; each row then owns its
copy, so rows can leave the batch independently).

Two layer kinds behind HF's `Cache` interface, so any HF decoder's forward (and its mask
creation) drives them:
- `GrowingLayer` (eager): attention sees the filled columns only, a view of the buffer, so a step
  costs what the sequence so far costs, and nothing is re-concatenated per token (HF's
  `DynamicLayer` copies the whole cache at every step).
- HF's `StaticLayer` (`static=True`, for `torch.compile`): attention always spans the whole
  capacity (masked), so every decode step has the same shapes and the compiled graph is reused.

`select_rows` keeps a subset of the rows (finished rows leaving the batch).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, StaticLayer


class GrowingLayer(CacheLayerMixin):
    """A preallocated layer whose update writes the next columns and returns the filled view."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, length: int):
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("GrowingLayer is allocated by RowKVCache.from_prefill, never lazily")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RowKVCache(Cache):
    """Per-row KV buffers for the decode loop (see the module docstring)."""

    def __init__(self, layers: list, static: bool):
        super().__init__(layers=layers)
        self.static = static

    @classmethod
    def from_prefill(cls, prefill: DynamicCache, row_source: Tensor, capacity: int, static: bool) -> "RowKVCache":
        """Rows' caches from the prefixes' prefill: row r starts as prefix `row_source[r]`."""
        layers = []
        for i, layer in enumerate(prefill.layers):
            if type(layer) is not DynamicLayer:  # sliding-window, linear-attention, quantized, ...
                raise NotImplementedError(f"the decode loop supports full-attention KV caches only; layer {i} of this model "
                                          f"caches with {type(layer).__name__}")
            _, H, P, D = layer.keys.shape
            keys = layer.keys.new_zeros((len(row_source), H, capacity, D))
            values = layer.values.new_zeros((len(row_source), H, capacity, layer.values.shape[-1]))
            keys[:, :, :P] = layer.keys.index_select(0, row_source)
            values[:, :, :P] = layer.values.index_select(0, row_source)
            layers.append(_static_layer(keys, values, P) if static else GrowingLayer(keys, values, P))
        return cls(layers, static)

    @property
    def length(self) -> int:
        """Columns filled so far (prefix padding included)."""
        layer = self.layers[0]
        return int(layer.cumulative_length) if self.static else layer.length

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def select_rows(self, keep: Tensor) -> None:
        """Keep the rows `keep` (in that order): one gather per buffer, whole rows (the columns not
        yet written hold the zeros they were allocated with, which the static cache's masked
        attention relies on)."""
        n = self.length
        for i, layer in enumerate(self.layers):
            keys, values = layer.keys.index_select(0, keep), layer.values.index_select(0, keep)
            self.layers[i] = _static_layer(keys, values, n) if self.static else GrowingLayer(keys, values, n)


def _static_layer(keys: Tensor, values: Tensor, length: int) -> StaticLayer:
    """HF's StaticLayer over given buffers (what its lazy_initialization would allocate), `length`
    columns filled."""
    layer = StaticLayer(max_cache_len=keys.shape[2])
    layer.device = keys.device
    layer.batch_size, layer.num_heads = keys.shape[:2]
    layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
    layer.keys, layer.values = keys, values
    layer.cumulative_length = torch.tensor(length, dtype=torch.long, device=keys.device)
    # Fixed addresses: in-place cache writes do not break a compiled graph (or a CUDA graph).
    for t in (layer.keys, layer.values, layer.cumulative_length):
        torch._dynamo.mark_static_address(t)
    layer.is_initialized = True
    return layer
