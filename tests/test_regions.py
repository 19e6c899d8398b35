"""Meta blocks and region masks (SPEC sections 1 and 4), hand-worked token by token."""

import random

import pytest
import torch

from selfdistill.rewards.regions import meta_block_spans, meta_emitted, meta_regions, meta_structure_metrics

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


# ----------------------------------------------------------------------------- spans, pieces, metrics

def reference_spans(row):
    """SPEC section 1's automaton, one token at a time: an independent second implementation."""
    spans, start = [], None
    for i, tok in enumerate(row):
        if start is None and tok == O:
            start = i
        elif start is not None and tok == C:
            spans.append((start, i))
            start = None
    return spans + ([(start, None)] if start is not None else [])


def test_block_and_outside_spans_match_the_per_token_automaton():
    rng = random.Random(1)
    rows = [[rng.choice([O, C, 1, 2, 3]) for _ in range(rng.randint(0, 12))] for _ in range(300)]
    r = regions_of(rows)
    for b, row in enumerate(rows):
        spans = reference_spans(row)
        assert r.block_spans(b) == spans
        # pieces: everything outside the blocks, cut at them, in order
        expected, pos = [], 0
        for s, e in spans:
            expected.append((pos, s))
            pos = len(row) if e is None else e + 1
        if not spans or spans[-1][1] is not None:
            expected.append((pos, len(row)))
        assert r.outside_spans(b) == expected


def test_outside_spans_hand_worked():
    r = regions_of([[5, O, 6, C, 7, C, O, O, 8, C, 9], [5, O, 6], [C, 5]])
    assert r.outside_spans(0) == [(0, 1), (4, 6), (10, 11)]  # the stray C at 5 is text in the middle piece
    assert r.outside_spans(1) == [(0, 1)]  # unclosed: nothing after it
    assert r.outside_spans(2) == [(0, 2)]
    assert r.opening[0].nonzero().flatten().tolist() == [1, 6] and r.closing[0].nonzero().flatten().tolist() == [3, 9]


def test_meta_structure_metrics_count_with_arm_rollouts_from_token_ids():
    # rows: two blocks (6 meta tokens), none, unclosed (3 meta tokens), and a without-arm row whose
    # (forced) block is not the policy's
    r = regions_of([[O, 1, C, O, 2, C, 3], [1, 2], [1, O, 2, 3], [O, 4, C, 5]])
    m = meta_structure_metrics(r, torch.tensor([True, True, True, False]))
    assert m == {"meta/emission_rate": pytest.approx(2 / 3), "meta/blocks_per_rollout": pytest.approx(3 / 3),
                 "meta/mean_len": pytest.approx((6 + 3) / 2)}
    assert meta_emitted(r, torch.tensor([True, True, True, False])).tolist() == [True, False, True]
    empty = meta_structure_metrics(r, torch.zeros(4, dtype=torch.bool))
    assert empty == {"meta/emission_rate": 0.0, "meta/blocks_per_rollout": 0.0, "meta/mean_len": 0.0}
    with pytest.raises(ValueError, match="with_arm"):
        meta_emitted(r, torch.ones(3, dtype=torch.bool))
