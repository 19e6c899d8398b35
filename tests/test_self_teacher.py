"""The self-teacher on the trainer's real path (SPEC section 6): frozen never changes, EMA equals the
hand-computed blend after 2 steps, live is the student, and the EMA state survives a stop and resume
bitwise. SDPO on the tiny model; `algo.distill.feedback=true` gives every rollout of the barely
trained model a teacher context, so the distillation term has rows to train on."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from selfdistill.metrics import read_metrics
from selfdistill.stages import sdpo as sdpo_stage
from selfdistill.trainer import Trainer
from tests.conftest import TINY_RUN, compose_config

SDPO_RUN = ["experiment=sdpo", *TINY_RUN, "sdpo.batch_size=2", "sdpo.lr=1e-3", "sdpo.warmup_steps=0",
            "algo.distill.feedback=true", "trainer.stages=[sft,sdpo,eval]", "trainer.keep_last=0"]
TAU = 0.05


def _run(run_dir, *extra):
    cfg = compose_config([*SDPO_RUN, *extra])
    trainer = Trainer(cfg, str(run_dir))
    trainer.run()
    return trainer


def _weights(run_dir, step, sub=None):
    path = os.path.join(run_dir, "checkpoints", f"sdpo-step-{step:06d}", *(sub, "model.safetensors") if sub else ("model.safetensors",))
    return load_file(path)


class ScoringSpy:
    """Records the teacher model and its weights at every SDPO scoring pass."""

    def __init__(self, monkeypatch):
        self.models, self.weights = [], []
        real = sdpo_stage.teacher_outputs

        def spy(teacher, model, *args, **kwargs):
            self.models.append(model)
            self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return real(teacher, model, *args, **kwargs)

        monkeypatch.setattr(sdpo_stage, "teacher_outputs", spy)


def test_frozen_teacher_never_changes(tmp_path, monkeypatch):
    spy = ScoringSpy(monkeypatch)
    trainer = _run(tmp_path, "sdpo.steps=3", "trainer.save_every=1")
    start = _weights(tmp_path, 4)  # after the 4 SFT steps: the weights the sdpo stage starts from
    final = _weights(tmp_path, 7)
    assert len(spy.weights) == 3
    for seen in spy.weights:
        for name, value in seen.items():
            assert torch.equal(value, start[name]), name
    assert any(not torch.equal(final[k], start[k]) for k in start), "the student never moved: the test would prove nothing"
    assert all(m is spy.models[0] for m in spy.models) and spy.models[0] is not trainer.ctx.engine.unwrapped()


def test_ema_teacher_is_the_hand_computed_blend_after_two_steps(tmp_path):
    _run(tmp_path, "sdpo.steps=2", "trainer.save_every=1", "algo.distill.teacher=ema", f"algo.distill.ema_tau={TAU}")
    s0, s1, s2 = (_weights(tmp_path, step) for step in (4, 5, 6))
    t1, t2 = _weights(tmp_path, 5, "teacher"), _weights(tmp_path, 6, "teacher")
    assert t1.keys() == s0.keys() == t2.keys()
    for k in s0:
        e1 = (1 - TAU) * s0[k].double() + TAU * s1[k].double()
        e2 = (1 - TAU) * e1 + TAU * s2[k].double()
        torch.testing.assert_close(t1[k].double(), e1, rtol=0, atol=1e-6, msg=lambda m: f"{k} after 1 step: {m}")
        torch.testing.assert_close(t2[k].double(), e2, rtol=0, atol=1e-6, msg=lambda m: f"{k} after 2 steps: {m}")
    moved = max(float((s2[k] - s0[k]).abs().max()) for k in s0)
    assert moved > 1e-3, "the student barely moved: the blend would be indistinguishable from the frozen teacher"


def test_live_teacher_is_the_student(tmp_path, monkeypatch):
    spy = ScoringSpy(monkeypatch)
    trainer = _run(tmp_path, "sdpo.steps=2", "algo.distill.teacher=live")
    policy = trainer.ctx.engine.unwrapped()
    assert len(spy.models) == 2 and all(m is policy for m in spy.models)
    assert any(not torch.equal(spy.weights[0][k], spy.weights[1][k]) for k in spy.weights[0]), "the student moved between passes"


def test_ema_teacher_survives_a_stop_and_resume_bitwise(tmp_path):
    """Resume (a fresh Trainer, as after a kill) from the checkpoint after the first SDPO step: the
    teacher, the student and the metrics continue exactly as the uninterrupted run."""
    extra = ("sdpo.steps=3", "trainer.save_every=1", "algo.distill.teacher=ema")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(whole, *extra)
    _run(resumed, *extra, f"trainer.resume={whole / 'checkpoints' / 'sdpo-step-000005'}")
    for sub in (None, "teacher"):
        a, b = _weights(whole, 7, sub), _weights(resumed, 7, sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    rows = lambda d: [{k: v for k, v in r.items() if not k.startswith("perf/")}  # noqa: E731
                      for r in read_metrics(os.path.join(d, "metrics.jsonl")) if r["stage"] == "sdpo" and r["step"] > 5]
    assert rows(whole) == rows(resumed) and len(rows(whole)) == 2
