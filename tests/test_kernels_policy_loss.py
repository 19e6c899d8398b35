"""Triton `policy_loss` (kernels/policy_loss.py) and the progressive token weights, SPEC sections 5, 7.

Ground truth: the torch reference run in fp64 (its formulas are checked by hand-worked cases
below); the kernel (fp32) must be no worse than the reference in fp32, max(2 * err_torch, floor).
The in-kernel progressive weights are read back from the gradient: with r = 1 and A = -1 on every
token, GRPO's d loss / d logp_t = w_t / n_tokens, and the hand-worked values are checked there.
"""

import itertools
import os

# Read when selfdistill.kernels is first imported, and again by triton at its first interpreted
# launch (so it stays set for the rest of this pytest process).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

kernels = pytest.importorskip("selfdistill.kernels")
if not kernels.INTERPRETED:
    pytest.skip("selfdistill.kernels was imported before TRITON_INTERPRET=1; run kernel tests in their own process", allow_module_level=True)

from selfdistill import ops  # noqa: E402
from selfdistill.ops import reference  # noqa: E402


def make_batch(B, T, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=dtype) * 3
    # ratios on both sides of the clip, per token and (row offsets) per sequence for gspo
    old = logp + torch.linspace(-0.5, 0.5, B, dtype=dtype).unsqueeze(1) + torch.randn(B, T, generator=gen, dtype=dtype) * 0.3
    ref = logp + torch.randn(B, T, generator=gen, dtype=dtype) * 0.3
    entropy = torch.rand(B, T, generator=gen, dtype=dtype) * 2
    adv = torch.randn(B, T, generator=gen, dtype=dtype)
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[1] = False  # a row with no token in the loss
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = 1
    return dict(logp=logp, old=old, ref=ref, entropy=entropy, adv=adv, mask=mask, lengths=lengths)


def run(impl, batch, dtype, **options):
    logp = batch["logp"].to(dtype).clone().requires_grad_()
    entropy = batch["entropy"].to(dtype).clone().requires_grad_()
    loss, stats = impl(
        logp, batch["old"].to(dtype), batch["adv"].to(dtype), batch["mask"], batch["lengths"],
        ref_logp=batch["ref"].to(dtype), entropy=entropy, **options,
    )
    loss.backward()
    return loss.detach(), logp.grad, entropy.grad, {k: v.item() for k, v in stats.items()}


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


GRID = list(itertools.product(["grpo", "dapo", "dr_grpo", "gspo"], ["uniform", "ramp"], ["k1", "k2", "k3"], [None, 1.5]))


@pytest.mark.parametrize("loss_type,weighting,kl_estimator,dual_clip", GRID)
def test_loss_gradients_and_stats_match_fp64(loss_type, weighting, kl_estimator, dual_clip):
    batch = make_batch(5, 37, seed=11)
    options = dict(loss_type=loss_type, token_weighting=weighting, kl_estimator=kl_estimator, dual_clip=dual_clip,
                   kl_coef=0.1, entropy_coef=0.01, max_len_norm=40)
    truth = run(reference.policy_loss, batch, torch.float64, **options)
    torch32 = run(reference.policy_loss, batch, torch.float32, **options)
    got = run(kernels.policy_loss, batch, torch.float32, **options)
    for name, i, floor in (("loss", 0, 1e-6), ("dlogp", 1, 1e-7), ("dentropy", 2, 1e-7)):
        e_got, e_torch = err(got[i], truth[i]), err(torch32[i], truth[i])
        assert e_got <= max(2 * e_torch, floor), f"{name}: {e_got:.3g} vs torch fp32 {e_torch:.3g}"
    assert got[3].keys() == truth[3].keys() == {"clip_ratio/low_mean", "clip_ratio/high_mean", "ratio_mean", "kl", "entropy"}
    for k in truth[3]:
        assert got[3][k] == pytest.approx(truth[3][k], abs=1e-5), k
    assert 0 < got[3]["clip_ratio/low_mean"] + got[3]["clip_ratio/high_mean"] < 1  # the batch exercises the clip


def kernel_weights(mask, lengths, weighting="ramp"):
    """The per-token weights the kernel applies, read back from d loss / d logp (see module doc)."""
    B, T = mask.shape
    logp = torch.full((B, T), -1.0, requires_grad=True)
    loss, _ = kernels.policy_loss(logp, logp.detach(), -torch.ones(B, T), mask, lengths, loss_type="grpo",
                                  token_weighting=weighting, entropy_coef=0.0)
    loss.backward()
    n_tokens = mask.sum(1, keepdim=True).clamp(min=1)
    return logp.grad * B * n_tokens


def test_progressive_weights_hand_worked():
    mask = torch.tensor([
        [1, 0, 0, 0, 0],  # L = 1 -> w = 1
        [1, 1, 1, 0, 0],  # L = 3, all in the mask: 0.5, 1.0, 1.5 (mean already 1)
        [0, 1, 0, 1, 0],  # L = 5: raw 0.75 and 1.25 on the masked tokens, mean 1
        [0, 0, 0, 0, 0],  # no token in the mask -> all 0
        [0, 0, 1, 1, 1],  # L = 5, forced prefix of 2 out of the mask: raw 1.0, 1.25, 1.5 -> / 1.25
    ], dtype=torch.bool)
    lengths = torch.tensor([1, 3, 5, 4, 5])
    want = torch.tensor([
        [1.0, 0, 0, 0, 0],
        [0.5, 1.0, 1.5, 0, 0],
        [0, 0.75, 0, 1.25, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0.8, 1.0, 1.2],
    ])
    assert torch.allclose(reference.progressive_token_weights(lengths, mask), want, atol=1e-6)
    assert torch.allclose(kernel_weights(mask, lengths), want, atol=1e-6)
    assert torch.equal(kernel_weights(mask, lengths, "uniform"), mask.float())


def test_progressive_weights_mean_exactly_one_over_masked_tokens():
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(6, 300, generator=gen) < 0.5
    mask[:, 0] = True
    lengths = torch.tensor([300, 299, 150, 2, 77, 1])
    mask &= torch.arange(300) < lengths.unsqueeze(1)
    for w in (reference.progressive_token_weights(lengths, mask), kernel_weights(mask, lengths)):
        means = (w * mask).sum(1) / mask.sum(1)
        assert torch.allclose(means, torch.ones(6), atol=1e-5)
        assert torch.all(w[~mask] == 0)


def test_padding_contributes_nothing_even_when_it_holds_garbage():
    batch = make_batch(4, 30, seed=2, dtype=torch.float32)
    options = dict(loss_type="dapo", token_weighting="ramp", kl_coef=0.1, dual_clip=3.0)
    clean = run(kernels.policy_loss, batch, torch.float32, **options)
    dirty = {k: v.clone() for k, v in batch.items()}
    off = ~batch["mask"]
    for k, junk in (("logp", float("nan")), ("old", float("-inf")), ("ref", 1e30), ("entropy", float("inf")), ("adv", float("nan"))):
        dirty[k][off] = junk
    for impl in (kernels.policy_loss, reference.policy_loss):
        got = run(impl, dirty, torch.float32, **options)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all(), impl.__module__
        assert err(got[0], clean[0]) < 1e-6 and err(got[1], clean[1]) < 1e-7
        assert torch.all(got[1][off] == 0) and torch.all(got[2][off] == 0)


def test_deterministic_across_runs():
    batch = make_batch(5, 37, seed=3, dtype=torch.float32)
    options = dict(loss_type="gspo", token_weighting="ramp", kl_coef=0.1)
    a, b = run(kernels.policy_loss, batch, torch.float32, **options), run(kernels.policy_loss, batch, torch.float32, **options)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]


def test_empty_batch_and_nothing_masked_give_zero_loss():
    for B in (0, 3):
        logp = torch.zeros(B, 8, requires_grad=True)
        loss, stats = kernels.policy_loss(logp, logp.detach(), torch.ones(B, 8), torch.zeros(B, 8, dtype=torch.bool), torch.full((B,), 8))
        loss.backward()
        assert loss.item() == 0.0 and torch.all(logp.grad == 0) and stats["ratio_mean"].item() == 0.0


def test_errors_and_dispatch():
    batch = make_batch(3, 10, seed=4, dtype=torch.float32)
    args = (batch["logp"], batch["old"], batch["adv"], batch["mask"], batch["lengths"])
    with pytest.raises(ValueError, match="max_len_norm"):
        kernels.policy_loss(*args, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        kernels.policy_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages must be"):
        kernels.policy_loss(batch["logp"], batch["old"], batch["adv"][:, :3], batch["mask"], batch["lengths"])
    try:
        ops.set_backend("cuda")
        from selfdistill.ops import cuda_ext

        for name in ("token_logprobs", "fused_linear_token_logprobs", "policy_loss", "gold_decoy_contrast", "clipped_mean_min"):
            assert ops._impl(name, "cpu") is getattr(cuda_ext, name), name
    finally:
        ops.set_backend("auto")
    with pytest.raises(ValueError, match="not valid"):
        ops.set_backend("jax")
    want, _ = reference.policy_loss(*args, token_weighting="ramp")
    for backend, ran in (("auto", "torch"), ("triton", "triton"), ("cuda", "cuda")):  # auto on CPU -> torch
        try:
            ops.set_backend(backend)
            ops.reset_call_counts()
            loss, _ = ops.dispatched_policy_loss(*args, token_weighting="ramp")
            counts = ops.call_counts()
        finally:
            ops.set_backend("auto")
        assert counts == {("policy_loss", ran): 1}, backend
        assert err(loss, want) < 1e-6, backend
