"""SDFT (SPEC sections 6-7) on the tiny model: the recipes' lr schedules, offline teacher samples
from the frozen teacher, the score 1/(1 + eval token loss) at each eval, demonstrations (and the
error naming a row without one), and resume mid-stage."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.algo import sdft
from selfdistill.algo.teacher_context import teacher_prompt_ids, text_ids
from selfdistill.data import encode_prompt
from selfdistill.data.loading import load_examples, save_examples
from selfdistill.metrics import read_metrics
from selfdistill.models import load_model_and_tokenizer
from selfdistill.optim import lr_multiplier
from selfdistill.rollout import build_rollout_backend
from selfdistill.trainer import Trainer
from tests.conftest import TINY_RUN, compose_config

SDFT_RUN = [*TINY_RUN, "sdft.batch_size=4", "sdft.train_pairs=12", "sdft.eval_prompts=4", "rollout.max_new_tokens=12",
            "trainer.keep_last=0", "trainer.save_every=1"]


def _sdft_rows(run_dir):
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["stage"] == "sdft"]


@pytest.mark.parametrize("name,peak,points", [
    # step 0, end of warmup, middle of the cosine, end: floor + (1 - floor) (1 + cos(pi p)) / 2
    ("sdft_evolved", 8e-4, {0: 0.5, 2: 1.0, 16: 0.005 + 0.995 * 0.5, 30: 0.005}),
    ("sdft_baseline", 5e-5, {0: 1 / 20, 20: 1.0, 25: 0.5, 30: 0.0}),
])
def test_schedule_floor_values(name, peak, points):
    cfg = compose_config([f"experiment={name}"])
    assert cfg.sdft.lr == peak and cfg.sdft.steps == 30 and cfg.sdft.schedule == "cosine"
    for step, multiplier in points.items():
        assert lr_multiplier(step, cfg.sdft) == pytest.approx(multiplier, abs=1e-12), (name, step)


def test_offline_samples_come_from_the_frozen_teacher_and_the_score_is_logged_at_each_eval(tmp_path, monkeypatch):
    generated = []
    real = sdft.generate

    def spy(backend, prompts, **kwargs):
        out = real(backend, prompts, **kwargs)
        generated.append(({n: p.detach().clone() for n, p in backend.model.named_parameters()}, prompts, kwargs, out))
        return out

    monkeypatch.setattr(sdft, "generate", spy)
    cfg = compose_config(["experiment=sdft_evolved", *SDFT_RUN, "sdft.steps=4", "sdft.eval_every=2"])
    Trainer(cfg, str(tmp_path)).run()
    ckpt = os.path.join(tmp_path, "checkpoints")
    start = load_file(os.path.join(ckpt, "sdft-step-000004", "model.safetensors"))  # the stage's starting weights
    final = load_file(os.path.join(ckpt, "sdft-step-000008", "model.safetensors"))
    samples = [g for g in generated if g[2]["seeds"] is not None]
    assert len(samples) == 3  # 12 pairs, 4 per step: three batches are new, the 4th step repeats pass 1's first batch
    for weights, *_ in generated:
        assert all(torch.equal(weights[k], start[k]) for k in start)
    assert any(not torch.equal(final[k], start[k]) for k in start)

    # Regenerate the first batch independently: a fresh model with the starting weights, the same seeds.
    model, tok = load_model_and_tokenizer(cfg.model)
    model.load_state_dict(start, strict=False)
    model.tie_weights()
    _, prompts, kwargs, out = samples[0]
    again = sdft.generate(build_rollout_backend("hf", model, tok), prompts, **kwargs)
    assert again == out

    # The score at each eval is 1 / (1 + the final student's mean token CE on the frozen teacher's greedy completions).
    rows = _sdft_rows(tmp_path)
    assert [r["step"] for r in rows if "sdft/score" in r] == [6, 8]
    for r in rows:
        if "sdft/score" in r:
            assert r["sdft/score"] == pytest.approx(1 / (1 + r["sdft/eval_token_loss"]), rel=1e-12)
    held_out = Trainer(cfg, str(tmp_path / "probe")).ctx.held_out[:4]  # the same data, rebuilt
    greedy = [g for g in generated if g[2]["seeds"] is None]
    assert len(greedy) == 1, "eval completions are generated once"
    student = load_model_and_tokenizer(cfg.model)[0]
    student.load_state_dict(final, strict=False)
    student.tie_weights()
    d = cfg.algo.distill
    teacher_prompts = [teacher_prompt_ids(tok, ex, d.template, text_ids(tok, ex.teacher_demonstration),
                                          max_tokens=d.max_teacher_prompt_tokens) for ex in held_out]
    assert greedy[0][1] == teacher_prompts
    nll, ntok = sdft.token_nll(student.eval(), [encode_prompt(tok, ex) for ex in held_out], greedy[0][3], tok.pad_token_id, None)
    assert rows[-1]["sdft/eval_token_loss"] == pytest.approx(nll / ntok, rel=1e-5)


def test_resume_mid_stage_continues_identically(tmp_path):
    """A stop after the 5th SDFT step (inside the second, shuffled, pass) and a fresh Trainer
    resuming there: the same batches (sampler order and position), teacher samples and weights."""
    args = ["experiment=sdft_evolved", *SDFT_RUN, "sdft.steps=7", "sdft.eval_every=3"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    Trainer(compose_config(args), str(whole)).run()
    Trainer(compose_config([*args, f"trainer.resume={whole / 'checkpoints' / 'sdft-step-000009'}"]), str(resumed)).run()
    a = load_file(os.path.join(whole, "checkpoints", "sdft-step-000011", "model.safetensors"))
    b = load_file(os.path.join(resumed, "checkpoints", "sdft-step-000011", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows if r["step"] > 9]  # noqa: E731
    assert strip(_sdft_rows(whole)) == strip(_sdft_rows(resumed)) and len(strip(_sdft_rows(whole))) == 2


def test_demonstrations_from_files_and_an_error_naming_a_row_without_one(tmp_path):
    rows = [
        {"data_source": "t", "prompt": [{"role": "user", "content": "1+1"}], "reward_model": {"ground_truth": "2"},
         "extra_info": {"id": "a", "solution": "1+1=2. \\boxed{2}"}},
        {"data_source": "t", "prompt": [{"role": "user", "content": "2+2"}], "reward_model": {"ground_truth": "4"},
         "extra_info": {"id": "b", "solution": "2+2=4. \\boxed{4}"}, "demonstration": "four: \\boxed{4}"},
        {"data_source": "t", "prompt": [{"role": "user", "content": "3+3"}], "reward_model": {"ground_truth": "6"},
         "extra_info": {"id": "c"}},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = load_examples(path)
    assert [e.teacher_demonstration for e in exs] == ["1+1=2. \\boxed{2}", "four: \\boxed{4}", None]
    save_examples(exs, tmp_path / "again.parquet")
    assert [e.demonstration for e in load_examples(tmp_path / "again.parquet")] == [None, "four: \\boxed{4}", None]
    cfg = compose_config(["experiment=sdft_evolved", *SDFT_RUN, "data=files", f"data.train_path={path}",
                          f"data.eval_path={path}", "trainer.stages=[sdft]"])
    with pytest.raises(ValueError, match=r"the training split row 2 \(id 'c'\) has none: give it a `demonstration` field"):
        Trainer(cfg, str(tmp_path / "run")).run()
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    cfg = compose_config(["experiment=sdft_evolved", *SDFT_RUN, "data=files", f"data.train_path={good}", "trainer.stages=[sdft]"])
    with pytest.raises(ValueError, match="SDFT's score needs held-out rows .* the held-out split has 0: set data.eval_path"):
        Trainer(cfg, str(tmp_path / "run2")).run()


def test_synthetic_rows_carry_their_worked_solution_as_demonstration(tiny_config):
    cfg = tiny_config()
    from selfdistill.data import load_splits

    train, held_out = load_splits(cfg.data)
    assert all("\\boxed{" + ex.gold + "}" in ex.solution for ex in train + held_out)
    assert sdft.demonstrations(train, "train") == [ex.solution for ex in train]
