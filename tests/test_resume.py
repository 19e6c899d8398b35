"""Kill-and-resume: SIGKILL a run at several points after its first checkpoint, resume with
`trainer.resume=auto`, and require the same metrics trajectory and bitwise-identical weights as an
uninterrupted run (CPU, single process)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.metrics import read_metrics
from tests.conftest import TINY_RUN

ARGS = ["experiment=demo", *TINY_RUN, "sft.steps=6", "grpo.steps=4", "trainer.stages=[sft,grpo]",
        "trainer.save_every=1", "trainer.keep_last=2", "trainer.torch_threads=1"]
TIMING = ("perf/", "lr_")  # wall-clock metrics differ run to run


def _cmd(run_dir):
    return [sys.executable, "-m", "selfdistill.train", *ARGS, f"hydra.run.dir={run_dir}"]


def _final_weights(run_dir):
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    return load_file(os.path.join(run_dir, "checkpoints", latest, "model.safetensors"))


def _trajectory(run_dir):
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_cmd(d), check=True, capture_output=True, timeout=600)
    return d


def _kill_after_checkpoints(run_dir, n_checkpoints):
    """Start a run and SIGKILL it once `n_checkpoints` complete checkpoints exist."""
    proc = subprocess.Popen(_cmd(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if len(glob.glob(os.path.join(run_dir, "checkpoints", "*", "COMPLETE"))) + _pruned(run_dir) >= n_checkpoints:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def _pruned(run_dir):
    # checkpoints are pruned to keep_last: count written ones by their global step instead
    names = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*", "COMPLETE"))]
    steps = [int(n.rsplit("-", 1)[1]) for n in names]
    return max(steps, default=0) - len(names) if steps else 0


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [2, 7, 9])  # mid-SFT, early GRPO, late GRPO
def test_sigkill_then_resume_matches_uninterrupted(reference_run, tmp_path, kill_after):
    assert _kill_after_checkpoints(tmp_path, kill_after), "run finished before the kill point"
    resumed = subprocess.run(_cmd(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert _trajectory(tmp_path) == _trajectory(reference_run)
    a, b = _final_weights(tmp_path), _final_weights(reference_run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
