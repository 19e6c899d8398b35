"""benchmarks/bench_scoring.py runs end to end at its tiny CPU preset and writes well-formed JSON:
one row per (arm, provider), the fused path under every backend (Triton through the interpreter,
the csrc CPU path, the torch reference) agreeing with the reference path to fp32 rounding while it
sends fewer rows through a vocabulary pass."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ["before", "after_triton", "after_cuda", "after_torch"]


def test_bench_scoring_cpu_preset_writes_finite_json(tmp_path):
    out = tmp_path / "scoring.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--device", "cpu", "--preset", "tiny", "--reps", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["kernel"] == "scoring" and doc["device"] == "cpu" and doc["preset"] == "tiny"
    assert [run["complete"] for run in doc["runs"]] == [True]
    rows = doc["rows"]
    assert [(r["arm"], r["provider"]) for r in rows] == [(a, p) for a in ("pmi_shift", "gm") for p in PROVIDERS]
    for r in rows:
        assert "error" not in r, r
        for key in ("ms", "peak_mem_mb", "max_diff"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["ms"] > 0 and r["max_diff"] < 1e-4, r
        if r["provider"] != "before":
            # R=8 rows, L=6: rows diverge at 3 (all), 4 (odd rows), 5 (every fourth): 6 later positions
            # per context, both passes -> 24 rows through a vocabulary pass instead of one per read
            assert r["vocab_rows"] == 24 and r["reads"] == 2 * (8 * 2 + 6 * 2)
    assert "before" in proc.stdout and "after_cuda" in proc.stdout
