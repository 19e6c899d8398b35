"""Correctness grading (SPEC section 1): boxed extraction outside meta blocks, math-verify
equivalence in worker processes, and timeouts / crashes that return -1 without blocking.

The grader reads each completion as its outside-meta text pieces, cut at the tag tokens
(`outside_meta_texts`). `pieces(text)` encodes a test text with the char tokenizer (which turns
the written `<|meta|>` / `<|/meta|>` into the tag tokens) and cuts it that way; a text without
tags is one piece, `[text]`.
"""

import importlib
import textwrap
import time

import pytest

from selfdistill.models import build_char_tokenizer, meta_token_ids
from selfdistill.rewards.grader import Grader, GraderError, extract_boxed_answer
from selfdistill.rewards.regions import outside_meta_texts, rollout_outside_meta_texts
from tests.meta_helpers import rollout_batch, spelled, tagged

pytestmark = pytest.mark.timeout(120)

TOK = build_char_tokenizer()


def pieces(text: str) -> list[str]:
    return outside_meta_texts([tagged(TOK, text)], TOK, meta_token_ids(TOK))[0]


def one_piece(texts: list[str]) -> list[list[str]]:
    return [[t] for t in texts]

HANG = "9^{9^{9^{9}}}"


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{ 2 }", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{x^{2^{3}}} end", "x^{2^{3}}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\boxed{\\}}", "\\}"),
    ("\\boxed {7}", "7"),
    ("\\boxed{\\boxed{5}}", "\\boxed{5}"),  # the outer box is the last one to close
    ("\\boxed{3} and then \\boxed{4", "3"),  # an unclosed box is not an answer
    ("no answer here", None),
    ("\\boxed", None),
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed_answer([text]) == expected


@pytest.mark.parametrize("text, expected", [
    # A box inside a closed meta block is ignored.
    ("\\boxed{1} <|meta|>maybe \\boxed{2}<|/meta|> done", "1"),
    ("<|meta|>\\boxed{2}<|/meta|> so \\boxed{3}", "3"),
    # Unclosed block runs to the end.
    ("\\boxed{1} <|meta|> actually \\boxed{2}", "1"),
    ("<|meta|> \\boxed{2}", None),
    # Inside an open block a further <|meta|> is content; the first close ends the block.
    ("<|meta|> a <|meta|> \\boxed{1} <|/meta|> \\boxed{2}", "2"),
    ("<|meta|> x <|meta|> y <|/meta|> \\boxed{3} <|/meta|>", "3"),
    # A close tag outside any block is ordinary text.
    ("<|/meta|> \\boxed{4}", "4"),
    ("\\boxed{4} <|/meta|> <|meta|> \\boxed{5}", "4"),
    # A box straddling a meta tag is not outside meta.
    ("\\boxed{6} \\boxed{7<|meta|>x<|/meta|>}", "6"),
])
def test_extract_boxed_outside_meta(text, expected):
    assert extract_boxed_answer(pieces(text)) == expected


def test_outside_meta_segments():
    assert pieces("a<|meta|>b<|/meta|>c") == ["a", "c"]
    assert pieces("a<|meta|>b<|meta|>c<|/meta|>d<|/meta|>e") == ["a", "d<|/meta|>e"]
    assert pieces("a<|meta|>b") == ["a"]
    assert pieces("plain") == ["plain"]


# SPEC section 1, boxed answers: spaces before `{`, escaped braces, boxes straddling a meta tag.

@pytest.mark.parametrize("text, expected", [
    ("\\boxed {7}", "7"),
    ("\\boxed   {7}", "7"),
    ("\\boxed \t {7}", "7"),
    ("\\boxed\n{7}", None),  # only spaces (and tabs) may stand between \boxed and its {
    ("\\boxed x {7}", None),
])
def test_spec_1_spaces_before_the_brace(text, expected):
    assert extract_boxed_answer([text]) == expected


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{\\{1\\}}", "\\{1\\}"),
    ("\\boxed{a\\}b}", "a\\}b"),  # \} is content: the box closes at the plain }
    ("\\boxed{\\{}", "\\{"),
    ("\\boxed{\\{ x}", "\\{ x"),  # an escaped { opens nothing
    ("\\boxed{2} \\boxed{\\}", "2"),  # \} cannot close: the last box is unclosed, the earlier wins
])
def test_spec_1_escaped_braces_are_content(text, expected):
    assert extract_boxed_answer([text]) == expected


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{6} \\boxed{7<|meta|>x<|/meta|>}", "6"),  # opens before a block, closes after it
    ("\\boxed{6} <|meta|>\\boxed{7<|/meta|>}", "6"),  # opens inside a block, closes outside
    ("\\boxed{6} \\boxed{7<|meta|> x}", "6"),  # the rest is an unclosed block
    ("<|meta|>\\boxed{7<|/meta|>}", None),
])
def test_spec_1_a_box_straddling_a_meta_tag_is_no_answer(text, expected):
    assert extract_boxed_answer(pieces(text)) == expected


TAGGED_TEXT = "\\boxed{1} <|meta|>\\boxed{2}<|/meta|>"  # box 2 is inside a block when the tags are tokens


def test_a_spelled_out_tag_is_ordinary_text_for_the_answer():
    real, fake = tagged(TOK, TAGGED_TEXT), spelled(TOK, TAGGED_TEXT)
    assert TOK.decode(real) == TOK.decode(fake) == TAGGED_TEXT  # the same text, different tokens
    real_pieces, fake_pieces = outside_meta_texts([real, fake], TOK, meta_token_ids(TOK))
    assert extract_boxed_answer(real_pieces) == "1"
    assert fake_pieces == [TAGGED_TEXT] and extract_boxed_answer(fake_pieces) == "2"
    # a box straddling a spelled-out tag is one box of text
    straddling = spelled(TOK, "\\boxed{7<|meta|>x}")
    assert extract_boxed_answer(outside_meta_texts([straddling], TOK, meta_token_ids(TOK))[0]) == "7<|meta|>x"


def test_bare_text_is_refused():
    with pytest.raises(TypeError, match="outside-meta text pieces"):
        extract_boxed_answer("\\boxed{1}")


# ----------------------------------------------------------------------------- grading

@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=3.0, workers=2) as g:
        yield g


def test_equivalent_forms(grader):
    cases = [
        ("so \\boxed{0.5}", "\\frac{1}{2}", 1),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1),
        ("\\boxed{x = 5}", "5", 1),
        ("\\boxed{50\\%}", "50", 1),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),
        ("\\boxed{1,000}", "1000", 1),
        ("\\boxed{3}", "4", 0),
        ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", 0),
        ("no box: 0.5", "0.5", 0),
        ("<|meta|> \\boxed{0.5} <|/meta|> \\boxed{0.4}", "0.5", 0),
        ("\\boxed{0.5} <|meta|> no wait, \\boxed{0.4}", "0.5", 1),
        ("\\boxed{}", "0", 0),
        ("\\boxed{ 7 }", " 7", 1),  # fast path, stripped
    ]
    texts, golds, expected = zip(*cases)
    assert grader.grade([pieces(t) for t in texts], list(golds)) == list(expected)


def test_batch_with_duplicates_and_counters(grader):
    before = grader.graded
    texts = [f"\\boxed{{{i % 5}}}" for i in range(200)]
    golds = [str(i % 3) for i in range(200)]
    start = time.monotonic()
    results = grader.grade(one_piece(texts), golds)
    assert results == [int(i % 5 == i % 3) for i in range(200)]
    assert time.monotonic() - start < 10
    assert grader.graded == before + 200
    assert set(grader.metrics()) == {"grader/graded", "grader/timeouts", "grader/crashes"}
    assert grader.grade([], []) == []
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        grader.grade(one_piece(["a", "b"]), ["1"])


def test_grading_reads_tags_from_token_ids_only(grader):
    """SPEC section 1: only the special tokens are tags. The same decoded text graded from the
    special tokens (box 2 is inside a block: answer 1) and from spelled-out characters (no block:
    answer 2), both through the trainer's path (`rollout_outside_meta_texts`)."""
    batch = rollout_batch(TOK, [tagged(TOK, TAGGED_TEXT), spelled(TOK, TAGGED_TEXT)], group_ids=[0, 1])
    assert batch.texts[0] == batch.texts[1]
    texts = rollout_outside_meta_texts(batch, TOK, meta_token_ids(TOK))
    assert grader.grade(texts, ["1", "1"]) == [1, 0]
    assert grader.grade(texts, ["2", "2"]) == [0, 1]
    with pytest.raises(TypeError, match="item 0"):
        grader.grade(batch.texts, ["1", "1"])  # a decoded text is refused: it cannot tell the two apart


def test_pathological_input_times_out_and_pool_recovers(grader):
    grader.grade(one_piece(["\\boxed{1}"]), ["2"])  # pool warm: startup is not part of the deadline
    timeouts = grader.timeouts
    start = time.monotonic()
    results = grader.grade(one_piece([f"\\boxed{{{HANG}}}", "\\boxed{0.25}"]), ["3", "\\frac{1}{4}"])
    elapsed = time.monotonic() - start
    assert results == [-1, 1]
    assert elapsed < grader.timeout_s + 1.0, elapsed
    assert grader.timeouts == timeouts + 1
    assert grader.grade(one_piece(["\\boxed{\\frac{2}{4}}", "\\boxed{1}"]), ["0.5", "2"]) == [1, 0]


# A scripted check for the worker-side failure modes. It lives in a tiny module of its own so
# that workers unpickling it import only that (this test module would pull in torch through the
# `selfdistill.rewards` package and make every worker start take seconds).
SCRIPTED_CHECK = textwrap.dedent("""
    import os, signal, time

    def scripted_equivalent(gold, answer):
        if answer == "hang":  # immune to the worker's soft SIGALRM: only a kill ends it
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        if answer == "sleep":  # interrupted by the soft timeout
            time.sleep(60)
        if answer == "crash":
            os._exit(3)
        if answer == "raise":
            raise RuntimeError("broken check")
        return gold.lower() == answer.lower()
""")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scripted")
    (folder / "selfdistill_scripted_check.py").write_text(SCRIPTED_CHECK)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))  # workers get the parent's sys.path
        module = importlib.import_module("selfdistill_scripted_check")
        with Grader(timeout_s=1.0, workers=2, equivalent=module.scripted_equivalent) as g:
            g.grade(one_piece(["\\boxed{a}"]), ["A"])  # wait for the pool
            yield g


@pytest.mark.parametrize("answer, counter", [
    ("hang", "timeouts"), ("sleep", "timeouts"), ("crash", "crashes"), ("raise", "crashes")])
def test_worker_failures_return_minus_one(scripted, answer, counter):
    before = getattr(scripted, counter)
    start = time.monotonic()
    results = scripted.grade(one_piece([f"\\boxed{{{answer}}}", "\\boxed{b}", "\\boxed{c}"]),
                             ["x", "B", "d"])
    elapsed = time.monotonic() - start
    assert results == [-1, 1, 0]
    assert getattr(scripted, counter) == before + 1
    assert elapsed < scripted.timeout_s + 1.0, elapsed
    # The pool keeps working (the dead worker's replacement starts in the background).
    assert scripted.grade(one_piece(["\\boxed{e}", "\\boxed{f}"]), ["E", "g"]) == [1, 0]


def test_every_worker_hanging_at_once(scripted):
    start = time.monotonic()
    results = scripted.grade(one_piece(["\\boxed{hang}", "\\boxed{crash}", "\\boxed{q}"]),
                             ["1", "2", "Q"])
    assert results == [-1, -1, 1]
    # Both workers die; the last item waits for a replacement to start (forked from the
    # preloaded server), not for the hang.
    assert time.monotonic() - start < scripted.timeout_s + 10


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_start_methods_and_close(start_method):
    g = Grader(timeout_s=5.0, workers=1, start_method=start_method)
    assert g.grade(one_piece(["\\boxed{0.5}", "\\boxed{2}"]), ["\\frac{1}{2}", "3"]) == [1, 0]
    procs = [w.proc for w in g._workers]
    g.close()
    g.close()  # idempotent
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(GraderError, match="closed"):
        g.grade(one_piece(["\\boxed{1}"]), ["1"])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        Grader(workers=0)
    with pytest.raises(ValueError, match="start_method"):
        Grader(start_method="fork")
    with Grader(workers=1) as g:
        with pytest.raises(TypeError, match="item 1"):
            g.grade([["\\boxed{1}"], None], ["1", "2"])


def test_workers_that_cannot_start_raise_instead_of_hanging(tmp_path, monkeypatch):
    # The check's module exists here but not in the workers (spawn re-imports it by name).
    (tmp_path / "selfdistill_vanishing_check.py").write_text(
        "def check(gold, answer):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = importlib.import_module("selfdistill_vanishing_check").check
    (tmp_path / "selfdistill_vanishing_check.py").unlink()
    with Grader(workers=1, equivalent=check, start_method="spawn") as g:
        with pytest.raises(GraderError, match="before becoming ready, 3 times in a row"):
            g.grade(one_piece(["\\boxed{1}"]), ["2"])
        with pytest.raises(GraderError, match="3 times in a row"):  # and stays broken
            g.grade(one_piece(["\\boxed{1}"]), ["2"])
