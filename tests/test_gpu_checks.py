"""tests/gpu_checks.py (the device check script) runs and passes: here on CPU (Triton interpreter,
csrc CPU path); on a CUDA machine also in CUDA mode (compiled Triton, csrc CUDA kernels)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_checks_pass(device, tmp_path):
    out = tmp_path / "checks.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_checks.py"), "--device", device, "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    names = {c["check"] for c in doc["checks"]}
    assert doc["ok"] and len(names) == 18, names
    assert all(e["ok"] for c in doc["checks"] for e in c["errors"])
