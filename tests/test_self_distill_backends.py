"""SDPO with top-K distillation under `ops.backend=triton` (the Triton interpreter on CPU: the fused
log-probs, policy loss and top-K kernels) trains like `ops.backend=torch`: the distillation term
reaches the dispatched kernel on the trainer's real path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.metrics import read_metrics
from tests.conftest import TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["experiment=sdpo", *TINY_RUN, "sft.steps=3", "sdpo.steps=2", "sdpo.batch_size=2", "sdpo.lr=1e-3", "sdpo.warmup_steps=0",
        "rollout.max_new_tokens=10", "algo.distill.loss=topk", "algo.distill.topk=8", "algo.distill.feedback=true",
        "trainer.stages=[sft,sdpo]", "trainer.device=cpu"]


def _train(backend: str, run_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1" if backend == "triton" else "0")
    proc = subprocess.run([sys.executable, "-m", "selfdistill.train", *ARGS, f"ops.backend={backend}", f"hydra.run.dir={run_dir}"],
                          cwd=run_dir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["stage"] == "sdpo"]
    return rows, load_file(os.path.join(run_dir, "checkpoints", latest, "model.safetensors"))


@pytest.mark.slow
def test_sdpo_topk_under_triton_trains_like_torch(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "triton").mkdir()
    want_rows, want_w = _train("torch", tmp_path / "torch")
    got_rows, got_w = _train("triton", tmp_path / "triton")
    assert len(got_rows) == len(want_rows) == 2
    assert all(r["self_distillation/teacher_fraction"] > 0 for r in want_rows), "no teacher: the top-K term never ran"
    for a, b in zip(got_rows, want_rows):
        for k in ("reward", "accuracy", "num_tokens", "self_distillation/teacher_fraction"):
            assert a[k] == b[k], k
        for k in ("loss", "grad_norm", "self_distillation/distill_loss", "self_distillation/teacher_student_kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for k, v in want_w.items():
        torch.testing.assert_close(got_w[k], v, rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")
