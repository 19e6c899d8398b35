"""The C++/CUDA extension (csrc/, `ops.backend=cuda`): its CPU path against an fp64 reference
(token log-probs) and the torch reference (policy loss), and the CUDA sources compiled by nvcc for
an H100 (sm_90) where nvcc exists (no GPU needed)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from selfdistill import ops
from selfdistill.ops import contrast_reference, cuda_ext, reference



def fp64_reference(logits, targets, temperature):
    lp = torch.log_softmax(logits.double() / temperature, -1)
    logp = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = lp.exp()
    ent = -(p * torch.where(torch.isfinite(lp), lp, 0.0)).sum(-1)
    return logp, ent


@pytest.fixture(scope="module")
def ext():
    return cuda_ext.extension()  # the first build takes ~1 minute here, then it is cached


@pytest.mark.parametrize("N,V,temperature", [(1, 7, 1.0), (5, 131, 0.6), (33, 1000, 1.3), (3, 5003, 1.0)])
def test_forward_and_gradients_match_fp64(ext, N, V, temperature):
    g = torch.Generator().manual_seed(N * V)
    logits = (torch.randn(N, V, generator=g) * 4).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    logp, ent = cuda_ext.token_logprobs(logits, targets, temperature)
    x64 = logits.detach().double().requires_grad_(True)
    want_lp, want_ent = fp64_reference(x64, targets, temperature)
    wl, we = want_lp.detach(), want_ent.detach()
    ours_err = max(float((logp.detach().double() - wl).abs().max()), float((ent.detach().double() - we).abs().max()))
    t_lp, t_ent = reference.token_logprobs(logits.detach(), targets, temperature)  # torch's own fp32
    torch_err = max(float((t_lp.double() - wl).abs().max()), float((t_ent.double() - we).abs().max()))
    assert ours_err <= max(2 * torch_err, 1e-5), (ours_err, torch_err)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()
    ((want_lp * w_lp.double()).sum() + (want_ent * w_ent.double()).sum()).backward()
    x32 = logits.detach().clone().requires_grad_(True)
    t_lp, t_ent = reference.token_logprobs(x32, targets, temperature)
    ((t_lp * w_lp).sum() + (t_ent * w_ent).sum()).backward()
    ours_err = float((logits.grad.double() - x64.grad).abs().max())
    torch_err = float((x32.grad.double() - x64.grad).abs().max())
    assert ours_err <= max(2 * torch_err, 1e-6), (ours_err, torch_err)


def test_banned_tokens_half_precision_and_errors(ext):
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0], [3.0, 3.0, float("-inf"), float("-inf")]])
    logp, ent = cuda_ext.token_logprobs(logits, torch.tensor([3, 0]))
    want_lp, want_ent = fp64_reference(logits, torch.tensor([3, 0]), 1.0)
    assert torch.allclose(logp.double(), want_lp, atol=1e-6) and torch.allclose(ent.double(), want_ent, atol=1e-6)
    assert ent[1].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # two equal tokens
    bf = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).bfloat16()
    t = torch.tensor([1, 2, 3, 299])
    lp_bf, _ = cuda_ext.token_logprobs(bf, t)
    assert torch.allclose(lp_bf.double(), fp64_reference(bf.float(), t, 1.0)[0], atol=1e-5)  # fp32 math on bf16 input
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        cuda_ext.token_logprobs(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="temperature"):
        cuda_ext.token_logprobs(torch.zeros(2, 5), torch.tensor([0, 1]), 0.0)


def test_dispatch_through_ops_and_fused_linear(ext):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 16, generator=g, requires_grad=True), torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (9,), generator=g)
    try:
        ops.set_backend("cuda")
        ops.reset_call_counts()
        lp, ent = ops.sequence_token_logprobs(h, w, t, 0.7)
        assert ops.call_counts() == {("fused_linear_token_logprobs", "cuda"): 1}
    finally:
        ops.set_backend("auto")
    (lp.sum() + ent.sum()).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lp2, ent2 = reference.fused_linear_token_logprobs(h, w, t, 0.7)
    (lp2.sum() + ent2.sum()).backward()
    assert torch.allclose(lp, lp2, atol=1e-5) and torch.allclose(ent, ent2, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)


LOSS_GRID = [(lt, tw, dual, est) for lt in ("grpo", "dapo", "dr_grpo", "gspo") for tw in ("uniform", "ramp")
             for dual, est in ((None, "k3"), (3.0, "k1"), (None, "k2"))]


@pytest.mark.parametrize("loss_type,weighting,dual_clip,kl_estimator", LOSS_GRID)
def test_policy_loss_matches_the_reference(ext, loss_type, weighting, dual_clip, kl_estimator):
    """Loss, stats and the gradients to logp and entropy equal autograd through the torch reference
    (float rounding): masked-out positions hold garbage, one row has no loss token, one is length 1."""
    g = torch.Generator().manual_seed(hash((loss_type, weighting, kl_estimator)) % 1000)
    B, T = 6, 19
    lengths = torch.tensor([19, 4, 11, 1, 15, 7])
    mask = torch.arange(T)[None] < lengths[:, None]
    mask[0, 3] = False  # a forced token inside the completion
    mask[5] = False  # a row with no loss token
    lp = torch.randn(B, T, generator=g) * 0.3 - 1
    old = torch.where(mask, lp + torch.randn(B, T, generator=g) * 0.3, torch.full((B, T), float("nan")))
    adv, ref = torch.randn(B, T, generator=g), lp + torch.randn(B, T, generator=g) * 0.2
    ent = torch.where(mask, torch.rand(B, T, generator=g) * 2, torch.full((B, T), float("inf")))
    kw = dict(ref_logp=ref, loss_type=loss_type, dual_clip=dual_clip, kl_coef=0.1, kl_estimator=kl_estimator,
              entropy_coef=0.01, token_weighting=weighting, max_len_norm=T)
    got, want = [], []
    for impl, out in ((cuda_ext.policy_loss, got), (reference.policy_loss, want)):
        x, e = lp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
        loss, stats = impl(x, old, adv, mask, lengths, entropy=e, **kw)
        loss.backward()
        out += [loss.detach(), x.grad, e.grad, stats]
    assert torch.isfinite(got[0]) and float((got[0] - want[0]).abs()) < 1e-6
    assert float((got[1] - want[1]).abs().max()) < 1e-6 and float((got[2] - want[2]).abs().max()) < 1e-6
    assert not got[1][~mask].any() and not got[2][~mask].any()
    assert got[3].keys() == want[3].keys()
    for k in want[3]:
        assert float((got[3][k] - want[3][k]).abs()) < 1e-6, k


def test_policy_loss_hand_worked(ext):
    """SPEC section 5 by hand. Row 0, on-policy (r = 1), A = (2, -1), grpo, uniform weights:
    l = -r A = (-2, 1), loss = mean over the row's tokens = -0.5, d loss / d logp_t = -A_t / 2.
    Row 1: r = e^0.5 > 1 + 0.28 with A = 1 > 0: clipped, l = -1.28, no gradient; the loss is the
    mean of the rows' means (-0.5 - 1.28) / 2, and the high-clip fraction 1/3."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    adv = torch.tensor([[2.0, -1.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = cuda_ext.policy_loss(logp, old, adv, mask, torch.tensor([2, 1]), entropy_coef=0.0)
    loss.backward()
    assert loss.item() == pytest.approx((-0.5 - 1.28) / 2, abs=1e-6)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, 0.25, 0.0, 0.0], abs=1e-7)  # (-A_t / 2) / 2 rows
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)


def test_policy_loss_empty_batch_and_dispatch(ext):
    z = torch.zeros(0, 5)
    loss, _ = cuda_ext.policy_loss(z, z, z, z.bool(), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    args = (torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.tensor([3, 3]))
    try:
        ops.set_backend("cuda")
        ops.reset_call_counts()
        got, _ = ops.dispatched_policy_loss(*args)
        assert ops.call_counts() == {("policy_loss", "cuda"): 1}
    finally:
        ops.set_backend("auto")
    want, _ = reference.policy_loss(*args)
    assert float((got - want).abs()) < 1e-6


def test_contrast_bad_ids_and_dispatch(ext):
    """An id outside the vocabulary at a first divergent position raises (CPU path) naming it; ids
    off the divergent positions are never read. `ops.backend=cuda` dispatches the contrast family
    here: the first-position kernel, the later positions' token-logprob kernels, the float64 row
    reduction and the shift (the fp64 comparisons are in tests/test_kernels_contrast.py)."""
    g = torch.Generator().manual_seed(2)
    gold, decoy = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    weight, bias = torch.randn(11, 16, generator=g), torch.randn(11, generator=g)
    divergent = torch.tensor([[False, True, True], [True, False, False]])
    gold_ids = torch.tensor([[-1, 4, 10], [11, -1, -1]])
    decoy_ids = torch.tensor([[-1, 5, 6], [3, -1, -1]])
    with pytest.raises(RuntimeError, match="gold id 11 or decoy id 3 of first divergent position 1 is outside the vocabulary"):
        cuda_ext.gold_decoy_contrast(gold, decoy, weight, bias, gold_ids, decoy_ids, divergent)
    gold_ids[1, 0] = 2
    want = contrast_reference.gold_decoy_contrast(gold, decoy, weight, bias, gold_ids.clamp(min=0), decoy_ids.clamp(min=0),
                                                  divergent)
    try:
        ops.set_backend("cuda")
        ops.reset_call_counts()
        got = ops.dispatched_gold_decoy_contrast(gold, decoy, weight, bias, gold_ids, decoy_ids, divergent)
        did = ops.dispatched_gold_decoy_did(got.contrast, torch.zeros_like(got.contrast), divergent)
        shift, flip = ops.dispatched_belief_shift(got.belief, -got.belief)
        assert ops.call_counts() == {("gold_decoy_contrast", "cuda"): 1, ("fused_linear_token_logprobs", "cuda"): 1,
                                     ("clipped_mean_min", "cuda"): 1, ("belief_shift", "cuda"): 1}
    finally:
        ops.set_backend("auto")
    assert torch.allclose(got.contrast, want.contrast, atol=1e-6) and torch.allclose(got.belief, want.belief, atol=1e-6)
    assert torch.allclose(did, contrast_reference.clipped_mean_min(want.contrast, divergent), atol=1e-6)
    want_shift, want_flip = contrast_reference.belief_shift(want.belief, -want.belief)
    assert torch.allclose(shift, want_shift, atol=1e-6) and torch.equal(flip, want_flip)


def _cuda_host_compile_flags(tmp_path) -> list[str]:
    """g++ flags that compile a .cpp's WITH_CUDA side here: torch's and CUDA's headers, plus an empty
    stand-in for the one header a CPU build of torch does not ship (cmake-generated macros)."""
    import sysconfig

    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("")
    dirs = [*include_paths(), sysconfig.get_paths()["include"], os.path.join(CUDA_HOME or "/usr/local/cuda", "include"),
            str(tmp_path / "stub")]
    return ["-std=c++17", "-fPIC", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=csrc_check", *(f"-I{d}" for d in dirs)]


def _symbols(obj, kind: str) -> set[str]:
    """Mangled launcher symbols of an object file: kind "U" (used, undefined) or "T" (defined)."""
    out = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.split()[-2:-1] == [kind] and "_launch" in line}


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("g++") is None, reason="nvcc / g++ not installed")
@pytest.mark.parametrize("op", ["token_logprobs", "policy_loss", "contrast"])
def test_cuda_kernels_compile_for_sm90_and_match_their_host_side(tmp_path, op):
    """The kernel files are torch-free (the C++ side owns tensors and streams), so nvcc compiles them
    here for an H100 (sm_90); the op's .cpp compiles WITH_CUDA, and every launcher it calls is
    defined by the .cu with the same mangled name, i.e. the same signature (what the JIT link on a
    GPU machine will need)."""
    csrc = cuda_ext._csrc_dir()
    cu, cpp = tmp_path / "kernels.o", tmp_path / "host.o"
    steps = [["nvcc", "-c", "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", os.path.join(csrc, f"{op}_cuda.cu"),
              "-o", str(cu)],
             ["g++", "-c", "-O0", *_cuda_host_compile_flags(tmp_path), os.path.join(csrc, f"{op}.cpp"), "-o", str(cpp)]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    called, defined = _symbols(cpp, "U"), _symbols(cu, "T")
    assert called and called <= defined, (called, defined)
