"""Memory controls (selfdistill.engine.memory): activation checkpointing gives the plain model's loss
and gradient, bf16 mixed precision on single/ddp keeps fp32 master weights and optimizer state and
trains, and a pure-bf16 optimizer warns once. The 2-rank FSDP2 / ZeRO-3 / DDP checks run
tests/dist_memory_helpers.py under torchrun."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from selfdistill.algo.logprobs import completion_logprobs, packing_scope
from selfdistill.algo.sft import encode_solutions, sft_loss
from selfdistill.data import encode_prompt, load_splits
from selfdistill.engine import build_engine
from selfdistill.models import load_model_and_tokenizer
from tests.conftest import compose_config
from tests.dist_helpers import TINY_MODEL, global_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _engine(*overrides: str):
    cfg = compose_config([*TINY_MODEL, *overrides])
    torch.manual_seed(0)
    engine = build_engine(cfg)
    model, tok = load_model_and_tokenizer(cfg.model)
    engine.wrap(model)
    return engine, tok, cfg


def _loss_and_grads(engine) -> tuple[float, dict[str, torch.Tensor]]:
    prompts, comps, mask = global_batch(0, rows=4, length=9)
    with packing_scope(engine.model):  # as the update holds it: packed rows under checkpointing too
        logp, _ = completion_logprobs(engine.model, prompts, comps, mask, pad_id=0)
        loss = -(logp * torch.linspace(-1, 1, logp.shape[1])).mean()  # signed weights: a GRPO-like objective
        engine.backward(loss)
    return float(loss.detach()), {n: p.grad.clone() for n, p in engine.unwrapped().named_parameters()}


def _count_calls(module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_activation_checkpointing_gives_the_same_loss_and_gradient():
    plain, _, _ = _engine()
    ckpt, _, _ = _engine("model.gradient_checkpointing=true")
    # the recompute ran: a layer's projection is called again in backward
    calls = {name: _count_calls(e.unwrapped().model.layers[0].self_attn.q_proj) for name, e in (("plain", plain), ("ckpt", ckpt))}
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(ckpt)
    assert calls["plain"] == [1] and calls["ckpt"] == [2]
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-8, msg=name)
    assert any(float(g.abs().max()) > 0 for g in grads_a.values())


def test_bf16_mixed_precision_keeps_fp32_masters_and_computes_in_bf16():
    engine, tok, cfg = _engine("engine.mixed_precision=bf16")
    model = engine.unwrapped()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out_dtypes = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    loss, grads = _loss_and_grads(engine)
    assert out_dtypes == [torch.bfloat16]  # the matmuls ran in bf16 ...
    assert all(g.dtype == torch.float32 for g in grads.values())  # ... the gradients are fp32
    # bf16 rounding, not a different model: per-token log-probs within bf16's precision of fp32's
    fp32, _, _ = _engine()
    prompts, comps, mask = global_batch(1)
    with torch.no_grad():
        lp16, _ = completion_logprobs(engine.model, prompts, comps, mask, pad_id=0)
        lp32, _ = completion_logprobs(fp32.model, prompts, comps, mask, pad_id=0)
    assert 0 < float((lp16 - lp32).abs().max()) < 0.05 * float(lp32.abs().max())
    engine.setup_optimizer(cfg.sft)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert engine.step(loss, 0)[0]
    state = [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    assert state and all(v.dtype == torch.float32 for v in state)  # exp_avg, exp_avg_sq: fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the frozen reference copied from the policy computes like it (its forward is bound to the copy)
    ref = engine.frozen_copy()
    assert ref.forward.__self__ is ref and ref is not model
    x = torch.randint(6, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x).logits, rtol=0, atol=0)


def test_bf16_mixed_precision_trains_the_tiny_model():
    engine, tok, cfg = _engine("engine.mixed_precision=bf16", "data.synthetic.num_train=64", "data.synthetic.levels=[1]")
    train, _ = load_splits(cfg.data)
    prompts = [encode_prompt(tok, ex, cfg.data) for ex in train[:16]]
    completions = encode_solutions(tok, [ex.solution for ex in train[:16]])
    engine.setup_optimizer(cfg.sft)
    losses = []
    for step in range(25):
        loss, _ = sft_loss(engine.model, prompts, completions, tok.pad_token_id)
        engine.backward(loss)
        assert engine.step(float(loss.detach()), step)[0]
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in engine.unwrapped().parameters())


def test_generation_runs_under_autocast():
    from selfdistill.rollout.base import MetaMode
    from selfdistill.rollout.hf import HFRolloutBackend

    engine, tok, _ = _engine("engine.mixed_precision=bf16")
    backend = HFRolloutBackend(engine.unwrapped(), tok)
    batch = backend.generate([[1, 40, 41], [1, 42]], [MetaMode.ALLOW] * 2, max_new_tokens=5, temperature=1.0,
                             top_p=1.0, greedy=True)
    assert batch.completion_ids.shape[0] == 2 and batch.lengths.min() >= 1


def test_a_pure_bf16_optimizer_warns_once_naming_the_fix():
    engine, _, cfg = _engine("model.dtype=bfloat16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.setup_optimizer(cfg.sft)
        engine.setup_optimizer(cfg.grpo)  # a second stage: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "model.dtype=bfloat16" in msgs[0] and "model.dtype=float32 engine.mixed_precision=bf16" in msgs[0]
    fp32, _, cfg32 = _engine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp32.setup_optimizer(cfg32.sft)
    assert not [w for w in caught if "master copy" in str(w.message)]


@pytest.mark.slow
def test_memory_controls_on_two_ranks(tmp_path):
    """FSDP2 and ZeRO-3 with activation checkpointing: the loss and the full gradient equal those
    without it; DDP with bf16 mixed precision keeps fp32 masters and identical replicas."""
    out = tmp_path / "dist"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           os.path.join(ROOT, "tests", "dist_memory_helpers.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in range(2):
        res = json.loads((out / f"rank{rank}.json").read_text())
        for engine in ("fsdp2", "deepspeed_zero3"):
            r = res[engine]
            assert r["calls"] == {"plain": 1, "checkpointed": 2}, (engine, r["calls"])
            assert r["loss"]["plain"] == r["loss"]["checkpointed"], engine
            assert r["grad_max_abs_diff"] <= 1e-6 * r["grad_max_abs"] and r["grad_max_abs"] > 0, (engine, r)
        d = res["ddp_bf16"]
        assert d["param_dtypes"] == ["torch.float32"] and d["state_dtypes"] == ["torch.float32"], d
        assert d["compute_dtype"] == "torch.bfloat16" and d["applied"]
    a, b = (json.loads((out / f"rank{r}.json").read_text())["ddp_bf16"]["weights_digest"] for r in range(2))
    assert a == pytest.approx(b, rel=0, abs=0)


def test_deepcopy_of_an_autocast_model_is_independent():
    engine, _, _ = _engine("engine.mixed_precision=bf16")
    model = engine.unwrapped()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.embed_tokens.weight.zero_()
    x = torch.randint(6, 60, (1, 5))
    with torch.no_grad():
        assert not torch.equal(twin(x).logits, model(x).logits)
