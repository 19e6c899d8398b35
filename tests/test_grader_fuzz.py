"""Grader fuzz: generated hostile answers (huge exponents, deep nesting, unicode garbage, long
strings, unbalanced braces) each return 1/0/-1 within the deadline, and the pool survives."""

from __future__ import annotations

import random
import time

import pytest

from selfdistill.rewards.grader import Grader

FRAGMENTS = ["9^{9^{9^{9}}}", "\\frac{", "}", "{", "\\sqrt{", "x", "10^{10^{10}}", "((((", "))))", "\\infty",
             "ℵ₀", "\u202e", "\x00", "💥", "\\left(", "\\right)", "e^{i\\pi}", "1e999999", "\\\\", "$", "%", "\\text{",
             "0.000000000000000000001", "\\begin{matrix}", "&", "\\end{matrix}", "nan", "-", "+", "=", "\\pm"]


def hostile_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["(" * 400 + "1" + ")" * 400, "1" * 20000, "\\frac{" * 60 + "1" + "}{2}" * 60, "9^" * 200 + "9", "\udcff" * 10]
    while len(out) < n:
        out.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 40))))
    return out


@pytest.mark.timeout(300)
def test_hostile_answers_return_within_deadline_and_pool_survives():
    timeout_s = 1.0
    answers = hostile_strings(40)
    completions = [f"so \\boxed{{{a}}}" for a in answers]
    with Grader(timeout_s=timeout_s, workers=2) as grader:
        for start in range(0, len(completions), 10):
            chunk = completions[start:start + 10]
            t0 = time.monotonic()
            grades = grader.grade([[c] for c in chunk], ["16"] * len(chunk))  # one outside-meta piece each
            elapsed = time.monotonic() - t0
            assert all(g in (-1, 0, 1) for g in grades)
            assert not any(g == 1 for g in grades)  # none of them equals 16
            # one deadline per item, two workers, plus worker restarts: bounded, never a hang
            assert elapsed < len(chunk) * timeout_s + 15, elapsed
        assert grader.grade([["\\boxed{16}"], ["\\boxed{\\frac{32}{2}}"], ["\\boxed{15}"]], ["16", "16", "16"]) == [1, 1, 0]
