"""PMI anti-gaming guards and belief-head membership on text (SPEC section 2)."""

import pytest

from selfdistill.rewards import belief_membership_reason, contains_standalone, copies_continuation, pmi_guard_reason


@pytest.mark.parametrize(
    "text, needle, expected",
    [
        ("so the answer is 16.", "16", True),  # "." at the end of the text: standalone
        ("it is 16. Next we check", "16", True),  # "." followed by a space
        ("it is 16.)", "16", True),  # "." followed by a non-digit
        ("16", "16", True),
        ("(16)", "16", True),
        ("-16 here", "16", True),  # "-" is not a blocking neighbour
        ("16, then", "16", True),
        ("16.5 is close", "16", False),  # decimal point followed by a digit
        ("3.16", "16", False),  # "." before, followed by the digit 1
        ("x16", "16", False),
        ("a_16", "16", False),
        ("16_b", "16", False),
        ("160", "16", False),
        ("1616", "16", False),  # overlapping occurrences, none standalone
        ("216 and then 16", "16", True),  # a later occurrence is standalone
        ("val16.", "16", False),
        ("\\frac{1}{2}.", "\\frac{1}{2}", True),
        ("2\\pi", "\\pi", False),
        ("anything", "", False),
    ],
)
def test_contains_standalone(text, needle, expected):
    assert contains_standalone(text, needle) is expected


WORDS = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12".split()


def test_copy_guard_needs_eight_words():
    seven = " ".join(WORDS[:7])
    assert not copies_continuation(seven, seven)
    eight = " ".join(WORDS[:8])  # one distinct 8-gram, found in C -> 100%
    assert copies_continuation(eight, "start " + eight + " end")


def test_copy_guard_threshold_is_inclusive_25_percent():
    c = " ".join(WORDS[:8])  # C holds exactly one of the meta's 8-grams
    eleven = " ".join(WORDS[:11])  # 4 distinct 8-grams, 1 in C -> 25% -> guard fires
    assert copies_continuation(eleven, c)
    twelve = " ".join(WORDS[:12])  # 5 distinct 8-grams, 1 in C -> 20% -> passes
    assert not copies_continuation(twelve, c)
    # the share is over DISTINCT 8-grams: 16 identical words make 9 8-grams but one distinct
    rep = " ".join(["a"] * 16)  # one distinct 8-gram "a a a a a a a a"
    assert copies_continuation(rep, " ".join(["a"] * 8))
    assert not copies_continuation(rep, " ".join(["a"] * 7))


def test_pmi_guard_reasons():
    assert pmi_guard_reason("I think it is 16.", "So 16.", " 16 ", None) == "gold_in_meta"
    assert pmi_guard_reason("I think it is 12", "So 12.", "16", "12") == "boxed_in_meta"
    assert pmi_guard_reason("check the sign of 3.16", "So 16.", "16", "16") is None
    assert pmi_guard_reason("the sign flipped", "", "16", "") is None  # empty boxed never matches
    words = " ".join(WORDS[:8])
    assert pmi_guard_reason(words, words, "16", None) == "copied_continuation"


def test_belief_membership():
    kw = dict(meta_text="wait, sign error", continuation_text="So 16.", gold="99", boxed="16")
    for head in ("pmi", "gm", "pmi_shift"):
        assert belief_membership_reason(head, has_closed_block=True, **kw) is None
        assert belief_membership_reason(head, has_closed_block=False, **kw) == "no_closed_block"
        assert belief_membership_reason(head, has_closed_block=True, **{**kw, "meta_text": " \n\t"}) == "blank_meta"
    blank_c = {**kw, "continuation_text": "  \n"}
    assert belief_membership_reason("pmi", has_closed_block=True, **blank_c) == "blank_continuation"
    assert belief_membership_reason("gm", has_closed_block=True, **blank_c) == "blank_continuation"
    assert belief_membership_reason("pmi_shift", has_closed_block=True, **blank_c) is None
    assert belief_membership_reason("pmi", has_closed_block=True, **{**kw, "meta_text": "so 16"}) == "boxed_in_meta"
    assert belief_membership_reason("gm", has_closed_block=True, **{**kw, "meta_text": "so 16"}) is None  # guard is PMI's


def test_membership_errors():
    with pytest.raises(ValueError, match="pmi, gm, pmi_shift"):
        belief_membership_reason("cf", has_closed_block=True, meta_text="a", continuation_text="b")
    with pytest.raises(ValueError, match="gold"):
        belief_membership_reason("pmi", has_closed_block=True, meta_text="a", continuation_text="b")


@pytest.mark.parametrize(
    "text, needle, expected",
    [
        # SPEC section 2: "digit" and "letter" mean ASCII [0-9] and [A-Za-z]; other characters that
        # Python calls alphanumeric (superscripts, vulgar fractions, accented letters) do not block.
        ("16²", "16", True),
        ("16.²", "16", True),  # "." followed by a non-ASCII digit still counts as standalone
        ("é16", "16", True),
        ("16½", "16", True),
        ("x٣16", "16", True),  # an Arabic-Indic digit on the left
        ("16.٣", "16", True),
        ("Z16", "16", False),  # ASCII letters and digits still block
        ("16.9", "16", False),
    ],
)
def test_contains_standalone_ascii_neighbours_spec_2(text, needle, expected):
    assert contains_standalone(text, needle) is expected
