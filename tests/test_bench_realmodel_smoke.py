"""benchmarks/bench_memory.py and benchmarks/bench_data_load.py run end to end at a tiny size and
write their JSON (the full-size runs are the coordinator's, README)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_memory_smoke(tmp_path):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--preset", "tiny", "--device", "cpu",
           "--micro-batches", "8,2", "--checkpointing", "on", "--precisions", "bf16", "--threads", "1", "--ops-backend", "torch", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["shape"]["num_hidden_layers"] == 2 and doc["rows"] == 8
    assert [(r["micro_batch"], r["checkpointing"], r["precision"]) for r in doc["results"]] == [(8, True, "bf16"), (2, True, "bf16")]
    for r in doc["results"]:
        assert "error" not in r, r
        for key in ("peak_mb", "step_peak_mb", "step_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["peak_mb"] >= r["step_peak_mb"] and math.isfinite(r["activations_mb"])


@pytest.mark.slow
def test_bench_data_load_smoke(tmp_path):
    out = tmp_path / "data.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_data_load.py"), "--rows", "300", "--decoy-sample", "5",
           "--reps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["rows"] == 300 and doc["distinct_golds"] > 250 and doc["decoy_sample"] == 5
    assert doc["load_s"] > 0 and doc["decoy_s_per_row"] > 0 and 0 < doc["max_prompt_tokens_kept"] <= 300
