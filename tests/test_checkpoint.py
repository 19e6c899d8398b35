"""Checkpoints: HF-loadable, identical logits, atomic (incomplete ones ignored), RNG restored."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from selfdistill import checkpoint as ckpt
from selfdistill.engine import build_engine
from selfdistill.models import load_model_and_tokenizer
from tests.conftest import TINY_RUN, compose_config


def _engine_with_model():
    cfg = compose_config(["experiment=demo", *TINY_RUN])
    engine = build_engine(cfg)
    model, tok = load_model_and_tokenizer(cfg.model)
    engine.wrap(model)
    engine.setup_optimizer(cfg.sft)
    return engine, tok


def test_save_load_identical_logits_and_state(tmp_path):
    engine, tok = _engine_with_model()
    path = ckpt.save_checkpoint(str(tmp_path), "sft-step-000003", engine=engine, tokenizer=tok, trainer_state={"state": {"step": 3}})
    x = torch.randint(5, len(tok), (2, 11))
    model = engine.unwrapped().eval()
    again = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(model(x).logits, again(x).logits)
    fresh, _ = _engine_with_model()
    ckpt.load_model_weights(fresh.unwrapped(), path)
    assert torch.equal(fresh.unwrapped().eval()(x).logits, model(x).logits)
    assert ckpt.load_trainer_state(path)["state"] == {"step": 3}
    assert ckpt.find_latest(str(tmp_path)) == path


def test_incomplete_checkpoint_is_ignored(tmp_path):
    engine, tok = _engine_with_model()
    good = ckpt.save_checkpoint(str(tmp_path), "grpo-step-000002", engine=engine, tokenizer=tok, trainer_state={"state": {}})
    # a later checkpoint killed mid-write: directory exists, no COMPLETE marker, latest not updated
    broken = os.path.join(tmp_path, ckpt.CKPT_DIR, "grpo-step-000004")
    os.makedirs(broken)
    with open(os.path.join(broken, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 10)
    assert ckpt.find_latest(str(tmp_path)) == good
    # even if the pointer names the broken one (pointer replaced but directory incomplete)
    with open(os.path.join(tmp_path, ckpt.CKPT_DIR, "latest"), "w") as f:
        f.write("grpo-step-000004\n")
    assert ckpt.find_latest(str(tmp_path)) == good


def test_rng_state_round_trip():
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    state = ckpt.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(state)
    b = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert a == b


def test_keep_last_prunes_old_but_protects_reference(tmp_path):
    engine, tok = _engine_with_model()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(str(tmp_path), f"grpo-step-{step:06d}", engine=engine, tokenizer=tok,
                             trainer_state={"state": {}}, keep_last=2, protect=("grpo-step-000001",))
    left = sorted(n for n in os.listdir(os.path.join(tmp_path, ckpt.CKPT_DIR)) if n.startswith("grpo"))
    assert left == ["grpo-step-000001", "grpo-step-000003", "grpo-step-000004"]
