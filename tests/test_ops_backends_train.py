"""Integration: the same short SFT + GRPO run with `ops.backend=torch`, `triton` (the Triton
interpreter on CPU) and `cuda` (the csrc extension's CPU path) trains the same model: equal rewards
and token counts, losses and grad norms to float rounding, final weights to Adam's rounding; and
the ops the trainer called ran on the chosen backend only (`selfdistill.ops.call_counts`, written by
the training process at exit). A meta arm's GRPO step scores through the contrast kernels of the
chosen backend. Also: `ops.backend=auto` logs what it resolved to, once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import selfdistill
from selfdistill import ops
from selfdistill.metrics import read_metrics
from tests.conftest import TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["experiment=demo", *TINY_RUN, "sft.steps=3", "grpo.steps=2", "trainer.stages=[sft,grpo]", "trainer.device=cpu"]


# `python -m selfdistill.train ARGS`, and at exit the op call counts as JSON [[op, backend, calls], ...]
# to the file named by the first argument
TRAIN_AND_COUNT = """
import atexit, json, runpy, sys
import selfdistill
from selfdistill import ops
path = sys.argv.pop(1)
atexit.register(lambda: json.dump([[*k, n] for k, n in ops.call_counts().items()], open(path, "w")))
runpy.run_module("selfdistill.train", run_name="__main__", alter_sys=True)
"""


def _train(backend: str, run_dir, args=ARGS) -> tuple[list[dict], dict, dict]:
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1" if backend == "triton" else "0")
    counts_path = os.path.join(run_dir, "op_calls.json")
    proc = subprocess.run([sys.executable, "-c", TRAIN_AND_COUNT, counts_path, *args, f"ops.backend={backend}",
                           f"hydra.run.dir={run_dir}"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]
    # the ops.backend dispatches (ops.fused_layers' CPU layer kernels run alike under every backend)
    counts = {(op, ran): n for op, ran, n in json.load(open(counts_path)) if ran != "fused_layers"}
    return rows, load_file(os.path.join(run_dir, "checkpoints", latest, "model.safetensors")), counts


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_trains_like_torch(backend, tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / backend).mkdir()
    want_rows, want_w, want_calls = _train("torch", tmp_path / "torch")
    got_rows, got_w, got_calls = _train(backend, tmp_path / backend)
    # the GRPO update's log-probs and loss ran on the chosen backend, as often as torch's ran there
    assert {op for op, _ in want_calls} >= {"fused_linear_token_logprobs", "policy_loss"}
    assert got_calls == {(op, backend): n for (op, _), n in want_calls.items()}, got_calls
    assert {ran for _, ran in want_calls} == {"torch"}
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


# gm with split arms: the without arm's completions start with the forced placebo block (a closed
# meta block), so the step has members whatever the briefly trained policy samples
META_ARGS = [*ARGS, "sft.steps=1", "grpo.steps=1", "reward.name=gm", "rollout.split_arms=true"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_meta_arm_step_scores_on_the_chosen_backend(backend, tmp_path):
    rows, _, counts = _train(backend, tmp_path, META_ARGS)
    grpo = [r for r in rows if r.get("stage") == "grpo"]
    assert grpo and all(r["reward/gm/nan_frac"] < 1 for r in grpo), grpo  # the head had members: the scorer ran
    want = {"gold_decoy_contrast", "clipped_mean_min", "fused_linear_token_logprobs", "policy_loss"}
    assert {op for op, _ in counts} >= want and {ran for _, ran in counts} == {backend}, counts


@pytest.mark.parametrize("kernels_module,resolved,level", [
    (None, "torch", logging.WARNING),  # triton missing: `import selfdistill.kernels` fails
    (types.SimpleNamespace(INTERPRETED=True), "torch", logging.WARNING),  # interpreter: CPU tensors only
    (types.SimpleNamespace(INTERPRETED=False), "triton", logging.INFO),
])
def test_auto_logs_what_it_resolved_to_on_cuda_once(monkeypatch, caplog, kernels_module, resolved, level):
    monkeypatch.setitem(sys.modules, "selfdistill.kernels", kernels_module)
    if kernels_module is not None:  # `import selfdistill.kernels as k` reads the package attribute first
        monkeypatch.setattr(selfdistill, "kernels", kernels_module, raising=False)
    caplog.set_level(logging.INFO, logger="selfdistill.ops")
    try:
        ops.set_backend("auto")  # forgets an earlier probe and log
        assert [ops.resolve("cuda") for _ in range(3)] == [resolved] * 3
    finally:
        ops.set_backend("auto")
    records = [r for r in caplog.records if r.name == "selfdistill.ops"]
    assert len(records) == 1 and records[0].levelno == level, [r.getMessage() for r in records]
    assert f"ops.backend=auto resolved to {resolved} for cuda tensors" in records[0].getMessage()
    if resolved == "torch":
        assert ("not importable" if kernels_module is None else "TRITON_INTERPRET=1") in records[0].getMessage()
