"""The fused CPU decoder layers (`ops.fused_layers`, csrc/fused_layers.cpp, csrc/decode_step.cpp):
RMSNorm and the rotary embedding, forward and backward, against HF's modules in float64 (error no
worse than a few times HF's own fp32 error) and bitwise where the formula is the same; the training
forward of a patched model against the unpatched one (logits, loss, every gradient); dispatch on
the trainer's real path (the kernels ran: call counts); the modes' errors. The C++ decode step
against the HF forward: tests/test_rollout_direct_step.py (both modes)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

from selfdistill import ops
from selfdistill.ops import fused_layers
from selfdistill.ops.cuda_ext import extension
from tests.conftest import random_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def mode():
    """Set the fused-layers mode for one test; restore it after."""
    before = fused_layers.get_mode()
    yield fused_layers.set_mode
    fused_layers.set_mode(before)


def _hf_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    norm = Qwen3RMSNorm(x.shape[-1], eps=1e-6).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm(x), norm


@pytest.mark.parametrize("shape", [(3, 37, 64), (5, 4, 16), (2, 7)])
def test_rms_norm_forward_and_backward_against_fp64(shape):
    torch.manual_seed(0)
    x64 = torch.randn(*shape, dtype=torch.float64) * 3
    w64 = torch.randn(shape[-1], dtype=torch.float64)
    g64 = torch.randn(*shape, dtype=torch.float64)
    outs = {}
    for name, dtype in (("ref", torch.float64), ("hf32", torch.float32), ("fused32", torch.float32)):
        x = x64.to(dtype).clone().requires_grad_()
        w = w64.to(dtype).clone().requires_grad_()
        if name == "fused32":
            y = fused_layers.rms_norm(x, w, 1e-6)
        elif name == "ref":  # HF's formula in float64 (its module computes in fp32 whatever the input)
            y = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        else:
            y, norm = _hf_norm(x, w)
            w = norm.weight
        y.backward(g64.to(dtype))
        outs[name] = (y.detach().double(), x.grad.double(), w.grad.double())
    for i, what in enumerate(("y", "dx", "dweight")):
        ref = outs["ref"][i]
        err_fused = (outs["fused32"][i] - ref).abs().max().item()
        err_hf = (outs["hf32"][i] - ref).abs().max().item()
        assert err_fused <= 4 * err_hf + 1e-6 * ref.abs().max().item(), (what, err_fused, err_hf)


def test_rms_norm_fp64_and_bf16():
    torch.manual_seed(1)
    x = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 32, dtype=torch.float64)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # HF's formula, all in float64
    ref.backward(g)
    dx_ref, dw_ref = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y = fused_layers.rms_norm(x, w, 1e-6)
    y.backward(g)
    torch.testing.assert_close(y, ref, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(x.grad, dx_ref, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(w.grad, dw_ref, atol=1e-12, rtol=1e-11)
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()  # HF rounds the normalised x to bf16, then scales
    yb_ref, _ = _hf_norm(xb, wb)
    yb = fused_layers.rms_norm(xb, wb, 1e-6)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), yb_ref.float(), atol=0.02, rtol=0.016)


def test_rope_is_hf_bitwise_forward_and_its_adjoint_backward():
    torch.manual_seed(2)
    B, T, H, Hkv, D = 2, 9, 4, 2, 16
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()  # HF's layout: a transposed view
    k = torch.randn(B, T, Hkv, D).transpose(1, 2).requires_grad_()
    angles = torch.randn(B, T, D // 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    gq, gk = torch.randn_like(ref_q), torch.randn_like(ref_k)
    torch.autograd.backward([ref_q, ref_k], [gq, gk])
    dq_ref, dk_ref = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    out_q, out_k = fused_layers.rope(q, k, cos, sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)  # the same two products and sum
    assert out_q.stride() == q.stride()  # laid out like its input
    torch.autograd.backward([out_q, out_k], [gq, gk])
    torch.testing.assert_close(q.grad, dq_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k.grad, dk_ref, atol=1e-6, rtol=1e-6)
    # the adjoint holds for any cos/sin (halves not duplicated): <rope(x), y> = <x, rope^T(y)>
    x, y = torch.randn(1, 3, 5, 8, dtype=torch.float64), torch.randn(1, 3, 5, 8, dtype=torch.float64)
    c, s = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(1, 5, 8, dtype=torch.float64)
    lhs = (extension().rope_apply(x, c, s, False) * y).sum()
    rhs = (x * extension().rope_apply(y, c, s, True)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=1e-12)


def _patched_pair():
    model, _ = random_tiny_model(std=0.2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, intermediate_size=96)
    return model, copy.deepcopy(model)


def test_patched_training_forward_matches_hf(mode):
    mode("on")
    plain, fused = _patched_pair()
    assert fused_layers.apply_fused_layers(fused)
    torch.manual_seed(3)
    ids = torch.randint(3, 60, (3, 21))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding
    ops.reset_call_counts()
    outs = []
    for model, setting in ((plain, "off"), (fused, "on")):  # off: HF's code (the rotary patch is module-wide)
        mode(setting)
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attn).logits
        (logits.log_softmax(-1)[..., 5] * attn).sum().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    counts = ops.call_counts()
    assert counts[("rms_norm", "fused_layers")] == 2 * 4 + 1 and counts[("rope", "fused_layers")] == 2  # 2 layers
    ops.reset_call_counts()
    with torch.no_grad():
        plain(input_ids=ids)  # mode on, but never patched: HF's layers, the rotary too (module-wide dispatcher)
    assert not ops.call_counts()
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    teacher = copy.deepcopy(fused)  # an EMA/frozen teacher copy stays fused, bound to its own weights
    with torch.no_grad():
        teacher.model.norm.weight.mul_(2)
        assert not torch.allclose(teacher(input_ids=ids).logits, fused(input_ids=ids).logits)
    mode("off")
    ops.reset_call_counts()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, attention_mask=attn).logits, plain(input_ids=ids, attention_mask=attn).logits,
                                   atol=0, rtol=0)
    assert not any(backend == "fused_layers" for _, backend in ops.call_counts())


def test_modes_and_errors(mode, monkeypatch, caplog):
    with pytest.raises(ValueError, match="ops.fused_layers='sometimes'"):
        fused_layers.set_mode("sometimes")
    mode(False)  # YAML reads off as a boolean
    assert fused_layers.get_mode() == "off" and not fused_layers.enabled("cpu")
    mode("on")
    assert fused_layers.enabled("cpu") and not fused_layers.enabled("meta")
    monkeypatch.setattr(fused_layers, "_unavailable", lambda: "OSError: no compiler")
    with pytest.raises(RuntimeError, match="no compiler.*ops.fused_layers=auto/off"):
        fused_layers.enabled("cpu")
    mode("auto")
    with caplog.at_level("WARNING"):
        assert not fused_layers.enabled("cpu")
    model, _ = _patched_pair()
    assert not fused_layers.apply_fused_layers(model)  # auto without the extension: HF's layers, untouched
    assert "forward" not in vars(model.model.norm)


def test_the_trainer_trains_and_decodes_through_the_kernels(tiny_config, tmp_path, mode):
    """The real path: a GRPO run with ops.fused_layers=on runs the kernels in the update and the
    rollout, and its first step's loss equals the run with them off (float rounding)."""
    from selfdistill.trainer import Trainer

    losses = {}
    for setting in ("on", "off"):
        cfg = tiny_config(["trainer.stages=[grpo]", "grpo.steps=1", f"ops.fused_layers={setting}"])
        ops.reset_call_counts()
        Trainer(cfg, str(tmp_path / setting)).run()
        counts = ops.call_counts()
        ran = {op for (op, backend) in counts if backend == "fused_layers"}
        assert ran == ({"rms_norm", "rope", "decode_step"} if setting == "on" else set())
        import json

        rows = [json.loads(line) for line in open(tmp_path / setting / "metrics.jsonl")]
        losses[setting] = [r for r in rows if "loss" in r][-1]["loss"]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4, abs=1e-6)


def test_a_model_bound_for_cuda_is_left_alone(mode, monkeypatch):
    """The trainer loads on the CPU and moves to the engine's device: for a CUDA run nothing is
    patched and the extension is never built."""
    mode("on")
    monkeypatch.setattr(fused_layers, "_unavailable", lambda: pytest.fail("the extension was built for a CUDA run"))
    model, _ = _patched_pair()
    assert not fused_layers.apply_fused_layers(model, torch.device("cuda", 0))
    assert "forward" not in vars(model.model.norm)


def test_activation_checkpointing_recomputes_through_the_kernels(mode):
    """model.gradient_checkpointing: the recompute in the backward runs the fused layers again and
    the gradients equal the run without checkpointing."""
    from selfdistill.engine.memory import enable_activation_checkpointing

    mode("on")
    fused, checkpointed = _patched_pair()
    for model in (fused, checkpointed):
        assert fused_layers.apply_fused_layers(model)
    enable_activation_checkpointing(checkpointed)
    ids = torch.randint(3, 60, (2, 15), generator=torch.Generator().manual_seed(4))
    grads, rope_calls = [], []
    for model in (fused, checkpointed):
        model.train()
        ops.reset_call_counts()
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        rope_calls.append(ops.call_counts()[("rope", "fused_layers")])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert rope_calls == [2, 4]  # 2 layers; checkpointed: forward + recompute
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_cpp_decode_step_in_bf16_matches_the_python_step(mode):
    """model.dtype=bfloat16 on a CPU: the C++ step's error against the fp32 model is no worse than
    twice the Python bf16 step's (HF's casts kept), and it writes the same keys and values."""
    from selfdistill.rollout.direct_step import DirectDecoder
    from selfdistill.rollout.kv_cache import GrowingLayer

    fp32 = _patched_pair()[0].eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    B, L, cap = 5, 9, 12
    torch.manual_seed(5)
    keys = [torch.randn(B, 2, cap, 16, dtype=torch.bfloat16) for _ in range(2)]
    values = [torch.randn(B, 2, cap, 16, dtype=torch.bfloat16) for _ in range(2)]
    ids, pos = torch.randint(3, 60, (B, 1)), torch.arange(B)[:, None] + 3
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :2] = 0
    outs = {}
    for name, model, setting in (("fp32", fp32, "off"), ("python", bf16, "off"), ("cpp", bf16, "on")):
        mode(setting)
        dtype = next(model.parameters()).dtype
        cache = type("Cache", (), {})()
        cache.layers = [GrowingLayer(k.to(dtype), v.to(dtype), L - 1) for k, v in zip(keys, values)]
        cache.capacity = cap
        step = DirectDecoder(model)
        assert step.native == (name == "cpp")
        with torch.no_grad():
            outs[name] = (step(model, ids, pos, mask, cache).float(), cache.layers[1].keys[:, :, L - 1].float())
    err_cpp = (outs["cpp"][0] - outs["fp32"][0]).abs().max().item()
    err_python = (outs["python"][0] - outs["fp32"][0]).abs().max().item()
    assert 0 < err_python and err_cpp <= 2 * err_python, (err_cpp, err_python)
    torch.testing.assert_close(outs["cpp"][1], outs["python"][1], atol=0.05, rtol=0.02)


def test_hand_worked_rms_norm_and_rotation():
    """x = [3, 4], w = [1, 2], eps = 0: mean(x^2) = 12.5, rstd = 1/sqrt(12.5), y = [0.848528, 2.262742];
    with dy = [1, 0]: xhat = [0.848528, 1.131371], mean(dy w xhat) = 0.424264, dx = rstd ([1, 0] -
    0.424264 xhat) = [0.181019, -0.135765], dw = dy xhat = [0.848528, 0]. The rotary embedding at
    90 degrees turns [1, 2] into [-2, 1]; its adjoint takes dy = [1, 0] to [0, -1]."""
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = fused_layers.rms_norm(x, w, 0.0)
    y.backward(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(y, torch.tensor([[0.848528137, 2.262741700]], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(x.grad, torch.tensor([[0.181019336, -0.135764502]], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(w.grad, torch.tensor([0.848528137, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    q = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 2)
    cos, sin = torch.zeros(1, 1, 2, dtype=torch.float64), torch.ones(1, 1, 2, dtype=torch.float64)
    assert extension().rope_apply(q, cos, sin, False).flatten().tolist() == [-2.0, 1.0]
    dy = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    assert extension().rope_apply(dy, cos, sin, True).flatten().tolist() == [0.0, -1.0]
