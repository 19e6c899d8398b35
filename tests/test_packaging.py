"""The wheel a regular (non-editable) install gets: `kernels/` inside the package as
`selfdistill.kernels` (never a top-level `kernels`), Hydra's `conf/` and the csrc sources as
package data, and both console scripts."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = glob.glob(str(out / "selfdistill-*.whl"))
    with zipfile.ZipFile(whl) as z:
        return z.namelist(), {n: z.read(n).decode() for n in z.namelist() if n.endswith("entry_points.txt")}


def test_wheel_layout(wheel_names):
    names, _ = wheel_names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"selfdistill"}, f"only the selfdistill package may be top level, got {sorted(tops)}"
    for need in ("selfdistill/kernels/__init__.py", "selfdistill/kernels/token_logprobs.py", "selfdistill/conf/config.yaml",
                 "selfdistill/conf/experiment/demo.yaml", "selfdistill/conf/experiment/pmi.yaml",
                 "selfdistill/csrc/token_logprobs.cpp", "selfdistill/csrc/token_logprobs_cuda.cu",
                 "selfdistill/csrc/policy_loss.cpp", "selfdistill/csrc/policy_loss_cuda.cu", "selfdistill/csrc/policy_loss_token.h",
                 "selfdistill/csrc/bindings.cpp", "selfdistill/csrc/contrast.cpp", "selfdistill/csrc/contrast_cuda.cu",
                 "selfdistill/csrc/online_lse_cuda.cuh", "selfdistill/csrc/online_lse.h"):
        assert need in names, need
    assert not any(n.startswith("tests/") for n in names)
    # every module of the source tree ships (a subpackage missing from pyproject's list would not)
    for path in glob.glob(os.path.join(ROOT, "selfdistill", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        assert rel in names, f"{rel} is not in the wheel: add its package to pyproject.toml [tool.setuptools] packages"


def test_console_scripts(wheel_names):
    _, entry_points = wheel_names
    (text,) = entry_points.values()
    assert "selfdistill-train = selfdistill.train:main" in text
    assert "selfdistill-report = selfdistill.report:main" in text
