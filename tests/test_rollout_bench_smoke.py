"""benchmarks/bench_rollout.py runs on CPU at a tiny size and writes one JSON row per variant, each
of ours with the eager variant's token ids."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_rollout_writes_rows_with_equal_tokens(tmp_path):
    out = tmp_path / "rollout.json"
    variants = "eager,eager_python_step,eager_no_prefix_sharing,eager_no_compaction,hf_generate"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_rollout.py"), "--device", "cpu", "--shapes", "tiny", "--variants", variants,
           "--prompts", "2", "--n", "3", "--max-new-tokens", "6", "--reps", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == set(variants.split(",")) and doc["machine"]["cpu_count"] >= 1
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["rows"] == 6 and 0 < row["tokens"] <= 36 and math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        if name != "hf_generate":
            assert name == "eager" or row["tokens_equal_eager"] is True, row
    assert "tokens_per_s" in proc.stdout
