"""SDFT's data order in the prompt sampler (SPEC section 6): curriculum by sort key, 3-pass batching
(sorted, shuffled, sorted), a subset of the items, and resume mid-pass."""

from __future__ import annotations

import random

import pytest

from selfdistill.data.sampler import PromptSampler

KEYS = [5, 1, 4, 1, 3, 9, 2, 6]  # ties (1, 1) go by index
SORTED = [1, 3, 6, 4, 2, 0, 7, 5]


def _shuffled(seed: int, epoch: int, n: int) -> list[int]:
    perm = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return perm


def test_curriculum_order_is_ascending_key_every_epoch():
    s = PromptSampler(8, seed=3)
    s.set_order("sorted", KEYS)
    assert s.next_batch(5) + s.next_batch(5) + s.next_batch(6) == SORTED + SORTED


def test_three_pass_is_sorted_then_shuffled_then_sorted_and_batches_run_across_passes():
    s = PromptSampler(8, seed=3)
    s.set_order("three_pass", KEYS)
    stream = [i for _ in range(8) for i in s.next_batch(4)]  # 32 items: passes 1-3 and the next cycle's first
    assert stream == SORTED + _shuffled(3, 1, 8) + SORTED + SORTED
    assert _shuffled(3, 1, 8) != SORTED
    assert [s.epoch_kind(e) for e in range(6)] == ["sorted", "shuffled", "sorted"] * 2


def test_default_order_is_unchanged_by_the_orders():
    """The RL and SFT stages keep drawing the seeded permutation per epoch they always drew."""
    s = PromptSampler(8, seed=7)
    assert s.next_batch(8) + s.next_batch(8) == _shuffled(7, 0, 8) + _shuffled(7, 1, 8)


def test_limit_draws_from_the_first_items_only():
    s = PromptSampler(20, seed=1)
    s.set_order("sorted", KEYS, limit=8)
    assert s.next_batch(8) == SORTED and s.size == 8
    with pytest.raises(ValueError, match="one sort key per item"):
        s.set_order("sorted", KEYS, limit=9)


@pytest.mark.parametrize("drawn", [3, 10, 13, 20])  # inside pass 1, 2 (straddling), 2, 3
def test_resume_mid_pass_continues_the_same_stream(drawn):
    whole = PromptSampler(8, seed=5)
    whole.set_order("three_pass", KEYS)
    full = whole.next_batch(30)

    first = PromptSampler(8, seed=5)
    first.set_order("three_pass", KEYS)
    head = first.next_batch(drawn)
    resumed = PromptSampler(8, seed=5)
    resumed.load_state_dict(first.state_dict())
    resumed.set_order("three_pass", KEYS, restart=False)
    assert head + resumed.next_batch(30 - drawn) == full


def test_resume_refuses_another_order_or_forgotten_keys():
    s = PromptSampler(8, seed=5)
    s.set_order("three_pass", KEYS)
    s.next_batch(3)
    other = PromptSampler(8, seed=5)
    other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="drawn in order 'three_pass'"):
        other.set_order("sorted", KEYS, restart=False)
    with pytest.raises(RuntimeError, match="without its sort keys"):
        other.next_batch(1)
    with pytest.raises(ValueError, match="needs one sort key per item"):
        PromptSampler(8, seed=5).set_order("three_pass")
