"""Decoy answers: a wrong answer derived deterministically from gold (SPEC section 3).

The belief heads (SPEC sections 1-2) score gold against a decoy, so a decoy must be (a) clearly
wrong -- math-verify must not call it equal to gold -- and (b) the same on every machine and in
every process for a given (gold, seed). (b) rules out Python's `hash()` (salted per process); the
choice is seeded from md5 instead.

Candidates, in SPEC order (each stripped, duplicates removed keeping the first):
  1. integer gold `-?\\d+`: gold + d for d in +1, -1, +2, -2, +10, -10, +5, -5;
     else decimal gold `-?\\d*\\.\\d+`: round(gold + d, 2) for d in +0.1, -0.1, +1, -1, +0.5, -0.5;
  2. gold containing `\\pi`: `\\pi` replaced by `1`, then by `\\pi/2`;
  3. gold containing `\\sqrt{k}` (k digits): every such `\\sqrt{k}` replaced by k (one candidate);
  4. gold exactly `[-]\\frac{a}{b}` / `[-]\\dfrac{a}{b}`, a, b integers: the swap b/a (if a != b),
     then (a+1)/b, same command, leading `-` kept;
  5. the sign flip: `-g`, or g without its leading `-`; none when g is numerically 0, which here
     means a plain number literal equal to 0 (`0`, `-0`, `0.0`) or the exact fraction form of
     rule 4 with a = 0 and b != 0 (`\\frac{0}{5}`, `\\frac{-0}{3}`, `-\\dfrac{0}{7}`). Other
     spellings of zero (`0\\pi`, `\\sqrt{0}`) are not recognised: SPEC section 3 names no
     evaluator, and their flip is dropped later anyway (math-verify judges it equal to g).
Then dropped: empty, equal to gold as strings or as numbers, not parseable by math-verify, or
judged equal to gold by `verify(parse(f"${g}$"), parse(f"${cand}$"))`.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import threading
from decimal import Decimal, InvalidOperation

__all__ = ["DecoyError", "decoy_candidates", "make_decoy"]

_INT_RE = re.compile(r"-?\d+")
_DECIMAL_RE = re.compile(r"-?\d*\.\d+")
_SQRT_RE = re.compile(r"\\sqrt\{(\d+)\}")
_FRAC_RE = re.compile(r"(-?)\\(d?frac)\{(-?\d+)\}\{(-?\d+)\}")
# A plain number literal, for the "equal to g numerically" drop rule.
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")

_INT_DELTAS = (1, -1, 2, -2, 10, -10, 5, -5)
_DECIMAL_DELTAS = (0.1, -0.1, 1, -1, 0.5, -0.5)


class DecoyError(ValueError):
    """No valid decoy exists for a gold answer; the data row must be rejected (SPEC section 3)."""


def _in_main_thread() -> bool:
    # math-verify's timeouts use signal.alarm, which raises outside the main thread; there we
    # must run without them (and accept that a pathological gold could take long).
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=65536)
def _parse(text: str) -> tuple:
    """math-verify parse of `$text$` (cached: candidates repeat across golds, sympy objects are
    immutable). A timeout or error gives an empty result."""
    from math_verify import parse

    timeout = 5 if _in_main_thread() else None
    return tuple(parse(f"${text}$", parsing_timeout=timeout))


def _parsed(result: tuple) -> bool:
    """True when math-verify produced a real expression, not only its fallback raw string."""
    return any(not isinstance(x, str) for x in result)


def _judged_equal(gold_parsed: tuple, cand_parsed: tuple) -> bool | None:
    """math-verify's verdict; None when it timed out (undecided)."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeout = 5 if _in_main_thread() else None
    try:
        return bool(verify(list(gold_parsed), list(cand_parsed), timeout_seconds=timeout,
                           raise_on_error=True))
    except TimeoutException:
        return None
    except Exception:
        # An ordinary comparison error: math-verify's default (raise_on_error=False) verdict.
        return bool(verify(list(gold_parsed), list(cand_parsed), timeout_seconds=timeout))


def _as_number(text: str) -> Decimal | None:
    if not _NUMBER_RE.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _raw_candidates(g: str) -> list[str]:
    """SPEC section 3 candidates in order, before stripping, dedup and the drop rules."""
    cands: list[str] = []
    if _INT_RE.fullmatch(g):
        cands += [str(int(g) + d) for d in _INT_DELTAS]
    elif _DECIMAL_RE.fullmatch(g):
        cands += [str(round(float(g) + d, 2)) for d in _DECIMAL_DELTAS]
    if "\\pi" in g:
        cands += [g.replace("\\pi", "1"), g.replace("\\pi", "\\pi/2")]
    if _SQRT_RE.search(g):
        cands.append(_SQRT_RE.sub(lambda m: m.group(1), g))
    m = _FRAC_RE.fullmatch(g)
    if m:
        sign, cmd, a, b = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        if a != b:
            cands.append(f"{sign}\\{cmd}{{{b}}}{{{a}}}")
        cands.append(f"{sign}\\{cmd}{{{a + 1}}}{{{b}}}")
    if not _numerically_zero(g, m):
        cands.append(g[1:] if g.startswith("-") else f"-{g}")
    return cands


def _numerically_zero(g: str, frac: re.Match | None) -> bool:
    """g is 0 as a number literal, or `[-]\\frac{0}{b}` / `\\dfrac` with b != 0 (rule 5 above)."""
    if frac is not None:
        return int(frac.group(3)) == 0 and int(frac.group(4)) != 0
    value = _as_number(g)
    return value is not None and value == 0


@functools.lru_cache(maxsize=65536)
def _valid_candidates(g: str) -> tuple[str, ...]:
    seen: set[str] = set()
    ordered: list[str] = []
    for cand in _raw_candidates(g):
        cand = cand.strip()
        if cand not in seen:
            seen.add(cand)
            ordered.append(cand)

    gold_parsed = _parse(g)
    gold_value = _as_number(g)
    valid = []
    for cand in ordered:
        if not cand or cand == g:
            continue
        cand_value = _as_number(cand)
        if gold_value is not None and cand_value is not None and cand_value == gold_value:
            continue
        cand_parsed = _parse(cand)
        if not _parsed(cand_parsed):
            continue
        # A timeout (None) is not proof of difference: drop, so a decoy never risks equalling gold.
        if _judged_equal(gold_parsed, cand_parsed) is not False:
            continue
        valid.append(cand)
    return tuple(valid)


def decoy_candidates(gold: str) -> list[str]:
    """The valid decoy candidates for `gold`, in SPEC section 3 order (before the seeded choice)."""
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__} {gold!r}")
    return list(_valid_candidates(gold.strip()))


def make_decoy(gold: str, seed: int = 42) -> str:
    """A wrong answer for `gold`, deterministic in (gold, seed) across processes (SPEC section 3).

    Raises DecoyError when no candidate is valid and math-verify cannot tell `g + 1` from g.
    """
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__} {gold!r}")
    g = gold.strip()
    if not g:
        raise DecoyError(f"cannot build a decoy for an empty gold answer {gold!r}")
    valid = _valid_candidates(g)
    if valid:
        digest = hashlib.md5(f"{g}|{seed}".encode("utf-8")).hexdigest()
        return random.Random(int(digest[:8], 16)).choice(valid)
    fallback = f"{g} + 1"
    if _judged_equal(_parse(g), _parse(fallback)) is False:
        return fallback
    raise DecoyError(
        f"no valid decoy for gold {g!r}: every SPEC section 3 candidate "
        f"({', '.join(repr(c.strip()) for c in _raw_candidates(g)) or 'none'}) is empty, "
        f"unparseable by math-verify, or equal to gold (as a string, a number or under "
        f"math-verify), and math-verify does not judge the fallback {fallback!r} different"
    )
