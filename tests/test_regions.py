"""Meta blocks and region masks (SPEC sections 1 and 4), hand-worked token by token."""

import random

import pytest
import torch

from selfdistill.rewards.regions import meta_block_spans, meta_regions

O, C, PAD = 100, 101, 0  # <|meta|>, <|/meta|>, padding


def regions_of(rows, lengths=None):
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (T - len(r)) for r in rows])
    lengths = torch.tensor(lengths if lengths is not None else [len(r) for r in rows])
    return meta_regions(ids, lengths, O, C)


def positions(mask_row):
    return [i for i, v in enumerate(mask_row.tolist()) if v]


def test_one_closed_block():
    r = regions_of([[5, 6, O, 7, 8, C, 9, 10]])
    assert positions(r.meta[0]) == [2, 3, 4, 5]
    assert positions(r.answer[0]) == [6, 7]
    assert positions(r.body[0]) == [0, 1]
    assert r.first_open.tolist() == [2]
    assert (r.first_closed_start.tolist(), r.first_closed_end.tolist()) == ([2], [5])
    assert r.block_count.tolist() == [1] and r.closed_block_count.tolist() == [1]
    assert r.emitted.tolist() == [True] and r.unclosed.tolist() == [False]


def test_unclosed_block_runs_to_end():
    r = regions_of([[5, O, 7, 8]])
    assert positions(r.meta[0]) == [1, 2, 3]
    assert positions(r.answer[0]) == []
    assert positions(r.body[0]) == [0]
    assert r.first_open.tolist() == [1]
    assert r.first_closed_start.tolist() == [-1] and r.first_closed_end.tolist() == [-1]
    assert r.has_closed_block.tolist() == [False]
    assert r.block_count.tolist() == [1] and r.closed_block_count.tolist() == [0]
    assert r.emitted.tolist() == [True] and r.unclosed.tolist() == [True]


def test_nested_open_is_content_and_first_close_closes():
    # O at 1 opens; O at 2 is content; C at 4 closes; C at 6 is stray (ordinary text).
    r = regions_of([[5, O, O, 7, C, 8, C, 9]])
    assert positions(r.meta[0]) == [1, 2, 3, 4]
    assert positions(r.answer[0]) == [5, 6, 7]
    assert positions(r.body[0]) == [0]
    assert r.block_count.tolist() == [1]
    assert (r.first_closed_start.tolist(), r.first_closed_end.tolist()) == ([1], [4])


def test_stray_close_outside_block_is_text():
    r = regions_of([[C, 5, O, 6, C, 7]])
    assert positions(r.meta[0]) == [2, 3, 4]
    assert positions(r.body[0]) == [0, 1]
    assert positions(r.answer[0]) == [5]
    assert (r.first_closed_start.tolist(), r.first_closed_end.tolist()) == ([2], [4])
    # A lone stray close is no block at all.
    r = regions_of([[5, C, 6]])
    assert positions(r.meta[0]) == [] and positions(r.answer[0]) == [0, 1, 2]
    assert r.block_count.tolist() == [0] and r.emitted.tolist() == [False]


def test_two_blocks_answer_after_last_first_closed_is_first():
    r = regions_of([[O, 1, C, 2, O, 3, C, 4], [O, 1, C, 2, O, 3]])
    assert positions(r.meta[0]) == [0, 1, 2, 4, 5, 6]
    assert positions(r.body[0]) == [3]
    assert positions(r.answer[0]) == [7]
    assert r.block_count.tolist() == [2, 2]
    assert r.closed_block_count.tolist() == [2, 1]
    assert r.first_closed_start.tolist() == [0, 0] and r.first_closed_end.tolist() == [2, 2]
    # second row: last block unclosed -> no answer tokens
    assert positions(r.meta[1]) == [0, 1, 2, 4, 5]
    assert positions(r.body[1]) == [3]
    assert positions(r.answer[1]) == []
    assert r.unclosed.tolist() == [False, True]


def test_no_meta_is_all_answer_and_padding_in_no_region():
    r = regions_of([[5, 6, 7], [5, 6, 7, 8, 9]])
    assert positions(r.answer[0]) == [0, 1, 2]
    assert positions(r.valid[0]) == [0, 1, 2]
    assert r.first_open.tolist() == [-1, -1]
    assert not r.meta.any() and not r.body.any()


def test_tags_in_padding_are_ignored():
    ids = torch.tensor([[5, 6, O, C, O], [O, 7, C, C, C]])
    r = meta_regions(ids, torch.tensor([2, 2]), O, C)
    assert positions(r.answer[0]) == [0, 1] and not r.meta[0].any()
    # row 1: the block opens at 0 and is unclosed within the length (its C lies in the padding)
    assert positions(r.meta[1]) == [0, 1] and r.unclosed.tolist() == [False, True]
    assert r.first_closed_start.tolist() == [-1, -1]
    for m in (r.meta, r.answer, r.body):
        assert not (m & ~r.valid).any()


def test_zero_length_row():
    r = regions_of([[5, O], [5]], lengths=[0, 1])
    assert not r.valid[0].any() and not r.meta[0].any() and not r.answer[0].any()
    assert r.block_count.tolist() == [0, 0] and r.unclosed.tolist() == [False, False]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="must be two different"):
        meta_regions(torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]), 7, 7)
    with pytest.raises(ValueError, match="lengths"):
        meta_regions(torch.zeros(1, 3, dtype=torch.long), torch.tensor([4]), O, C)


def test_block_spans_hand_worked():
    assert meta_block_spans([5, O, O, 7, C, 8, C, O, 9], O, C) == [(1, 4), (7, None)]
    assert meta_block_spans([C, C, 5], O, C) == []


def test_vectorised_regions_match_the_automaton():
    rng = random.Random(0)
    rows = [[rng.choice([O, C, 1, 2, 3]) for _ in range(rng.randint(0, 12))] for _ in range(300)]
    T = 12
    ids = torch.tensor([r + [rng.choice([O, C, PAD])] * (T - len(r)) for r in rows])
    r = meta_regions(ids, torch.tensor([len(x) for x in rows]), O, C)
    for b, row in enumerate(rows):
        spans = meta_block_spans(row, O, C)
        meta = set()
        for s, e in spans:
            meta.update(range(s, (e if e is not None else len(row) - 1) + 1))
        last = max(meta) if meta else -1
        assert positions(r.meta[b]) == sorted(meta)
        assert positions(r.answer[b]) == list(range(last + 1, len(row)))
        assert positions(r.body[b]) == [i for i in range(len(row)) if i not in meta and i <= last]
        assert r.block_count[b].item() == len(spans)
        closed = [s for s in spans if s[1] is not None]
        assert r.first_closed_start[b].item() == (closed[0][0] if closed else -1)
        assert r.first_closed_end[b].item() == (closed[0][1] if closed else -1)
