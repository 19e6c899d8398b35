"""tests/gpu_checks.py (the device check script) runs and passes: here on CPU (Triton interpreter,
csrc CPU path); on a CUDA machine also in CUDA mode (compiled Triton, csrc CUDA kernels). And its
checks stand alone: a csrc build that fails and a check that kills its process are recorded as
those checks' failures while every other check still runs and passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N_CHECKS = 26  # triton/import, csrc/build, then 24 op / backend (/ dtype) checks


def run_checks(device, out, *extra, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_checks.py"), "--device", device, "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=900, env=env)
    return proc, json.loads(out.read_text())


@pytest.mark.parametrize("device", DEVICES)
def test_device_checks_pass(device, tmp_path):
    proc, doc = run_checks(device, tmp_path / "checks.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [c["check"] for c in doc["checks"]]
    assert doc["ok"] and len(set(names)) == len(names) == N_CHECKS and names == doc["planned"], names
    assert all(e["ok"] for c in doc["checks"] if c["check"] not in ("triton/import", "csrc/build") for e in c["errors"])
    assert doc["running"] is None and all(run["complete"] for run in doc["runs"])
    assert f"gpu_checks: {N_CHECKS}/{N_CHECKS} checks passed" in proc.stdout


def test_a_failed_csrc_build_and_a_crashed_check_fail_only_themselves(tmp_path):
    """No C++ compiler (CXX=false, an empty extensions cache): csrc/build fails, and so does every csrc
    check, without a rebuild each; the worker is killed inside fused_linear/triton/fp32 and a new one
    goes on. Every other check runs and passes, and the JSON holds all of them."""
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc, doc = run_checks("cpu", tmp_path / "checks.json", "--die-in", "fused_linear/triton/fp32", env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {c["check"]: c for c in doc["checks"]}
    assert list(rows) == doc["planned"] and len(rows) == N_CHECKS and doc["ok"] is False
    failed = {name for name, row in rows.items() if not row["ok"]}
    assert failed == {"csrc/build", "fused_linear/triton/fp32"} | {n for n in rows if "/csrc/" in n or n.endswith("/csrc")}, failed
    assert all(rows[n]["error"] == "not run: csrc/build failed" for n in failed - {"csrc/build", "fused_linear/triton/fp32"})
    assert "died in this check" in rows["fused_linear/triton/fp32"]["error"]
    assert all(e["ok"] for name, row in rows.items() if name not in failed for e in row.get("errors", []))
    assert "token_logprobs/triton/bf16" in rows and rows["gold_decoy_contrast/triton/fp32"]["ok"]  # ran after the crash
    assert rows["topk_distill/triton/bf16"]["ok"] and rows["belief_shift/triton"]["ok"]
