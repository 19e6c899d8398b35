"""Evaluation under torchrun (CPU, gloo, 2 processes): a held-out split of 5 problems and a held-in
slice of 3, k = 2 sampled completions each, evaluated by 2 ranks give exactly the rows of one
process: every problem once, the same seeded samples, nothing dropped for the odd size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "experiment=demo", "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128", "data.synthetic.num_train=32",
    "data.synthetic.num_eval=5", "eval.val_size=3", "eval.samples_per_problem=2", "eval.batch_size=4",
    "eval.max_new_tokens=8", "trainer.stages=[eval]", "trainer.progress=false", "trainer.tensorboard=false",
    "trainer.torch_threads=1", "reward.grader_workers=1", "trainer.device=cpu",
]


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _samples(run_dir):
    with open(os.path.join(run_dir, "eval_samples.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_ranks_evaluate_an_odd_split_exactly_like_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "selfdistill.train", *ARGS, "engine=single", f"hydra.run.dir={one}"], cwd=tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "selfdistill.train",
          *ARGS, "engine=ddp", f"hydra.run.dir={two}"], cwd=tmp_path)
    rows_one, rows_two = _samples(one), _samples(two)
    assert rows_two == rows_one
    for split, n in (("heldout", 5), ("heldin", 3)):
        counts = Counter(r["problem_index"] for r in rows_two if r["split"] == split)
        assert counts == {i: 2 for i in range(n)}, (split, counts)
    manifest = json.load(open(two / "manifest.json"))
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
