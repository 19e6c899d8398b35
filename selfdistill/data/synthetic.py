"""Synthetic arithmetic with worked solutions, for CPU demos and tests (DESIGN.md).

Four difficulty levels in three domains:

  level 1  add_sub  one-digit a +- b                        "3+5=8."
  level 2  add_sub  a +- b +- c, one-digit operands         "5-8+4: 5-8=-3, -3+4=1."
  level 3  mul      a * b +- c, one-digit operands          "4*7-5: 4*7=28, 28-5=23."
  level 4  mixed    a - b*(c - d), the seed's shape         "2-5=-3, 3*-3=-9, 7--9=16."

Every solution ends with `\\boxed{gold}`. With probability `meta_fraction` the solution plants a
slip in one step (an off-by-one or a sign slip) and a meta block catches it and restates the step
correctly, as in the seed example `7 - 3*(2 - 5)`: the body says the wrong value, the meta block
corrects it, and the rest of the solution continues from the corrected value. This makes a freshly
SFT-ed model emit meta blocks at a measurable rate, which the meta rewards then shape.

Every level is a chain of one-step facts on small numbers, so a held-out question is a new
combination of facts the train split teaches: a tiny model can generalise to it, and RL can
sharpen the facts it still gets wrong. Held-in and held-out splits never share a question: both come from one generator with one seed,
and the held-out split takes questions the train split does not contain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfdistill.data.example import Example
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN

DOMAINS = {1: "add_sub", 2: "add_sub", 3: "mul", 4: "mixed"}
BANDS = {1: "easy", 2: "medium", 3: "medium", 4: "hard"}


@dataclass
class Problem:
    question: str
    gold: int
    steps: list[tuple[str, int]]  # (expression, value) in solution order; the last value is gold
    level: int


def _signed(v: int) -> str:
    return str(v)


def _problem(level: int, rng: random.Random) -> Problem:
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-")
        v = a + b if op == "+" else a - b
        return Problem(f"{a}{op}{b}", v, [(f"{a}{op}{b}", v)], level)
    if level == 2:
        a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        mid = a + b if op1 == "+" else a - b
        v = mid + c if op2 == "+" else mid - c
        return Problem(f"{a}{op1}{b}{op2}{c}", v, [(f"{a}{op1}{b}", mid), (f"{mid}{op2}{c}", v)], level)
    if level == 3:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(0, 9)
        op = rng.choice("+-")
        p1 = a * b
        v = p1 + c if op == "+" else p1 - c
        return Problem(f"{a}*{b}{op}{c}", v, [(f"{a}*{b}", p1), (f"{p1}{op}{c}", v)], level)
    if level == 4:
        a, b, c, d = (rng.randint(1, 9) for _ in range(4))
        e = c - d
        f = b * e
        return Problem(f"{a}-{b}*({c}-{d})", a - f, [(f"{c}-{d}", e), (f"{b}*{e}", f), (f"{a}-{f}", a - f)], level)
    raise ValueError(f"synthetic level {level} does not exist; levels are 1, 2, 3, 4")


def _slip(value: int, rng: random.Random) -> int:
    """A plausible wrong value for one step: off by one, or the sign flipped."""
    options = [value + 1, value - 1] + ([-value] if value != 0 else [])
    return rng.choice(options)


def solution_text(p: Problem, slip_step: int | None = None, rng: random.Random | None = None) -> str:
    """Worked solution; with `slip_step`, that step is first written wrong and caught in meta."""
    parts = []
    for i, (expr, val) in enumerate(p.steps):
        if i == slip_step:
            assert rng is not None
            wrong = _slip(val, rng)
            parts.append(f"{expr}={wrong} {META_OPEN}check {expr}={val}{META_CLOSE}")
        else:
            parts.append(f"{expr}={val}")
    prefix = f"{p.question}: " if p.level in (2, 3) else ""
    return f"{prefix}{', '.join(parts)}. \\boxed{{{p.gold}}}"


def make_example(p: Problem, idx: int, split: str, meta: bool, rng: random.Random) -> Example:
    slip = rng.randrange(len(p.steps)) if meta else None
    return Example(
        id=f"synthetic-{split}-{idx}",
        prompt=[{"role": "user", "content": p.question}],
        gold=str(p.gold),
        data_source=f"synthetic/{DOMAINS[p.level]}",
        ability="arithmetic",
        domain=DOMAINS[p.level],
        difficulty=BANDS[p.level],
        solution=solution_text(p, slip, rng),
        extra={"level": p.level, "has_meta": meta},
    )


def generate_splits(
    num_train: int, num_eval: int, levels: list[int], eval_levels: list[int], meta_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held_out): disjoint question sets; levels drawn uniformly from the lists given."""
    if not 0 <= meta_fraction <= 1:
        raise ValueError(f"data.synthetic.meta_fraction={meta_fraction} must be in [0, 1]")
    rng = random.Random(seed)
    train, seen = [], set()
    attempts = 0
    while len(train) < num_train:
        attempts += 1
        if attempts > 50 * max(num_train, 1):
            raise ValueError(f"could not draw {num_train} distinct problems from levels {levels}; lower num_train")
        p = _problem(rng.choice(levels), rng)
        if p.question in seen:
            continue
        seen.add(p.question)
        train.append(make_example(p, len(train), "train", rng.random() < meta_fraction, rng))
    held_out, attempts = [], 0
    while len(held_out) < num_eval:
        attempts += 1
        if attempts > 50 * max(num_eval, 1):
            raise ValueError(f"could not draw {num_eval} held-out problems disjoint from train; lower num_eval")
        p = _problem(rng.choice(eval_levels), rng)
        if p.question in seen:
            continue
        seen.add(p.question)
        held_out.append(make_example(p, len(held_out), "heldout", False, rng))
    return train, held_out
