"""SDPO under torchrun (CPU, gloo, 2 processes) trains the same model as one process, like
tests/test_engines.py does for GRPO: every engine, each with a teacher mode (frozen replicated, EMA
sharded with top-K distillation, EMA replicated, live), the EMA teacher's weights included."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_engines import ENGINE_ARGS, EXACT, _assert_same_training, _rows, _run

ARGS = [
    "experiment=sdpo", "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128",
    "data.synthetic.num_train=64", "data.synthetic.num_eval=4", "sft.steps=4", "sft.batch_size=8", "sft.warmup_steps=1",
    "sdpo.steps=2", "sdpo.batch_size=2", "sdpo.lr=1e-3", "sdpo.warmup_steps=0", "rollout.n=2", "rollout.max_new_tokens=8",
    "algo.distill.feedback=true", "algo.distill.weight=0.5", "trainer.stages=[sft,sdpo,eval]", "trainer.progress=false",
    "trainer.tensorboard=false", "trainer.torch_threads=1", "trainer.save_every=1", "trainer.keep_last=0",
    "reward.grader_workers=1", "trainer.device=cpu",
]
LAST = "sdpo-step-000006"  # 4 SFT + 2 SDPO steps; the eval after them keeps the stage-end save from reusing this name


@pytest.mark.slow
@pytest.mark.parametrize("engine,teacher,shard,loss", [
    ("ddp", "frozen", False, "sampled_token"),
    ("fsdp2", "ema", True, "topk"),
    ("deepspeed_zero2", "ema", False, "sampled_token"),
    ("deepspeed_zero3", "live", False, "sampled_token"),
])
def test_sdpo_on_two_ranks_matches_one_process(tmp_path, engine, teacher, shard, loss):
    extra = [f"algo.distill.teacher={teacher}", f"algo.distill.loss={loss}", "algo.distill.topk=6"]
    one, two = tmp_path / "single", tmp_path / "two"
    _run([sys.executable, "-m", "selfdistill.train", *ARGS, *extra, "engine=single", f"hydra.run.dir={one}"], cwd=tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "selfdistill.train",
          *ARGS, *extra, f"engine={engine}", *ENGINE_ARGS.get(engine, []), f"engine.shard_reference={str(shard).lower()}",
          f"hydra.run.dir={two}"], cwd=tmp_path)
    rows = [r for r in _rows(one) if r["stage"] == "sdpo"]
    assert len(rows) == 2 and all(r["self_distillation/teacher_fraction"] > 0 for r in rows), "no teacher: nothing distilled"
    # Each rank runs its teacher and student passes on its own rows (other padding, other float sums).
    # Token-mean metrics (entropy, teacher_student_kl) are the mean of the ranks' means: not compared.
    _assert_same_training(one, two, engine, exact=(*EXACT, "self_distillation/teacher_fraction", "grader/graded"),
                          rtol={"grad_norm": 2e-4, "loss": 2e-4})
    if teacher == "ema":
        ta = load_file(os.path.join(one, "checkpoints", LAST, "teacher", "model.safetensors"))
        tb = load_file(os.path.join(two, "checkpoints", LAST, "teacher", "model.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=2e-5, msg=lambda m: f"{engine} teacher {k}: {m}")
