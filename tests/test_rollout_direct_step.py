"""The decode step computed from the model's weights (selfdistill/rollout/direct_step.py): its
logits equal the HF forward's decode step (float rounding) for Qwen3, Qwen2 (q/k/v biases) and
Llama, over left-padded prefixes and several steps; the rollout uses it where it applies and the
HF forward where it does not. Token ids against the HF-forward loop: tests/test_rollout_decode.py
(the default backend decodes with this step; its reference runs the HF model row by row)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from selfdistill import ops
from selfdistill.algo import grpo
from selfdistill.config import ModelConfig, TinyModelConfig
from selfdistill.engine.memory import enable_autocast
from selfdistill.models import load_model_and_tokenizer
from selfdistill.ops import fused_layers
from selfdistill.rollout import compiled, decode
from selfdistill.rollout.direct_step import DirectDecoder, unsupported_reason
from selfdistill.rollout.hf import HFRolloutBackend
from selfdistill.rollout.kv_cache import RowKVCache
from tests.conftest import TINY_RUN, compose_config

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             vocab_size=64, max_position_embeddings=128)


def _qwen3():
    model, _ = load_model_and_tokenizer(ModelConfig(tiny=TinyModelConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48)))
    return model


def _random(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.5)  # biases and norm weights too: every term counts
    return model.eval()


MODELS = {
    "qwen3": _qwen3,
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, attn_implementation="sdpa")),  # q/k/v biases
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, attn_implementation="sdpa")),
}


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_direct_step_logits_equal_the_hf_forward(arch, native):
    """Both forms of the step: the C++ decode step (ops.fused_layers on) and the Python one (off)."""
    torch.manual_seed(1)
    model = _random(MODELS[arch]())
    assert unsupported_reason(model) is None
    before = fused_layers.get_mode()
    fused_layers.set_mode("on" if native else "off")
    try:
        _compare_direct_with_hf(model, arch, native)
    finally:
        fused_layers.set_mode(before)


def _compare_direct_with_hf(model, arch, native):
    ops.reset_call_counts()
    prefixes = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]  # left padding differs per row
    source = torch.tensor([0, 0, 1, 2, 1])
    with torch.no_grad():
        _, prefill, attn = decode._prefill(model, prefixes, 0, torch.device("cpu"))
        P = attn.shape[1]
        caches = [RowKVCache.from_prefill(prefill, source, P + 6, static=False) for _ in range(2)]
        mask = torch.ones((5, P + 6), dtype=torch.long)
        mask[:, :P] = attn[source]
        direct = DirectDecoder(model)
        assert direct.native == native
        for t in range(6):
            tokens = torch.randint(3, 60, (5, 1))
            positions = attn[source].sum(1, keepdim=True) + t
            ref = compiled.decode_step(model, tokens, positions, mask[:, : P + t + 1], caches[0])
            out = direct(model, tokens, positions, mask[:, : P + t + 1], caches[1])
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=f"{arch} step {t}")
        for a, b in zip(caches[0].layers, caches[1].layers):  # the same keys and values appended
            torch.testing.assert_close(a.keys[:, :, : a.length], b.keys[:, :, : b.length], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values[:, :, : a.length], b.values[:, :, : b.length], atol=1e-5, rtol=1e-5)
    assert ops.call_counts().get(("decode_step", "fused_layers"), 0) == (6 if native else 0)


def test_where_the_direct_step_does_not_apply():
    model = _qwen3()
    assert unsupported_reason(model) is None
    wrapped = copy.deepcopy(model)
    enable_autocast(wrapped, torch.bfloat16, "cpu")  # engine.mixed_precision=bf16: the HF forward keeps its numerics
    assert "wrapped forward" in unsupported_reason(wrapped)
    placeholder = copy.deepcopy(model)
    placeholder.model.norm.weight.data = torch.empty(0)  # a ZeRO-3 parameter outside its gather
    assert "sharded" in unsupported_reason(placeholder)
    sliding = copy.deepcopy(model)
    sliding.config.layer_types = ["full_attention", "sliding_attention"]
    assert "sliding" in unsupported_reason(sliding)
    gelu = copy.deepcopy(model)
    gelu.config.hidden_act = "gelu"
    assert "hidden_act" in unsupported_reason(gelu)
    assert DirectDecoder.build(wrapped) is None and isinstance(DirectDecoder.build(model), DirectDecoder)


def _count_direct_steps(monkeypatch) -> list:
    calls = []
    real = DirectDecoder.__call__
    monkeypatch.setattr(DirectDecoder, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def test_group_rollouts_decode_with_the_direct_step(monkeypatch):
    """Dispatch on the trainer's rollout path; the HF forward where the step does not apply."""
    cfg = compose_config(["experiment=demo", *TINY_RUN])
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(cfg.model)
    prompts = [tok("<|bos|>Q: 2+2\nA: ", add_special_tokens=False)["input_ids"]]
    calls = _count_direct_steps(monkeypatch)
    direct = grpo.generate_group_rollouts(HFRolloutBackend(model, tok), prompts, cfg, seeds=[5])
    assert calls
    hf_steps = []
    handle = model.register_forward_pre_hook(lambda *_: hf_steps.append(1))
    try:
        n = len(calls)
        plain = grpo.generate_group_rollouts(HFRolloutBackend(model, tok, direct_step=False), prompts, cfg, seeds=[5])
    finally:
        handle.remove()
    assert len(calls) == n and len(hf_steps) > 1  # prefill + HF decode steps
    assert torch.equal(direct.completion_ids, plain.completion_ids)
    enable_autocast(model, torch.bfloat16, "cpu")
    grpo.generate_group_rollouts(HFRolloutBackend(model, tok), prompts, cfg, seeds=[5])
    assert len(calls) == n
