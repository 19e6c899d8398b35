"""The real-model path end to end: a Qwen3 checkpoint with a byte-level BPE tokenizer, a ChatML
template, `<|im_end|>` as end of turn and spare vocabulary rows (selfdistill.models.chatml), loaded
with `model=hf` like a user's checkpoint, runs every stage and every reward arm.

One short SFT (meta blocks in every solution, so rollouts write some) is shared; each stage then
runs on its own from that SFT'd checkpoint, and each arm runs 2 GRPO steps from it. A stage added
later is one more entry of STAGE_RUNS."""

from __future__ import annotations

import math
import os

import pytest
import torch

from selfdistill import checkpoint as ckpt
from selfdistill.metrics import read_metrics
from selfdistill.models.chatml import IM_END
from selfdistill.rewards.registry import REWARDS
from selfdistill.trainer import Trainer
from tests.chatml_helpers import tiny_chatml_checkpoint
from tests.conftest import compose_config

ARMS = tuple(REWARDS)
RUN = [
    "model=hf", "model.dtype=float32",
    "data.synthetic.num_train=150", "data.synthetic.num_eval=8", "data.synthetic.levels=[1,2]",
    "data.synthetic.eval_levels=[1,2]", "data.synthetic.meta_fraction=1.0",
    "sft.steps=40", "sft.batch_size=16", "sft.warmup_steps=2", "sft.lr=3e-3",
    "grpo.steps=2", "grpo.batch_size=2", "rollout.n=4", "rollout.max_new_tokens=32", "eval.max_new_tokens=32",
    "reward.meta_warmup_steps=1", "reward.grader_workers=1",
    "trainer.progress=false", "trainer.tensorboard=false", "trainer.torch_threads=1",
]
# stage -> the overrides that make it short; each runs alone (`trainer.stages=[<stage>]`)
STAGE_RUNS = {
    "sft": ["sft.steps=2"],
    "grpo": ["grpo.steps=2"],
    "sdpo": ["algo=sdpo", "sdpo.steps=2", "sdpo.batch_size=2"],
    "sdft": ["algo=sdft", "sdft.steps=2", "sdft.batch_size=4", "sdft.train_pairs=8", "sdft.eval_prompts=2"],
    "eval": [],
}
STEP_KEYS = {"sft": ("sft/loss", "grad_norm"), "grpo": ("loss", "grad_norm", "reward", "accuracy", "entropy"),
             "sdpo": ("loss", "grad_norm", "reward", "self_distillation/teacher_fraction"), "sdft": ("loss", "grad_norm")}


@pytest.fixture(scope="module")
def raw_checkpoint(tmp_path_factory):
    return tiny_chatml_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def sft_model(raw_checkpoint, tmp_path_factory):
    """The HF checkpoint directory of a short SFT of the raw ChatML checkpoint."""
    run_dir = tmp_path_factory.mktemp("chatml-sft")
    Trainer(compose_config([*RUN, f"model.path={raw_checkpoint}", "trainer.stages=[sft]"]), str(run_dir)).run()
    path = ckpt.find_latest(str(run_dir))
    assert path is not None
    return path


def _run(model_path: str, tmp_path, *overrides: str) -> list[dict]:
    cfg = compose_config([*RUN, f"model.path={model_path}", *overrides])
    Trainer(cfg, str(tmp_path)).run()
    return read_metrics(os.path.join(tmp_path, "metrics.jsonl"))


def _assert_finite(rows: list[dict], keys) -> None:
    for r in rows:
        for k in keys:
            assert k in r and math.isfinite(r[k]), (k, r.get(k))


@pytest.mark.parametrize("stage", sorted(STAGE_RUNS))
def test_every_stage_runs_on_the_chatml_checkpoint(stage, sft_model, tmp_path):
    rows = _run(sft_model, tmp_path, f"trainer.stages=[{stage}]", *STAGE_RUNS[stage])
    stage_rows = [r for r in rows if r["stage"] == stage]
    if stage == "eval":
        (r,) = stage_rows
        assert r["heldout/n"] == 8 and 0.0 <= r["heldout/accuracy"] <= 1.0
        return
    assert len(stage_rows) == 2
    _assert_finite(stage_rows, STEP_KEYS[stage])


def test_sft_teaches_the_turn_end_that_stops_generation(sft_model):
    """SFT targets end with the tokenizer's EOS, `<|im_end|>`, which the rollout backend stops on and
    which the checkpoint's generation config lists as an end of turn."""
    import json

    from selfdistill.algo.sft import encode_solutions
    from selfdistill.config import ModelConfig
    from selfdistill.models import load_model_and_tokenizer
    from selfdistill.rollout.hf import HFRolloutBackend

    model, tok = load_model_and_tokenizer(ModelConfig(path=sft_model))
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert [c[-1] for c in encode_solutions(tok, ["3+4=7. \\boxed{7}", "x"])] == [im_end, im_end]
    assert im_end in HFRolloutBackend(model, tok).stop_ids
    assert im_end in json.load(open(os.path.join(sft_model, "generation_config.json")))["eos_token_id"]


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_runs_two_grpo_steps_on_the_chatml_checkpoint(arm, sft_model, tmp_path):
    rows = [r for r in _run(sft_model, tmp_path, f"experiment={arm}", "trainer.stages=[grpo]")
            if r["stage"] == "grpo"]
    assert len(rows) == 2
    _assert_finite(rows, STEP_KEYS["grpo"])
    if arm != "base":
        _assert_finite(rows, ("reward/meta_mean", "reward/skip_rate", "meta/emission_rate", f"reward/{arm}/nan_frac"))
    if REWARDS[arm].needs_scorer:  # belief arms: members <=> scorer passes ran
        for r in rows:
            assert (r[f"reward/{arm}/nan_frac"] < 1.0) == (r["scorer/sequences"] > 0), r


@pytest.mark.parametrize("spare_rows", [64, 0])
def test_grpo_first_builds_its_reference_from_the_loaded_weights(spare_rows, tmp_path_factory, tmp_path, monkeypatch):
    """GRPO as the first stage of a checkpoint whose meta tokens were just added (on spare rows, or by
    resizing the embedding): the frozen scorer is the in-memory policy as loaded, meta rows included,
    not the original directory's weights (whose rows are untrained or missing)."""
    from safetensors.torch import load_file

    from selfdistill.stages import context

    path = tiny_chatml_checkpoint(tmp_path_factory, spare_rows=spare_rows)
    built = []
    real = context.build_reference
    monkeypatch.setattr(context, "build_reference", lambda model, *a: built.append(model) or real(model, *a))
    cfg = compose_config([*RUN, f"model.path={path}", "experiment=pmi_shift", "grpo.steps=1",
                          "trainer.stages=[grpo]"])
    trainer = Trainer(cfg, str(tmp_path))
    initial = {k: v.detach().clone() for k, v in trainer.ctx.engine.unwrapped().state_dict().items()}
    trainer.run()
    (ref,) = built
    ref_state = ref.state_dict()
    assert ref_state.keys() == initial.keys()
    for k, v in initial.items():
        assert torch.equal(ref_state[k], v), k
    on_disk = load_file(os.path.join(path, "model.safetensors"))["model.embed_tokens.weight"]
    meta = list(trainer.ctx.meta_ids)
    emb = ref_state["model.embed_tokens.weight"]
    assert emb.shape[0] == on_disk.shape[0] + (2 if spare_rows == 0 else 0)
    if spare_rows:
        assert not torch.equal(emb[meta], on_disk[meta])  # mean-initialised, not the untrained spare rows
    rows = [r for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if r["stage"] == "grpo"]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
