"""Per-row seeded sampling for the whole batch at once: temperature, top-p, then Gumbel-max.

argmax(logits / T + g) with g_v i.i.d. standard Gumbel is an exact sample of softmax(logits / T)
(restricted to the top-p set when top_p < 1). The noise g comes from a counter-based stream: the
uniform behind g_v at decode step t of a row is a hash of (row seed, t, v). So a row's sample
depends only on its seed, the step and its logits, never on which rows share the batch, their
order, the rank, or the global RNG (what makes 1-rank and N-rank GRPO sample the same completions,
and a resumed run exact), and the whole [rows, vocab] noise is one batch of elementwise integer
ops (no Python loop per row, no per-row torch.Generator).

The hash works on 32-bit words held in int64 tensors, with multiplications split into 16-bit
limbs so that no intermediate leaves int64's range (signed overflow is undefined in C++, and the
CPU kernels, Triton and inductor all compile such code): two rounds of MurmurHash3's 32-bit
finalizer (`fmix32`, a bijection with full avalanche), keyed by two words derived from (seed, t).
The top 24 bits give u = (h + 0.5) / 2^24 in (0, 1), exactly representable in fp32, and
g = -log(-log(u)).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive vocabulary indices
FMIX_C1, FMIX_C2 = 0x85EBCA6B, 0xC2B2AE35  # MurmurHash3 fmix32 multipliers
KEY_C1, KEY_C2 = 0x27D4EB2F, 0x165667B1  # xxHash32 primes: separate the two key words


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) and a 32-bit constant c, without leaving int64's range."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((((x * hi) & 0xFFFF) << 16) + x * lo) & MASK32


def fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_C2)
    return x ^ (x >> 16)


def row_keys(seeds: Tensor, step: int | Tensor) -> tuple[Tensor, Tensor]:
    """Two 32-bit key words per row from its 63-bit seed and the decode step."""
    seeds = seeds.to(torch.int64)
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    t = fmix32(_mul32(torch.as_tensor(step, dtype=torch.int64, device=seeds.device) & MASK32, GOLDEN) ^ KEY_C1)
    k1 = fmix32(lo ^ t)
    k2 = fmix32(hi ^ _mul32(k1 ^ KEY_C2, GOLDEN))
    return k1, k2


def counter_uniform(seeds: Tensor, step: int | Tensor, vocab_size: int) -> Tensor:
    """u [R, V] fp32 in (0, 1): a hash of (seeds[r], step, v), the same for a row in any batch."""
    k1, k2 = row_keys(seeds, step)
    v = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    h = fmix32((_mul32(v, GOLDEN)[None, :] + k1[:, None]) & MASK32)
    h = fmix32(h ^ k2[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seeds: Tensor, step: int | Tensor, vocab_size: int) -> Tensor:
    return -torch.log(-torch.log(counter_uniform(seeds, step, vocab_size)))


def top_p_keep(scores: Tensor, top_p: float) -> Tensor:
    """Bool [R, V]: the smallest set of most probable tokens whose probability reaches `top_p`
    (a token is kept when the mass of the tokens ranked above it is < top_p; the top one always).
    Ties are ranked by vocabulary index (stable sort), so the set is a function of the row."""
    probs = torch.softmax(scores, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_tokens(logits: Tensor, seeds: Tensor, step: int | Tensor, *, temperature: float, top_p: float,
                  greedy: bool) -> Tensor:
    """Next token [R] from logits [R, V] (banned tokens already -inf): argmax when `greedy`, else
    the seeded Gumbel-max sample of softmax(logits / temperature) within the top-p set."""
    if greedy:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_p < 1.0:
        scores = scores.masked_fill(~top_p_keep(scores, top_p), float("-inf"))
    return (scores + gumbel_noise(seeds, step, scores.shape[-1])).argmax(-1)
