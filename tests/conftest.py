"""Shared fixtures: compose a typed config exactly as `selfdistill-train` does."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfdistill.config import register_configs, validate

register_configs()

# Small enough for a 2-core CPU: seconds per stage.
TINY_RUN = [
    "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128",
    "data.synthetic.num_train=64", "data.synthetic.num_eval=8",
    "sft.steps=4", "sft.batch_size=8", "sft.warmup_steps=1",
    "grpo.steps=3", "grpo.batch_size=2", "rollout.n=4", "rollout.max_new_tokens=16",
    "eval.max_new_tokens=16", "trainer.progress=false", "trainer.tensorboard=false",
    "reward.grader_workers=1", "trainer.torch_threads=1",
]


def compose_config(overrides: list[str], typed: bool = True, check: bool = True):
    with initialize_config_module(config_module="selfdistill.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if check:
        validate(cfg)
    return OmegaConf.to_object(cfg) if typed else cfg


def random_tiny_model(std: float = 0.3, **shape):
    """(model, tokenizer): a tiny char-tokenizer model of `shape` (TinyModelConfig fields) whose
    matrices are drawn from N(0, std) under seed 0; large weights give varied outputs."""
    import torch

    from selfdistill.config import ModelConfig, TinyModelConfig
    from selfdistill.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(tiny=TinyModelConfig(**shape)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return model, tok


@pytest.fixture
def tiny_config():
    return lambda extra=(): compose_config(["experiment=demo", *TINY_RUN, *extra])
