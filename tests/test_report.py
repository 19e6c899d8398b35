"""selfdistill-report on synthetic sweep directories built here: real manifests, hand-written
per-sample rows, so every number the report prints has a hand-worked value."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from selfdistill.config import ReportConfig
from selfdistill.report import build_report, main, report_config
from selfdistill.report.runs import read_samples
from selfdistill.report.statistics import mcnemar_exact, paired_bootstrap_ci, stratified_meta_gap
from selfdistill.report.writer import SECTIONS
from tests.report_helpers import make_run, sample_rows

BASE_OUT = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0]  # 5 / 12
ARM_OUT = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]  # 10 / 12: six problems gained (b), one lost (c)


def heldin(step: int, correct: int, n: int = 10) -> list[dict]:
    return sample_rows("heldin", step, [1] * correct + [0] * (n - correct))


def run_rows(heldout_correct, heldin_correct: dict[int, int], step: int = 10) -> list[dict]:
    rows = sample_rows("heldout", step, heldout_correct)
    for s, c in heldin_correct.items():
        rows += heldin(s, c)
    return rows


def cfg(**kw) -> ReportConfig:
    return ReportConfig(bootstrap_samples=500, **kw)


@pytest.fixture
def pair_sweep(tmp_path):
    make_run(tmp_path, "base", 1, run_rows(BASE_OUT, {5: 5, 10: 5}))
    make_run(tmp_path, "pmi", 1, run_rows(ARM_OUT, {5: 6, 10: 7}))
    return tmp_path


def test_mcnemar_exact_matches_the_hand_computed_binomial_tail():
    # b = 6, c = 1: 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (1 + 7) / 128
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0  # capped at 1
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)


def test_paired_bootstrap_ci_against_a_loop_reference():
    diffs = np.array([1.0, 0.0, -1.0, 1.0, 1.0, 0.0, 0.5, 0.0])
    lo, hi = paired_bootstrap_ci(diffs, samples=400, seed=7, confidence=0.9)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, len(diffs), size=(400, len(diffs)))
    means = [sum(diffs[i] for i in row) / len(row) for row in draws]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [5, 95])), abs=1e-12)
    assert paired_bootstrap_ci(np.full(9, 0.25), samples=200, seed=1, confidence=0.95) == (0.25, 0.25)
    # Many problems: the interval approaches the normal one, mean +- 1.96 sd / sqrt(n).
    big = np.random.default_rng(3).choice([-1.0, 0.0, 1.0], size=2000, p=[0.2, 0.5, 0.3])
    lo, hi = paired_bootstrap_ci(big, samples=2000, seed=0, confidence=0.95)
    half = 1.96 * big.std(ddof=1) / math.sqrt(len(big))
    assert lo == pytest.approx(big.mean() - half, abs=0.15 * half) and hi == pytest.approx(big.mean() + half, abs=0.15 * half)


def test_known_deltas_ci_and_mcnemar_from_a_sweep_directory(pair_sweep):
    report = build_report([str(pair_sweep)], cfg(bootstrap_seed=5))
    (pair,) = report["comparisons"]
    assert pair["compared"] and pair["step"] == 10 and pair["problems"] == 12
    assert pair["base_accuracy"] == pytest.approx(5 / 12) and pair["accuracy"] == pytest.approx(10 / 12)
    assert pair["gain"] == pytest.approx(5 / 12)
    assert pair["mcnemar"] == {"b": 6, "c": 1, "pairs": 12, "p": pytest.approx(0.125)}
    ids = sorted(f"p{i}" for i in range(12))  # problems are paired in id order
    diffs = np.array([ARM_OUT[int(p[1:])] - BASE_OUT[int(p[1:])] for p in ids], dtype=float)
    assert pair["ci"] == list(paired_bootstrap_ci(diffs, samples=500, seed=5, confidence=0.95))
    assert pair["ci"][0] <= 5 / 12 <= pair["ci"][1]
    # held-in: 0.6 - 0.5 at step 5, 0.7 - 0.5 at step 10
    assert [(p["step"], round(p["delta"], 9)) for p in report["heldin_deltas"]["pmi"]["mean"]] == [(5, 0.1), (10, 0.2)]
    assert pair["heldin_step"] == 10 and pair["heldin_gain"] == pytest.approx(0.2)
    # rerunning with the same seed gives the same interval; another seed another one
    assert build_report([str(pair_sweep)], cfg(bootstrap_seed=5))["comparisons"][0]["ci"] == pair["ci"]
    assert build_report([str(pair_sweep)], cfg(bootstrap_seed=6))["comparisons"][0]["ci"] != pair["ci"]


def test_every_section_is_written_with_the_ledger_first(pair_sweep):
    report = build_report([str(pair_sweep)], cfg())
    md = open(os.path.join(pair_sweep, "report.md")).read()
    positions = [md.index(f"## {i}. {title}") for i, title in enumerate(SECTIONS, start=1)]
    assert positions == sorted(positions) and SECTIONS[0] == "Twin audit ledger"
    assert set(report["plots"]) == {"val_accuracy", "delta_vs_base", "domains", "bands", "meta_by_band"}
    for rel in report["plots"].values():
        assert f"]({rel})" in md
        with open(os.path.join(pair_sweep, rel), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(pair_sweep, "report.json")))
    assert saved["comparisons"][0]["mcnemar"]["b"] == 6 and saved["plots"] == report["plots"]


def test_the_audit_catches_a_planted_hyperparameter_and_a_different_eval_file(tmp_path):
    make_run(tmp_path, "base", 1, run_rows(BASE_OUT, {10: 5}))
    make_run(tmp_path, "pmi", 1, run_rows(ARM_OUT, {10: 7}), overrides={"grpo.lr": 0.123}, heldout_sha="other-file")
    make_run(tmp_path, "cf", 1, run_rows(ARM_OUT, {10: 7}))  # differs in reward and its rollout split only
    report = build_report([str(tmp_path)], cfg())
    ledger = {e["run"]: e for e in report["audit"]}
    bad = {c["check"]: c for c in ledger["pmi/seed1"]["checks"]}
    assert bad["config"]["status"] == "fail" and "grpo.lr" in bad["config"]["detail"] and "0.123" in bad["config"]["detail"]
    assert [d["key"] for d in ledger["pmi/seed1"]["config_differences"]["disallowed"]] == ["grpo.lr"]
    assert bad["held-out data"]["status"] == "fail"
    assert all(bad[c]["status"] == "pass" for c in ("base twin", "held-in data", "grader", "decoys", "steps", "finished", "code"))
    assert not ledger["pmi/seed1"]["passed"]
    good = ledger["cf/seed1"]
    assert good["passed"], good["checks"]
    assert {d["key"] for d in good["config_differences"]["arm"]} == {"reward.name", "experiment_name", "rollout.split_arms"}
    # a failed audit marks the comparison; it does not hide it
    pmi = next(p for p in report["comparisons"] if p["run"] == "pmi/seed1")
    assert pmi["compared"] and pmi["audit_passed"] is False
    md = open(os.path.join(tmp_path, "report.md")).read()
    ledger_md = md[md.index("## 1."):md.index("## 2.")]
    assert "| pmi/seed1 | base/seed1 |" in ledger_md and "**FAIL**" in ledger_md and "grpo.lr" in ledger_md


def test_drift_flag_on_planted_disagreements(tmp_path):
    held_out_down = [1] * 4 + [0] * 6  # base 5/10, arm 4/10: held-out gain -0.1
    make_run(tmp_path, "base", 1, run_rows([1] * 5 + [0] * 5, {10: 5}))
    make_run(tmp_path, "pmi", 1, run_rows(held_out_down, {10: 8}))  # held-in +0.3, held-out -0.1
    make_run(tmp_path, "gm", 1, run_rows([1] * 6 + [0] * 4, {10: 6}))  # +0.1 and +0.1
    make_run(tmp_path, "cf", 1, run_rows([1] * 6 + [0] * 4, {10: 8}))  # +0.3 and +0.1: same sign, 0.2 apart
    report = build_report([str(tmp_path)], cfg(drift_threshold=0.15))
    by = {p["arm"]: p for p in report["comparisons"]}
    assert by["pmi"]["heldin_gain"] == pytest.approx(0.3) and by["pmi"]["gain"] == pytest.approx(-0.1)
    assert by["pmi"]["drift"]["flag"] and "opposite signs" in by["pmi"]["drift"]["reason"]
    assert by["gm"]["drift"] == {"flag": False, "reason": "consistent"}
    assert by["cf"]["drift"]["flag"] and "opposite" not in by["cf"]["drift"]["reason"]
    assert build_report([str(tmp_path)], cfg(drift_threshold=0.25))["comparisons"][0]["drift"]["flag"] is False  # cf
    assert report["summary"]["arms"]["pmi"]["drift"]["flag"] is True


def test_pooled_and_stratified_meta_comparisons_are_reported_both_ways(tmp_path):
    # easy: with meta 2/2, without 7/8 (+0.125); hard: with meta 2/8, without 0/2 (+0.25).
    # Pooled: with 4/10 = 0.4, without 7/10 = 0.7 (-0.3): meta looks harmful only because it is
    # written mostly on hard problems.
    correct = [1, 1] + [1] * 7 + [0] + [1, 1] + [0] * 6 + [0, 0]
    meta = [1, 1] + [0] * 8 + [1] * 8 + [0, 0]
    bands = ["easy"] * 10 + ["hard"] * 10
    make_run(tmp_path, "base", 1, sample_rows("heldout", 10, correct, meta=meta, bands=bands))
    report = build_report([str(tmp_path)], cfg())
    m = report["breakdowns"]["meta"]["base"]
    assert m["pooled_gap"] == pytest.approx(-0.3)
    assert m["stratified_gap"] == pytest.approx((10 * 0.125 + 10 * 0.25) / 20)
    assert m["reversal"] is True and m["bands_used"] == ["easy", "hard"]
    cells = report["breakdowns"]["band"]["base"]
    assert cells["easy"]["with_meta"] == {"n": 2, "accuracy": 1.0} and cells["hard"]["without_meta"] == {"n": 2, "accuracy": 0.0}
    assert cells["hard"]["meta_emission_rate"] == pytest.approx(0.8)
    md = open(os.path.join(tmp_path, "report.md")).read()
    assert "Simpson reversal" in md and "| **pooled** | 0.400 (n=10) | 0.700 (n=10) | -0.300 |" in md
    assert "+0.188" in md  # the stratified gap beside it
    assert stratified_meta_gap({}, cells["easy"])["stratified_gap"] is None


def test_failed_and_running_runs_are_marked(tmp_path):
    make_run(tmp_path, "base", 1, run_rows(BASE_OUT, {10: 5}))
    make_run(tmp_path, "pmi", 1, run_rows(ARM_OUT, {10: 7}))
    make_run(tmp_path, "base", 2, heldin(10, 5), status="running")
    make_run(tmp_path, "pmi", 2, heldin(10, 4), status="failed", error="CUDA out of memory")
    os.makedirs(tmp_path / "gm_seed1")
    open(tmp_path / "gm_seed1" / "metrics.jsonl", "w").close()
    report = build_report([str(tmp_path)], cfg())
    st = report["status"]
    assert st["partial"] and {u["run"]: u["status"] for u in st["unfinished"]} == {"base/seed2": "running", "pmi/seed2": "failed"}
    assert st["skipped"] == [{"path": str(tmp_path / "gm_seed1"), "reason": "no manifest.json"}]
    by = {p["run"]: p for p in report["comparisons"]}
    assert by["pmi/seed1"]["compared"] and not by["pmi/seed2"]["compared"]
    assert by["pmi/seed2"]["reason"] == "base running, arm failed"
    assert report["summary"]["arms"]["pmi"]["seeds"] == [1]  # statistics over finished runs only
    assert set(report["heldin_curves"]["pmi"]["runs"]) == {"pmi/seed1", "pmi/seed2"}  # curves keep every run
    md = open(os.path.join(tmp_path, "report.md")).read()
    assert "PARTIAL SWEEP" in md and "pmi/seed2 **[failed]**" in md and "CUDA out of memory" in md
    assert "base/seed2 **[running]**" in md


def test_the_base_seed_spread_is_the_noise_anchor(tmp_path):
    for seed, base_correct in ((1, 10), (2, 12), (3, 11)):  # 0.50, 0.60, 0.55 of 20: spread 0.10
        make_run(tmp_path, "base", seed, sample_rows("heldout", 10, [1] * base_correct + [0] * (20 - base_correct)))
        make_run(tmp_path, "pmi", seed, sample_rows("heldout", 10, [1] * (base_correct + 1) + [0] * (19 - base_correct)))
        make_run(tmp_path, "gm", seed, sample_rows("heldout", 10, [1] * (base_correct + 5) + [0] * (15 - base_correct)))
    report = build_report([str(tmp_path)], cfg())
    s = report["summary"]
    assert s["anchor"]["n"] == 3 and s["anchor"]["range"] == pytest.approx(0.10)
    assert s["anchor"]["std"] == pytest.approx(np.std([0.5, 0.6, 0.55], ddof=1))
    assert s["arms"]["pmi"]["gain"]["mean"] == pytest.approx(0.05) and s["arms"]["pmi"]["noise"] == "noise"
    assert s["arms"]["gm"]["gain"]["mean"] == pytest.approx(0.25) and s["arms"]["gm"]["noise"] == "above noise"
    assert s["arms"]["pmi"]["accuracy"]["mean"] == pytest.approx(0.6)


def test_a_resumed_runs_repeated_samples_count_once(tmp_path):
    rows = sample_rows("heldout", 10, [0, 0, 1])
    again = sample_rows("heldout", 10, [1, 0, 1])  # re-evaluated after a resume: the last row wins
    run = make_run(tmp_path, "base", 1, rows + again)
    got = read_samples(os.path.join(run, "eval_samples.jsonl"))
    assert sorted((r["problem_index"], r["correct"]) for r in got) == [(0, True), (1, False), (2, True)]


def test_cli_writes_the_report_and_rejects_a_mistyped_key(pair_sweep, capsys):
    main([str(pair_sweep), "report.drift_threshold=0.5", "report.bootstrap_samples=200"])
    out = capsys.readouterr().out
    assert out.startswith("Twin audit ledger") and "pmi/seed1" in out
    assert os.path.isfile(pair_sweep / "report.md") and os.path.isfile(pair_sweep / "report.json")
    assert json.load(open(pair_sweep / "report.json"))["config"]["drift_threshold"] == 0.5
    with pytest.raises(Exception, match="drift_treshold"):
        report_config(["report.drift_treshold=0.5"])
    with pytest.raises(SystemExit, match="report.confidence=1.5"):
        main([str(pair_sweep), "report.confidence=1.5"])
    with pytest.raises(SystemExit, match="no run with a manifest"):
        main([str(pair_sweep / "plots")])


def _git(repo, *args):
    import subprocess

    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_code_check_compares_source_hashes_and_else_asks_git_whether_code_changed(tmp_path):
    from selfdistill.report.audit import code_check

    same, other = {"code": {"sha256": "a" * 64, "files": 3}}, {"code": {"sha256": "b" * 64, "files": 3}}
    assert code_check(same, dict(same))["status"] == "pass"
    assert code_check(other, same)["status"] == "fail"
    # manifests without a source hash: a checkout where commit 2 changes only the README and
    # commit 3 a file under selfdistill/
    repo = str(tmp_path)
    _git(repo, "init", "-q")
    os.makedirs(os.path.join(repo, "selfdistill"))
    for name, text in (("README.md", "a\n"), ("selfdistill/x.py", "x = 1\n")):
        with open(os.path.join(repo, name), "w") as f:
            f.write(text)
    _git(repo, "add", "-A"), _git(repo, "commit", "-qm", "one")
    c1 = _git(repo, "rev-parse", "HEAD")
    with open(os.path.join(repo, "README.md"), "w") as f:
        f.write("b\n")
    _git(repo, "commit", "-qam", "docs")
    c2 = _git(repo, "rev-parse", "HEAD")
    with open(os.path.join(repo, "selfdistill/x.py"), "w") as f:
        f.write("x = 2\n")
    _git(repo, "commit", "-qam", "code")
    c3 = _git(repo, "rev-parse", "HEAD")

    def legacy(commit, dirty=False):
        return {"git": {"commit": commit, "dirty": dirty}}

    assert code_check(legacy(c1), legacy(c1), repo)["status"] == "pass"
    docs_only = code_check(legacy(c2), legacy(c1), repo)
    assert docs_only["status"] == "pass" and "only outside" in docs_only["detail"]
    code = code_check(legacy(c3), legacy(c1), repo)
    assert code["status"] == "fail" and "differ in code" in code["detail"]
    unknown_history = code_check(legacy("f" * 40), legacy(c1), repo)
    assert unknown_history["status"] == "fail" and "does not hold" in unknown_history["detail"]
    assert code_check(legacy(c2, dirty=True), legacy(c1), repo)["status"] == "n/a"
    assert code_check(legacy("unknown"), legacy(c1), repo)["status"] == "n/a"
