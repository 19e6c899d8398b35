"""Fused `fused_linear_token_logprobs`: log-probs from hidden + LM head, through the shared chunked
host side (selfdistill/ops/logprob_host.py) over the Triton kernels (kernels/fused_linear.py)
and, in the fp64 comparison, over the csrc kernels' CPU path too.

Against an independent fp64 formula (full logits, log_softmax), CPU interpreter, fp32 inputs;
criterion as for token_logprobs: error no worse than max(2 * torch fp32 error, floor).
"""

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
from selfdistill.ops import cuda_ext, reference  # noqa: E402  (cuda_ext: the csrc extension's CPU path)


def formula(hidden, weight, targets, temperature, chunk_rows=None):
    ls = torch.log_softmax(hidden @ weight.t() / temperature, dim=-1)
    return ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(ls.exp() * ls).sum(-1)


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def run(fn, hidden, weight, targets, temperature, g_logp, g_ent, chunk_rows=None, grad_hidden=True, grad_weight=True):
    h = hidden.detach().clone().requires_grad_(grad_hidden)
    w = weight.detach().clone().requires_grad_(grad_weight)
    kwargs = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    logp, ent = fn(h, w, targets, temperature, **kwargs)
    (logp * g_logp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def make(N, H, V, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (3.0 / H**0.5)
    targets = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(2, N, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, g[0], g[1]


# (N, H, V, chunk_rows): N=1, a chunk that does not divide N, V not a multiple of the tile, a long
# row. N < V runs the backward over vocabulary slices, N >= V (the last two) over row chunks.
SHAPES = [(1, 8, 37, 1024), (9, 16, 300, 4), (33, 24, 1031, 16), (7, 5, 4099, 3), (40, 8, 37, 16), (64, 12, 50, 7)]


@pytest.mark.parametrize("N,H,V,chunk_rows", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_forward_and_gradients_match_fp64(N, H, V, chunk_rows, temperature):
    hidden, weight, targets, g_logp, g_ent = make(N, H, V, seed=N * 7 + V)
    truth = run(formula, hidden.double(), weight.double(), targets, temperature, g_logp, g_ent)
    torch32 = run(formula, hidden, weight, targets, temperature, g_logp, g_ent)
    for impl in (kernels.fused_linear_token_logprobs, cuda_ext.fused_linear_token_logprobs, reference.fused_linear_token_logprobs):
        got = run(impl, hidden, weight, targets, temperature, g_logp, g_ent, chunk_rows=chunk_rows)
        for name, i, floor in (("logp", 0, 1e-5), ("entropy", 1, 1e-5), ("dhidden", 2, 1e-5), ("dweight", 3, 1e-5)):
            e_got, e_torch = err(got[i], truth[i]), err(torch32[i], truth[i])
            assert e_got <= max(2 * e_torch, floor), f"{impl.__module__} {name}: {e_got:.3g} vs torch fp32 {e_torch:.3g}"


@pytest.mark.parametrize("N,V", [(6, 300), (40, 30)])  # vocabulary slices, row chunks
def test_frozen_weight_or_hidden_gets_no_gradient_and_the_other_is_right(N, V):
    hidden, weight, targets, g_logp, g_ent = make(N, 12, V, seed=3)
    truth = run(formula, hidden.double(), weight.double(), targets, 1.0, g_logp, g_ent)
    only_h = run(kernels.fused_linear_token_logprobs, hidden, weight, targets, 1.0, g_logp, g_ent, chunk_rows=4, grad_weight=False)
    only_w = run(kernels.fused_linear_token_logprobs, hidden, weight, targets, 1.0, g_logp, g_ent, chunk_rows=4, grad_hidden=False)
    assert only_h[3] is None and only_w[2] is None
    assert err(only_h[2], truth[2]) < 1e-5 and err(only_w[3], truth[3]) < 1e-5


def test_same_result_whatever_the_chunking_and_deterministic():
    hidden, weight, targets, g_logp, g_ent = make(10, 16, 500, seed=4)
    one = run(kernels.fused_linear_token_logprobs, hidden, weight, targets, 1.0, g_logp, g_ent, chunk_rows=1)
    all_rows = run(kernels.fused_linear_token_logprobs, hidden, weight, targets, 1.0, g_logp, g_ent, chunk_rows=1024)
    for a, b in zip(one, all_rows):
        assert err(a, b) < 1e-5
    again = run(kernels.fused_linear_token_logprobs, hidden, weight, targets, 1.0, g_logp, g_ent, chunk_rows=1)
    assert all(torch.equal(a, b) for a, b in zip(one, again))


def test_padded_rows_contribute_nothing_to_dweight():
    hidden, weight, targets, _, _ = make(8, 16, 300, seed=5)
    keep = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)

    def dweight(h):
        w = weight.detach().clone().requires_grad_()
        logp, ent = kernels.fused_linear_token_logprobs(h, w, targets, chunk_rows=3)
        torch.where(keep, logp + 0.01 * ent, 0.0).sum().backward()
        return w.grad

    garbage = hidden.clone()
    garbage[~keep] = torch.randn(int((~keep).sum()), 16) * 50
    assert err(dweight(hidden), dweight(garbage)) < 1e-6


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
def test_dispatch_sequence_token_logprobs_runs_the_chosen_backend(backend):
    """`ops.sequence_token_logprobs` runs the implementation `ops.backend` names (auto on CPU: the
    torch reference), counted where that implementation launches, and nothing else: a dispatch that
    fell back to torch would be counted under "torch"."""
    hidden, weight, targets, _, _ = make(5, 8, 100, seed=6)
    assert ops.get_backend() == "auto"
    try:
        ops.set_backend(backend)
        ops.reset_call_counts()
        lp, ent = ops.sequence_token_logprobs(hidden, weight, targets, 1.1)
        counts = ops.call_counts()
    finally:
        ops.set_backend("auto")
    ran = "torch" if backend == "auto" else backend
    assert counts == {("fused_linear_token_logprobs", ran): 1}
    want_lp, want_ent = formula(hidden.double(), weight.double(), targets, 1.1)
    assert err(lp, want_lp) < 1e-5 and err(ent, want_ent) < 1e-5


def test_input_validation():
    with pytest.raises(ValueError, match="same dtype|cast one"):
        kernels.fused_linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden \\[N, H\\]"):
        kernels.fused_linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 3), torch.zeros(2, dtype=torch.long))
