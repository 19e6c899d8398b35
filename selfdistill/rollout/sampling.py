"""Per-row seeded sampling for the whole batch at once: temperature, top-p, then Gumbel-max.

argmax(logits / T + g) with g_v i.i.d. standard Gumbel is an exact sample of softmax(logits / T)
(restricted to the top-p set when top_p < 1). The noise g comes from a counter-based stream: the
uniform behind g_v at decode step t of a row is a hash of (row seed, t, v). So a row's sample
depends only on its seed, the step and its logits, never on which rows share the batch, their
order, the rank, or the global RNG (what makes 1-rank and N-rank GRPO sample the same completions,
and a resumed run exact), and the whole [rows, vocab] noise is one batch of elementwise integer
ops (no Python loop per row, no per-row torch.Generator).

The hash works on 32-bit words held in int64 tensors: two rounds of a xorshift-multiply mixer (the
form of MurmurHash3's finalizer, here with 31-bit odd multipliers so that every product of a
32-bit word stays below 2^63: exact in int64, no reliance on overflow, which is undefined in C++
and so in the CPU kernels, Triton and inductor code that run it), keyed by two words derived from
(seed, t). The top 24 bits give u = (h + 0.5) / 2^24 in (0, 1), exactly representable in fp32,
and g = -log(-log(u)). On a CPU the noise costs ~30 elementwise passes over [rows, vocab]: noise
for a 152k vocabulary is slow there (the compiled decode step fuses it into one kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
SPREAD = 0x61C88647  # 2^32 minus 2^32/golden ratio (Fibonacci hashing): spreads consecutive counters
MIX_C1, MIX_C2 = 0x7FEB352D, 0x21F0AAAD  # odd multipliers of the xorshift-multiply mixer
KEY_C1, KEY_C2 = 0x27D4EB2F, 0x165667B1  # separate the step and the two key words
# Every multiplier is below 2^31, so a 32-bit word times one stays below 2^63.


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) and c < 2^31, exact in int64."""
    return (x * c) & MASK32


def mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit mixer (xorshift-multiply, full avalanche) on int64 tensors holding values
    in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def row_keys(seeds: Tensor, step: int | Tensor) -> tuple[Tensor, Tensor]:
    """Two 32-bit key words per row from its 63-bit seed and the decode step (< 2^31)."""
    seeds = seeds.to(torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    t = mix32(_mul32(step, SPREAD) ^ KEY_C1)
    k1 = mix32((seeds & MASK32) ^ t)
    k2 = mix32(((seeds >> 32) & MASK32) ^ mix32(k1 ^ KEY_C2))
    return k1, k2


def counter_uniform(seeds: Tensor, step: int | Tensor, vocab_size: int) -> Tensor:
    """u [R, V] fp32 in (0, 1): a hash of (seeds[r], step, v), the same for a row in any batch."""
    k1, k2 = row_keys(seeds, step)
    v = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    h = mix32((_mul32(v, SPREAD)[None, :] + k1[:, None]) & MASK32)
    h = mix32(h ^ k2[:, None])
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
