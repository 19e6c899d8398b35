"""Decoys (SPEC section 3): worked examples, candidate rules, validity and determinism."""

import json
import os
import subprocess
import sys

import pytest
from math_verify import parse, verify

from selfdistill.data.decoys import DecoyError, _raw_candidates, decoy_candidates, make_decoy

SPREAD = [
    "0", "1", "16", "-3", "-0", "007", "100000000000000000000", "2.5", "-0.75", ".5",
    "0.0000001", "\\frac{1}{2}", "-\\dfrac{3}{4}", "\\frac{2}{2}", "\\frac{7}{3}", "\\pi",
    "2\\pi", "\\frac{\\pi}{2}", "\\sqrt{2}", "2\\sqrt{3}", "\\sqrt{2}+\\sqrt{3}", "x^2+1",
    "\\infty", "\\text{(A)}", "(1,2)", "1,000", "\\mathbb{R}",
]


def test_spec_worked_examples():
    assert make_decoy("16", seed=42) == "6"
    assert make_decoy("16") == "6"
    assert decoy_candidates("2.5") == ["2.6", "2.4", "3.5", "1.5", "3.0", "2.0", "-2.5"]


def test_gold_is_stripped_everywhere():
    assert decoy_candidates("  16\n") == decoy_candidates("16")
    assert make_decoy(" 16 ") == "6"  # md5 of the stripped gold


def test_integer_candidates_in_order():
    assert decoy_candidates("16") == ["17", "15", "18", "14", "26", "6", "21", "11", "-16"]
    assert decoy_candidates("-3") == ["-2", "-4", "-1", "-5", "7", "-13", "2", "-8", "3"]
    # 0: no sign flip; "-0" would equal gold numerically anyway.
    assert decoy_candidates("0") == ["1", "-1", "2", "-2", "10", "-10", "5", "-5"]


def test_duplicates_removed_first_kept():
    # -0: the integer rule gives 1, -1, ...; the sign flip "0" equals gold numerically.
    assert decoy_candidates("-0") == ["1", "-1", "2", "-2", "10", "-10", "5", "-5"]
    # \frac{1}{1}: swap is skipped (a == b); a+1 gives \frac{2}{1}; sign flip last.
    assert decoy_candidates("\\frac{1}{1}") == ["\\frac{2}{1}", "-\\frac{1}{1}"]


def test_fraction_rules_keep_command_and_sign():
    assert decoy_candidates("\\frac{1}{2}") == ["\\frac{2}{1}", "\\frac{2}{2}", "-\\frac{1}{2}"]
    assert decoy_candidates("-\\dfrac{3}{4}") == ["-\\dfrac{4}{3}", "-\\dfrac{4}{4}",
                                                  "\\dfrac{3}{4}"]


def test_pi_and_sqrt_rules():
    assert decoy_candidates("\\pi") == ["1", "\\pi/2", "-\\pi"]
    assert decoy_candidates("\\frac{\\pi}{2}")[:2] == ["\\frac{1}{2}", "\\frac{\\pi/2}{2}"]
    assert decoy_candidates("\\sqrt{2}") == ["2", "-\\sqrt{2}"]
    # Every \sqrt{k} is replaced in one candidate.
    assert decoy_candidates("\\sqrt{2}+\\sqrt{3}")[0] == "2+3"


def test_decimal_rounding_drops_equal_values():
    # gold 0.0000001: the sign flip -0.0000001 is equal under math-verify (6-digit rounding).
    cands = decoy_candidates("0.0000001")
    assert "-0.0000001" not in cands
    assert cands == ["0.1", "-0.1", "1.0", "-1.0", "0.5", "-0.5"]


@pytest.mark.parametrize("gold", SPREAD)
def test_decoy_never_equal_to_gold(gold):
    decoy = make_decoy(gold)
    assert decoy.strip() and decoy != gold
    g = parse(f"${gold}$")
    assert not verify(g, parse(f"${decoy}$")), (gold, decoy)
    for cand in decoy_candidates(gold):
        assert not verify(g, parse(f"${cand}$")), (gold, cand)


def test_seed_changes_choice_but_stays_in_candidates():
    decoys = {make_decoy("16", seed=s) for s in range(20)}
    assert decoys <= set(decoy_candidates("16"))
    assert len(decoys) > 1


def test_fallback_when_no_candidate_is_valid():
    assert decoy_candidates("\\text{(A)}") == []
    assert make_decoy("\\text{(A)}") == "\\text{(A)} + 1"


def test_error_when_no_decoy_exists():
    # -\pm\infty does not parse and math-verify calls \pm\infty + 1 equal to \pm\infty.
    with pytest.raises(DecoyError, match=r"\\\\pm\\\\infty"):
        make_decoy("\\pm\\infty")
    with pytest.raises(DecoyError):
        make_decoy("   ")
    assert issubclass(DecoyError, ValueError)


def test_deterministic_across_processes():
    golds = ["16", "2.5", "\\frac{3}{7}", "\\pi", "-12", "2\\sqrt{5}"]
    code = ("import json, sys; from selfdistill.data.decoys import make_decoy; "
            "print(json.dumps([make_decoy(g, 7) for g in json.loads(sys.argv[1])]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(golds)], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [make_decoy(g, 7) for g in golds]


@pytest.mark.parametrize("gold", ["\\frac{0}{5}", "\\frac{-0}{3}", "-\\dfrac{0}{7}", "0", "-0", "0.0"])
def test_no_sign_flip_when_gold_is_numerically_zero_spec_3(gold):
    """SPEC section 3: no sign flip for a gold that is numerically 0, fractions included, in the raw
    candidate list itself (not only after math-verify drops the flip as equal to gold)."""
    raw = _raw_candidates(gold)
    flip = gold[1:] if gold.startswith("-") else f"-{gold}"
    assert flip not in raw
    assert not any(c.startswith("-\\") and c.lstrip("-") == gold.lstrip("-") for c in raw)


def test_zero_fraction_candidates_spec_3():
    # swap b/a and a+1 only; the flip is gone
    assert _raw_candidates("\\frac{0}{5}") == ["\\frac{5}{0}", "\\frac{1}{5}"]
    assert _raw_candidates("\\frac{-0}{3}") == ["\\frac{3}{0}", "\\frac{1}{3}"]
    assert _raw_candidates("-\\dfrac{0}{7}") == ["-\\dfrac{7}{0}", "-\\dfrac{1}{7}"]
    # a non-zero fraction still gets its flip, last
    assert _raw_candidates("\\frac{1}{5}")[-1] == "-\\frac{1}{5}"
    assert _raw_candidates("-\\dfrac{2}{7}")[-1] == "\\dfrac{2}{7}"
