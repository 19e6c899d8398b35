"""Text-level membership rules of the belief heads and PMI's anti-gaming guards (SPEC section 2).

These run on text decoded from token spans the token-level grammar found (`regions`: M's
content between its tag tokens, C after M's closing tag, the outside-meta pieces for the boxed
answer), never on a decoded completion parsed for tags. Each returns the reason a rollout is a
non-member, or None when it is a member, so the scorer can both mask the head
(`common.apply_membership`) and count the reasons.

Membership of the heads scored from the first closed meta block M (PMI, gm, PMI-shift): non-member
when there is no closed block, when M has nothing but whitespace between its tags, when nothing
but whitespace follows M (heads whose registry entry says so: PMI and gm), when the head's guard
fires (PMI's), or when the gold/decoy pair is not scorable (that last one is decided on token ids
by the scorer: `common.divergent_positions`).

PMI guards, on the text between M's tags: it contains the gold answer string or the rollout's own
boxed answer string literally and standalone, or it copies its continuation (>= 8 words and >= 25%
of its distinct word 8-grams among C's word 8-grams). "Standalone": not next to an ASCII letter,
an ASCII digit, `_`, or a `.` that is followed by an ASCII digit.
"""

from __future__ import annotations

import string
from typing import Callable, Optional

# Every reason a rollout can be a non-member of a head scored from its first closed block, in the
# order the rules are applied (the first failing one is counted): the structural rules, PMI's guard
# reasons, and the unscorable gold/decoy pair (decided on token ids by the scorer).
STRUCTURE_REASONS = ("no_closed_block", "blank_meta", "blank_continuation")
PMI_GUARD_REASONS = ("gold_in_meta", "boxed_in_meta", "copied_continuation")
UNSCORABLE_PAIR = "unscorable_pair"
NONMEMBER_REASONS = (*STRUCTURE_REASONS, *PMI_GUARD_REASONS, UNSCORABLE_PAIR)

# A guard: (meta_text, continuation_text, gold, boxed) -> a reason from NONMEMBER_REASONS or None.
Guard = Callable[[str, str, str, Optional[str]], Optional[str]]

_ASCII_ALNUM = frozenset(string.ascii_letters + string.digits)
_ASCII_DIGITS = frozenset(string.digits)

NGRAM = 8
MIN_WORDS = 8
# >= 25% of distinct meta 8-grams found in C, compared on integer counts: 4 * hits >= total.
COPY_NUM, COPY_DEN = 1, 4


def _blocks_standalone(ch: str, char_after_it: Optional[str]) -> bool:
    """Does neighbour `ch` make a match non-standalone? ASCII letters and digits (`[A-Za-z0-9]`,
    SPEC section 2) and `_` always do; a `.` does only when it is followed by an ASCII digit (a
    decimal point): "16." at the end of a sentence is standalone, "16.5" is not a match for "16".
    Other characters never block, `str.isalnum` ones included: "16²", "16.²", "é16", "16½" are
    standalone matches of "16". `char_after_it` is the character right after `ch` in the text
    (None at the end of the text)."""
    if ch in _ASCII_ALNUM or ch == "_":
        return True
    if ch == ".":
        return char_after_it is not None and char_after_it in _ASCII_DIGITS
    return False


def contains_standalone(text: str, needle: str) -> bool:
    """True if `needle` occurs in `text` literally with neither neighbour blocking (see
    `_blocks_standalone`). Every occurrence is tried, overlapping ones included. An empty needle
    never matches (an empty boxed answer must not disqualify every rollout)."""
    if not needle:
        return False
    start = text.find(needle)
    while start != -1:
        end = start + len(needle)
        left_ok = start == 0 or not _blocks_standalone(text[start - 1], text[start])
        right_ok = end == len(text) or not _blocks_standalone(text[end], text[end + 1] if end + 1 < len(text) else None)
        if left_ok and right_ok:
            return True
        start = text.find(needle, start + 1)
    return False


def _word_ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copies_continuation(meta_text: str, continuation_text: str) -> bool:
    """SPEC PMI guard: the meta text has >= 8 whitespace-separated words and >= 25% of its distinct
    word 8-grams are in the set of the continuation's word 8-grams (exact count comparison)."""
    words = meta_text.split()
    if len(words) < MIN_WORDS:
        return False
    meta_grams = _word_ngrams(words, NGRAM)
    hits = len(meta_grams & _word_ngrams(continuation_text.split(), NGRAM))
    return hits * COPY_DEN >= COPY_NUM * len(meta_grams)


def pmi_guard_reason(meta_text: str, continuation_text: str, gold: str, boxed: Optional[str]) -> Optional[str]:
    """Why PMI's anti-gaming guard makes this rollout a non-member, or None if it passes.

    meta_text: the text between M's tags. continuation_text: C, the completion after M's closing
    tag (EOS excluded). gold: the reference answer (stripped here). boxed: the stripped content
    of the rollout's last `\\boxed{}` outside meta, None when it has none.
    Reasons: "gold_in_meta", "boxed_in_meta", "copied_continuation".
    """
    if not isinstance(gold, str):
        raise TypeError(f"pmi_guard_reason: gold must be the reference answer string; got {type(gold).__name__}")
    if contains_standalone(meta_text, gold.strip()):
        return "gold_in_meta"
    if boxed is not None and contains_standalone(meta_text, boxed.strip()):
        return "boxed_in_meta"
    if copies_continuation(meta_text, continuation_text):
        return "copied_continuation"
    return None


def membership_reason(
    *,
    has_closed_block: bool,
    meta_text: str,
    continuation_text: str,
    needs_continuation: bool,
    guard: Optional[Guard] = None,
    gold: Optional[str] = None,
    boxed: Optional[str] = None,
) -> Optional[str]:
    """Why a head scored from the first closed meta block does not score this rollout, or None if
    it is a member. The head's registry entry (`ScorerPasses`) supplies `needs_continuation` and
    `guard`.

    has_closed_block: from `MetaRegions.has_closed_block`. meta_text: text between the first closed
    block's tags ("" when there is none). continuation_text: text after its closing tag (EOS
    excluded). gold and boxed: what a guard reads (gold is required with a guard; boxed is the
    rollout's answer from its outside-meta pieces, None when it has none).
    Reasons: "no_closed_block", "blank_meta", "blank_continuation", then the guard's. The
    pair-not-scorable rule is applied on token ids by the scorer.
    """
    if not has_closed_block:
        return "no_closed_block"
    if not meta_text.strip():
        return "blank_meta"
    if needs_continuation and not continuation_text.strip():
        return "blank_continuation"
    if guard is None:
        return None
    if gold is None:
        raise ValueError(f"membership_reason: the guard {getattr(guard, '__name__', guard)!r} needs gold= (the reference answer)")
    reason = guard(meta_text, continuation_text, gold, boxed)
    if reason is not None and reason not in NONMEMBER_REASONS:
        raise ValueError(f"membership_reason: guard {getattr(guard, '__name__', guard)!r} returned {reason!r}, which is not "
                         f"one of guards.NONMEMBER_REASONS ({', '.join(NONMEMBER_REASONS)}); add it there so it is counted")
    return reason
