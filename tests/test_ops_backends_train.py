"""Integration: the same short SFT + GRPO run with `ops.backend=torch`, `triton` (the Triton
interpreter on CPU) and `cuda` (the csrc extension's CPU path) trains the same model: equal rewards
and token counts, losses and grad norms to float rounding, final weights to Adam's rounding."""

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
ARGS = ["experiment=demo", *TINY_RUN, "sft.steps=3", "grpo.steps=2", "trainer.stages=[sft,grpo]", "trainer.device=cpu"]


def _train(backend: str, run_dir) -> tuple[list[dict], dict]:
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1" if backend == "triton" else "0")
    proc = subprocess.run([sys.executable, "-m", "selfdistill.train", *ARGS, f"ops.backend={backend}", f"hydra.run.dir={run_dir}"],
                          cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]
    return rows, load_file(os.path.join(run_dir, "checkpoints", latest, "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_trains_like_torch(backend, tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / backend).mkdir()
    want_rows, want_w = _train("torch", tmp_path / "torch")
    got_rows, got_w = _train(backend, tmp_path / backend)
    assert len(got_rows) == len(want_rows) == 5
    for a, b in zip(got_rows, want_rows):
        assert a.keys() == b.keys()
        for k, v in b.items():
            if k in ("reward", "accuracy", "num_tokens", "completions/mean_length", "stage", "step"):
                assert a[k] == v, (backend, b["step"], k)
            elif k in ("loss", "sft/loss", "grad_norm", "entropy", "kl"):
                assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (backend, b["step"], k)
    for k, v in want_w.items():
        torch.testing.assert_close(got_w[k], v, rtol=0, atol=1e-4, msg=lambda m: f"{backend} {k}: {m}")
