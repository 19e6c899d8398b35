"""The counter-based sampler (selfdistill/rollout/sampling.py) against independent references:
Python big-integer arithmetic for the hash, a per-row loop for top-p, the softmax distribution for
the samples (chi-square over many seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfdistill.rollout.sampling import MIX_C1, MIX_C2, SPREAD, _mul32, counter_uniform, mix32, sample_tokens, top_p_keep


def _mix32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * MIX_C1) % 2**32
    x ^= x >> 15
    x = (x * MIX_C2) % 2**32
    return x ^ (x >> 16)


def _chi2_sf(stat: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_hash_matches_big_integer_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64)
    x[:3] = torch.tensor([0, 1, 2**32 - 1])
    for c in (MIX_C1, MIX_C2, SPREAD, 2**31 - 1):
        assert _mul32(x, c).tolist() == [(int(v) * c) % 2**32 for v in x]
    assert mix32(x).tolist() == [_mix32_reference(int(v)) for v in x]
    assert len(set(mix32(torch.arange(1 << 16)).tolist())) == 1 << 16  # a bijection: no collisions


def test_uniforms_are_keyed_by_seed_step_and_index_only():
    seeds = torch.tensor([3, 2**62 + 12345, 7, 2**63 - 1])
    u = counter_uniform(seeds, 5, 50)
    assert u.dtype == torch.float32 and bool((u > 0).all() and (u < 1).all())
    # Each row alone, and the rows in another order: the same numbers (no dependence on the batch).
    for i in range(4):
        assert torch.equal(counter_uniform(seeds[i:i + 1], 5, 50)[0], u[i])
    assert torch.equal(counter_uniform(seeds.flip(0), 5, 50), u.flip(0))
    # A longer vocabulary extends the row; another step or seed gives other numbers.
    assert torch.equal(counter_uniform(seeds, 5, 80)[:, :50], u)
    assert not torch.equal(counter_uniform(seeds, 6, 50), u)
    assert not torch.equal(counter_uniform(seeds + 1, 5, 50), u)


def test_uniforms_are_uniform_and_uncorrelated():
    seeds = torch.arange(4000) * 7919
    u = counter_uniform(seeds, 0, 256).double()
    counts = torch.histc(u, bins=32, min=0, max=1)
    expected = u.numel() / 32
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert _chi2_sf(stat, 31) > 1e-4, stat
    nxt = counter_uniform(seeds, 1, 256).double()
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:]), (u, nxt)):  # neighbouring index, seed, step
        r = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        assert abs(r) < 5 / math.sqrt(a.numel()), r


def _top_p_reference(probs: list[float], p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    keep, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        keep.add(i)
        mass += probs[i]
    return keep


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(64, 12, generator=g) * 2
    scores[:8, 3:6] = 1.5  # ties
    keep = top_p_keep(scores, top_p)
    probs = torch.softmax(scores.double(), -1)
    for r in range(64):
        assert set(keep[r].nonzero().flatten().tolist()) == _top_p_reference(probs[r].tolist(), top_p), r


def _assert_matches(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled outside the support"
    expected = probs[support] * len(tokens)
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    assert _chi2_sf(stat, int(support.sum()) - 1) > 1e-3, (counts.tolist(), expected.tolist())


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (1.0, 0.6)])
def test_samples_follow_the_tempered_top_p_softmax(temperature, top_p):
    """A 5-token vocabulary, one row per seed (20000 seeds): the sample frequencies match
    softmax(logits / T) restricted to the top-p set and renormalised (chi-square)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    N = 20000
    tokens = sample_tokens(logits.expand(N, -1), torch.arange(N) * 104729 + 17, 3, temperature=temperature, top_p=top_p,
                           greedy=False)
    probs = torch.softmax(logits.double() / temperature, -1)
    kept = torch.tensor(sorted(_top_p_reference(probs.tolist(), top_p)))
    target = torch.zeros_like(probs)
    target[kept] = probs[kept] / probs[kept].sum()
    _assert_matches(tokens, target)


def test_each_step_is_a_fresh_draw():
    logits = torch.zeros(5)
    seeds = torch.arange(2000)
    a = sample_tokens(logits.expand(2000, -1), seeds, 0, temperature=1.0, top_p=1.0, greedy=False)
    b = sample_tokens(logits.expand(2000, -1), seeds, 1, temperature=1.0, top_p=1.0, greedy=False)
    joint = torch.bincount(a * 5 + b, minlength=25).double()  # independent pairs: uniform over 25
    expected = 2000 / 25
    assert _chi2_sf(float(((joint - expected) ** 2 / expected).sum()), 24) > 1e-3


def test_greedy_is_argmax_and_ignores_seeds():
    logits = torch.tensor(np.random.default_rng(0).normal(size=(16, 30)), dtype=torch.float32)
    out = sample_tokens(logits, torch.arange(16), 0, temperature=0.5, top_p=0.5, greedy=True)
    assert torch.equal(out, logits.argmax(-1))


def test_banned_tokens_are_never_sampled():
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0]).expand(4000, -1).clone()
    logits[:, 0] = float("-inf")  # what the decode loop does for a banned token
    tokens = sample_tokens(logits, torch.arange(4000), 0, temperature=2.0, top_p=1.0, greedy=False)
    assert int((tokens == 0).sum()) == 0 and set(tokens.tolist()) == {1, 2, 3}
