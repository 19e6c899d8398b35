"""The two result commands of issue 12 run end to end at a tiny size, print their markdown table and
write JSON (benchmarks/sdft_recipes.py, benchmarks/sdpo_vs_grpo.py). Their numbers here mean
nothing; the full tables are taken on an idle machine."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, tmp_path, *args):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--seeds", "0", "--smoke", "--threads", "1", "--out",
           str(tmp_path / "runs"), "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_sdft_recipes_command(tmp_path):
    doc, stdout = _run("sdft_recipes.py", tmp_path)
    assert set(doc["recipes"]) == {"sdft_baseline", "sdft_evolved"} and doc["smoke"]
    for recipe, seeds in doc["recipes"].items():
        r = seeds["0"]
        assert r["steps"] == 3 and 0 < r["final_score"] <= 1 and math.isfinite(r["final_eval_token_loss"]), (recipe, r)
        assert r["final_score"] == pytest.approx(1 / (1 + r["final_eval_token_loss"]))
        assert [e["step"] for e in r["evals"]] == [2, 3]
    assert "| sdft_evolved |" in stdout and "evolved - baseline" in stdout


@pytest.mark.slow
def test_sdpo_vs_grpo_command(tmp_path):
    doc, stdout = _run("sdpo_vs_grpo.py", tmp_path, "--arms", "grpo,sdpo_ema", "algo.distill.feedback=true")
    assert set(doc["arms"]) == {"grpo", "sdpo_ema"}
    for arm, seeds in doc["arms"].items():
        r = seeds["0"]
        assert r["steps"] == 3 and len(r["entropy"]) == 3 and len(r["emission"]) == 3, (arm, r)
        assert 0 <= r["heldout_after_sft"] <= 1 and 0 <= r["heldout_after_rl"] <= 1
    assert len(doc["arms"]["sdpo_ema"]["0"]["teacher_student_kl"]) == 3 and "teacher_student_kl" not in doc["arms"]["grpo"]["0"]
    assert doc["arms"]["sdpo_ema"]["0"]["teacher_fraction_last"] > 0  # feedback gives the tiny model's rollouts a teacher
    assert "| sdpo_ema |" in stdout
