"""`rollout.compile=true`: the decode step through `torch.compile`, over a static KV cache.

Every decode step then has the same shapes (the cache spans its whole capacity, unwritten columns
masked), so one compiled graph serves the whole rollout; on CUDA it is captured as a CUDA graph
(`mode="reduce-overhead"`), which removes the per-kernel launch cost that dominates decoding a
small model. To keep the shapes few across calls, the capacity is rounded up to a multiple of
`CAPACITY_QUANTUM` and the batch only shrinks to power-of-two sizes (`bucket_size`).

Grouped-query attention: HF's SDPA path folds a decode step's query heads onto their shared KV
head only outside torch.compile; traced, it repeats K and V per query head (a full copy of the
cache per layer per step). For an SDPA model the compiled step therefore runs with
`packed_gqa_sdpa` (registered as an HF attention implementation) and a ready-made boolean mask,
which skips HF's per-step mask construction. Other attention implementations keep their own.

The sampler (`compiled_sampler`) is compiled too: its counter-based noise is ~30 elementwise passes
over [rows, vocabulary] in eager mode, one fused kernel compiled.

Measured on a shared 2-core CPU (issue 17's tiny Qwen3 shape, 64 rows x <= 64 tokens): one compiled
decode step is ~10% faster than an eager one, a whole rollout no faster (0.68-0.71 s vs 0.56-0.79 s
of CPU time on one thread: the step is mostly matmul and attention kernels either way), and
compiling costs 20-60 s per process, so `rollout.compile` is off by default. Not yet run on a GPU,
where CUDA graphs are what it is for: each call's new cache buffers (and each compaction) are new
static addresses, so CUDA graphs are re-recorded per call and batch size; keeping the buffers
across calls is the next step there.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from selfdistill.rollout.sampling import sample_tokens

CAPACITY_QUANTUM = 32
PACKED_SDPA = "selfdistill_packed_gqa_sdpa"


def packed_gqa_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, dropout: float = 0.0,
                    scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """SDPA where a one-token query's heads ride on their KV head: [B, Hq, 1, D] is viewed as
    [B, Hkv, Hq/Hkv, D] against K, V [B, Hkv, L, D] (no copy of the cache); a [B, 1, 1, L] mask
    broadcasts over both. Anything else goes to HF's SDPA attention."""
    B, Hq, q_len, D = query.shape
    Hkv = key.shape[1]
    if q_len != 1 or Hq == Hkv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(B, Hkv, Hq // Hkv, D), key, value,
                                                           attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None


AttentionInterface.register(PACKED_SDPA, packed_gqa_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def uses_packed_attention(model) -> bool:
    return model.config._attn_implementation == "sdpa"


@contextlib.contextmanager
def packed_attention(model):
    """Run the model with `packed_gqa_sdpa` inside (SDPA models only; restored after)."""
    if not uses_packed_attention(model):
        yield
        return
    model.config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        model.config._attn_implementation = "sdpa"


def round_capacity(columns: int) -> int:
    return -(-columns // CAPACITY_QUANTUM) * CAPACITY_QUANTUM


def bucket_size(live: int) -> int:
    """The power-of-two batch size that holds `live` rows."""
    return 1 << max(live - 1, 0).bit_length()


def decode_step(model, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache) -> Tensor:
    """Logits [B, V] of one decode step (one token per row)."""
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                 use_cache=True).logits[:, -1]


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SAMPLER = []


def compiled_sampler():
    """`sample_tokens` compiled (the step index passed as a tensor, shapes dynamic): the ~30
    elementwise passes of the counter-based noise over [rows, vocab] become one kernel."""
    if not _SAMPLER:
        _SAMPLER.append(torch.compile(sample_tokens, dynamic=True))
    return _SAMPLER[0]


def compiled_decode_step(model):
    """`decode_step` compiled once per model (CUDA: with CUDA graphs)."""
    if model not in _COMPILED:
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        _COMPILED[model] = torch.compile(decode_step, mode=mode)
    return _COMPILED[model]
