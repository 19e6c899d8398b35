"""Evaluation (selfdistill.eval): difficulty bands, pass@k, grouping with n per cell, seeded
k-sample generation, every rank's share gathered, the held-in slice, validation during training."""

from __future__ import annotations

import json
import os
import random

import pytest

from selfdistill.config import ConfigError
from selfdistill.data.example import Example
from selfdistill.eval import (band_sort_key, difficulty_bands, evaluate, held_in_split, pass_at_k, rank_share,
                              summarize)
from selfdistill.metrics import read_metrics
from selfdistill.models import build_char_tokenizer
from selfdistill.rewards.grader import extract_boxed_answer
from selfdistill.rollout.base import rollout_seed
from selfdistill.trainer import Trainer
from tests.conftest import compose_config
from tests.meta_helpers import rollout_batch, tagged

TOK = build_char_tokenizer()


def test_numeric_difficulty_gets_quantile_bands():
    # 1..8 in 4 bands: numpy's linear quartiles are 2.75, 4.5, 6.25
    assert difficulty_bands([str(v) for v in range(1, 9)], 4) == ["Q1", "Q1", "Q2", "Q2", "Q3", "Q3", "Q4", "Q4"]
    # ties: [1,1,1,1,2,3,4,5] -> cut points 1, 1.5, 3.25; a value equal to a cut stays in the lower band
    assert difficulty_bands(["1", "1", "1", "1", "2", "3", "4", "5"], 4) == ["Q1"] * 4 + ["Q3", "Q3", "Q4", "Q4"]
    assert difficulty_bands(["0.5", None, "0.9"], 2) == ["Q1", "unknown", "Q2"]


def test_string_levels_are_kept_as_given_and_ordered():
    assert difficulty_bands(["hard", "easy", None, "3"], 4) == ["hard", "easy", "unknown", "3"]
    labels = ["unknown", "hard", "Level 10", "medium", "Q2", "easy", "Level 2", "Q10", "zeta"]
    assert sorted(labels, key=band_sort_key) == ["Q2", "Q10", "Level 2", "Level 10", "easy", "medium", "hard", "zeta", "unknown"]


def test_pass_at_k_hand_worked():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2) / C(5,2)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 1) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="k=3"):
        pass_at_k(2, 1, 3)


def _row(i, j, correct, meta=False, domain="alg", band="easy", source="s1"):
    return {"problem_index": i, "problem_id": f"p{i}", "sample": j, "correct": correct, "grade": int(correct), "meta": meta,
            "length": 10 + j, "truncated": False, "data_source": source, "domain": domain, "difficulty": band, "band": band}


def test_grouping_with_n_per_cell_and_meta_split_per_band():
    rows = [_row(0, 0, True, meta=True), _row(0, 1, False),  # p0 easy/alg: 1 of 2
            _row(1, 0, False, domain="geo", band="hard", meta=True), _row(1, 1, False, domain="geo", band="hard", meta=True),
            _row(2, 0, True, domain="geo", band="hard", source="s2"), _row(2, 1, True, domain="geo", band="hard", source="s2")]
    m = summarize(rows, "heldout", k=2)
    assert m["heldout/accuracy"] == pytest.approx(3 / 6) and m["heldout/n"] == 6 and m["heldout/problems"] == 3
    assert m["heldout/pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["heldout/meta_emission_rate"] == pytest.approx(3 / 6)
    assert m["heldout/mean_length"] == pytest.approx(10.5)
    assert (m["heldout/domain/alg/accuracy"], m["heldout/domain/alg/n"]) == (0.5, 2)
    assert (m["heldout/domain/geo/accuracy"], m["heldout/domain/geo/n"]) == (0.5, 4)
    assert (m["heldout/data_source/s1/n"], m["heldout/data_source/s2/accuracy"]) == (4, 1.0)
    assert m["heldout/band/hard/with_meta/n"] == 2 and m["heldout/band/hard/with_meta/accuracy"] == 0.0
    assert m["heldout/band/hard/without_meta/accuracy"] == 1.0 and m["heldout/band/hard/meta_emission_rate"] == 0.5
    assert m["heldout/band/easy/with_meta/accuracy"] == 1.0 and m["heldout/band/easy/without_meta/accuracy"] == 0.0
    assert (m["heldout/with_meta/accuracy"], m["heldout/without_meta/accuracy"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert "heldout/domain/alg/with_meta/n" not in m  # the meta split is per band


class SeededFakeBackend:
    """Answers `\\boxed{2}` (right) or `\\boxed{5}` (wrong) from the row's seed alone, with a meta
    block when the seed is odd; greedy rows answer right. Records every call."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, meta_modes, *, max_new_tokens, temperature, top_p, greedy=False, seeds=None):
        self.calls.append({"rows": len(prompt_ids), "greedy": greedy, "seeds": seeds, "temperature": temperature, "top_p": top_p})
        texts = []
        for r in range(len(prompt_ids)):
            s = None if seeds is None else seeds[r]
            answer = "2" if s is None or s % 3 else "5"
            texts.append(("<|meta|>check<|/meta|>" if s is not None and s % 2 else "") + f"\\boxed{{{answer}}}")
        return rollout_batch(TOK, [tagged(TOK, t) for t in texts], prompts=prompt_ids)


class ExactGrader:
    def grade(self, completions, golds):
        return [int(extract_boxed_answer(p) == g) for p, g in zip(completions, golds)]


def _examples(n):
    return [Example(id=f"q{i}", prompt=[{"role": "user", "content": f"{i}+0"}], gold="2", domain=("a", "b")[i % 2],
                    difficulty=str(i)) for i in range(n)]


def test_k_samples_are_seeded_per_problem_and_sample_and_greedy_is_the_k1_default():
    backend, exs = SeededFakeBackend(), _examples(4)
    res = evaluate(backend, TOK, exs, ExactGrader(), max_new_tokens=8, batch_size=5, samples_per_problem=3,
                   temperature=0.7, top_p=0.9, seed_keys=(11, 2), prefix="heldout")
    seeds = [s for c in backend.calls for s in c["seeds"]]
    assert seeds == [rollout_seed(11, 2, i, j) for i in range(4) for j in range(3)]
    assert all(not c["greedy"] and c["temperature"] == 0.7 and c["top_p"] == 0.9 for c in backend.calls)
    assert [c["rows"] for c in backend.calls] == [5, 5, 2]
    assert [(r["problem_index"], r["sample"]) for r in res.rows] == [(i, j) for i in range(4) for j in range(3)]
    # the fake answers from the seed: expected correctness and meta computed here independently
    expect = [(bool(rollout_seed(11, 2, i, j) % 3), bool(rollout_seed(11, 2, i, j) % 2)) for i in range(4) for j in range(3)]
    assert [(r["correct"], r["meta"]) for r in res.rows] == expect
    per_problem = [[c for c, _ in expect[3 * i: 3 * i + 3]] for i in range(4)]
    assert res.metrics["heldout/pass@3"] == pytest.approx(sum(any(p) for p in per_problem) / 4)
    assert res.metrics["heldout/accuracy"] == pytest.approx(sum(c for c, _ in expect) / 12)
    assert res.rows[0]["band"] == "Q1" and res.rows[-1]["band"] == "Q4"  # difficulty 0..3 in 4 quantile bands

    greedy_backend = SeededFakeBackend()
    res = evaluate(greedy_backend, TOK, exs, ExactGrader(), max_new_tokens=8, batch_size=8, prefix="heldin")
    assert greedy_backend.calls[0]["greedy"] and greedy_backend.calls[0]["seeds"] is None
    assert res.metrics["heldin/accuracy"] == 1.0 and res.metrics["heldin/pass@1"] == 1.0


@pytest.mark.parametrize("world_size", [2, 3])
def test_an_odd_split_over_ranks_evaluates_every_problem_once(world_size):
    exs = _examples(7)
    single = evaluate(SeededFakeBackend(), TOK, exs, ExactGrader(), max_new_tokens=8, batch_size=2, samples_per_problem=2,
                      seed_keys=(3, 1)).rows
    shares, calls = [], []
    for rank in range(world_size):
        backend = SeededFakeBackend()
        # the gather hands back this rank's rows only; the union over ranks is checked below
        shares.append(evaluate(backend, TOK, exs, ExactGrader(), max_new_tokens=8, batch_size=2, samples_per_problem=2,
                               seed_keys=(3, 1), rank=rank, world_size=world_size, gather=lambda rows: [rows]).rows)
        calls.append(len(backend.calls))
    merged = sorted((r for s in shares for r in s), key=lambda r: (r["problem_index"], r["sample"]))
    assert merged == single  # every problem once, the same samples as one process
    assert len(set(calls)) == 1, f"ranks made different numbers of generate calls: {calls}"
    assert [len(rank_share(7, r, world_size)) for r in range(world_size)] == ([3, 4] if world_size == 2 else [2, 2, 3])


def test_held_in_slice_is_fixed_by_the_data_disjoint_and_unseen():
    train = [Example(id=f"t{i}", prompt=[{"role": "user", "content": str(i)}], gold="1") for i in range(50)]
    rest, held_in = held_in_split(train, 10)
    assert len(held_in) == 10 and len(rest) == 40
    assert {ex.id for ex in rest}.isdisjoint(ex.id for ex in held_in)
    shuffled = train[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(ex.id for ex in held_in_split(shuffled, 10)[1]) == sorted(ex.id for ex in held_in)
    assert held_in_split(train, 0) == (train, [])
    with pytest.raises(ValueError, match="eval.val_size=50 leaves no training rows"):
        held_in_split(train, 50)


def test_a_val_file_sharing_a_train_prompt_is_rejected(tmp_path):
    from selfdistill.data.loading import save_examples

    train = [Example(id=f"t{i}", prompt=[{"role": "user", "content": str(i)}], gold="1") for i in range(5)]
    save_examples([Example(id="v0", prompt=[{"role": "user", "content": "3"}], gold="1")], tmp_path / "val.jsonl")
    with pytest.raises(ValueError, match="1 held-in rows \\(first id 'v0'\\)"):
        held_in_split(train, 0, str(tmp_path / "val.jsonl"))
    save_examples([Example(id="v0", prompt=[{"role": "user", "content": "new"}], gold="1")], tmp_path / "ok.jsonl")
    rest, held_in = held_in_split(train, 0, str(tmp_path / "ok.jsonl"))
    assert rest == train and [ex.id for ex in held_in] == ["v0"]


@pytest.mark.parametrize("override, fragment", [
    (["eval.samples_per_problem=4", "eval.greedy=true"], "eval.greedy=true with eval.samples_per_problem=4"),
    (["eval.every=5"], "eval.every=5 needs a held-in set"),
    (["eval.val_size=5", "data.val_path=v.jsonl"], "both define the held-in set"),
    (["eval.top_p=0"], "eval.top_p=0"),
    (["eval.temperature=0"], "eval.temperature=0"),
    (["eval.bands=0"], "eval.bands=0 must be >= 1"),
    (["eval.val_size=5", "eval.every=2", "eval.val_stages=[eval]"], "eval.val_stages[]='eval' is not valid"),
])
def test_bad_eval_settings_fail_at_start(override, fragment):
    with pytest.raises(ConfigError) as e:
        compose_config(["experiment=demo", *override])
    assert fragment in str(e.value)


def test_validation_runs_every_n_steps_of_the_chosen_stages(tiny_config, tmp_path):
    cfg = tiny_config(["eval.val_size=6", "eval.every=2", "eval.val_stages=[grpo]", "trainer.stages=[sft,eval,grpo,eval]"])
    summary = Trainer(cfg, str(tmp_path)).run()
    rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [(r["step"], r["stage"]) for r in rows if r["stage"] in ("val", "eval")] == [(4, "eval"), (6, "val"), (7, "eval")]
    val = next(r for r in rows if r["stage"] == "val")
    assert val["during"] == "grpo" and val["heldin/n"] == 6 and "heldout/accuracy" not in val
    # the eval stages carry held-in too (no validation at those steps), so held-in starts where GRPO starts
    assert all("heldin/accuracy" in e and "heldout/accuracy" in e for e in summary["evals"])
    samples = [json.loads(line) for line in open(os.path.join(tmp_path, "eval_samples.jsonl"))]
    points = sorted({(r["split"], r["step"], r["stage"]) for r in samples})
    assert points == [("heldin", 4, "sft"), ("heldin", 6, "grpo"), ("heldin", 7, "grpo"), ("heldout", 4, "sft"), ("heldout", 7, "grpo")]
    assert sum(r["split"] == "heldout" and r["step"] == 7 for r in samples) == 8  # every held-out problem once
    manifest = json.load(open(os.path.join(tmp_path, "manifest.json")))
    assert manifest["data"]["splits"]["train"]["n"] == 64 - 6 and manifest["data"]["splits"]["heldin"]["n"] == 6
