"""benchmarks/bench_step.py runs end to end at a tiny size under a sharded engine in one process
and writes per-arm tokens/s and peak memory (what issue #6 asks it to report per engine)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["single", "fsdp2"])
def test_bench_step_reports_throughput_and_memory(engine, tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--arms", "base,pmi", "--steps", "2", "--sft-steps", "2",
           "--batch-size", "2", "--n", "2", "--max-new-tokens", "8", "--reps", "1", "--engine", engine, "--json", str(out),
           "reward.grader_workers=1", "trainer.device=cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["engine"] == engine and set(doc["arms"]) == {"base", "pmi"}
    for arm, row in doc["arms"].items():
        for key in ("tokens_per_s", "peak_mem_mb", "step_s", "rollout_s", "update_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (arm, key, row)
        assert row["peak_mem_kind"] == "process_max_rss"
    assert "tokens/s" in proc.stdout and "peak_MB" in proc.stdout
