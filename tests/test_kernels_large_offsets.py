"""Offsets past 2**31 elements (SPEC section 8: int64 offsets) in the Triton kernels (interpreter)
and the csrc extension's CPU path: rows that start more than 2**31 elements after the tensor's
first element are read (token_logprobs: forward and backward; gold_decoy_contrast: the LM-head rows
its first-position kernel reads by token id) and written (the Triton token_logprobs backward into a
strided output) at the right place.

The rows are views into one 2**32-element bf16 buffer: 8 GB of address space, of which only the
pages the few rows occupy are ever touched. Their row stride S = 2**30 + 4096 is below 2**31, so it
reaches a Triton kernel as a 32-bit integer, and row 2 starts at 2 S > 2**31 elements. An offset
formed in int32 wraps to 2 S - 2**32 < 0; the views start 2**31 elements into the buffer, so the
wrapped address still lies inside it (untouched memory reads as zeros) and a kernel with an int32
offset returns wrong numbers -- the test fails with a message -- rather than crashing the process.
Checked by hand: the Triton kernels with `tl.program_id(0)` left int32 (token_logprobs forward and
backward) and the csrc forward with its row offset cast to int32 fail here.
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

from selfdistill.kernels.token_logprobs import token_logprobs_backward, token_logprobs_forward  # noqa: E402
from selfdistill.ops import contrast_reference as reference, cuda_ext  # noqa: E402

ROW_STRIDE = 2**30 + 4096  # elements; < 2**31, so an int32 argument; 2 * ROW_STRIDE > 2**31
FIRST = 2**31  # where the views start in the buffer: an offset wrapped by int32 stays inside it
V = 64


@pytest.fixture(scope="module")
def sparse_buffer():
    try:
        buf = torch.empty(FIRST + 2 * ROW_STRIDE + 2**20, dtype=torch.bfloat16)  # ~8 GB reserved, not touched
    except RuntimeError as e:
        pytest.skip(f"the large-offset tests need 8 GB of address space (memory overcommit): {e}")
    yield buf
    del buf


def far_apart(buf, values, at=0):
    """`values` [n, ...] copied into a view of `buf` whose rows are ROW_STRIDE elements apart,
    starting `at` elements after FIRST (the inner dimensions stay contiguous)."""
    inner = values[0].contiguous().stride()
    view = buf.as_strided(values.shape, (ROW_STRIDE, *inner), FIRST + at)
    view.copy_(values)
    assert view.storage_offset() + (values.shape[0] - 1) * ROW_STRIDE >= 2**31 + 2**30
    return view


def formula(logits, targets, temperature):
    """log p(target) and entropy straight from log_softmax (fp64 in, fp64 out: the ground truth)."""
    ls = torch.log_softmax(logits / temperature, dim=-1)
    return ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(ls.exp() * ls).sum(-1)


def logprob_grads(fn, logits, targets, upstream):
    """(logp, entropy, d logits) of sum(upstream[0] * logp + upstream[1] * entropy)."""
    x = logits.detach().requires_grad_(True)
    logp, ent = fn(x, targets, 0.9)
    (grad,) = torch.autograd.grad((logp * upstream[0]).sum() + (ent * upstream[1]).sum(), x)
    return logp.detach(), ent.detach(), grad


@pytest.mark.parametrize("impl", [kernels.token_logprobs, cuda_ext.token_logprobs], ids=["triton", "csrc"])
def test_token_logprobs_reads_rows_past_2_31(sparse_buffer, impl):
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(3, V, generator=gen) * 3).bfloat16()
    targets = torch.tensor([5, 17, 63])
    upstream = torch.randn(2, 3, generator=gen)
    got = logprob_grads(impl, far_apart(sparse_buffer, values), targets, upstream)
    want = logprob_grads(formula, values.double(), targets, upstream.double())
    for name, a, b, tol in zip(("logp", "entropy", "dlogits"), got, want, (1e-5, 1e-5, 1e-2)):  # dlogits in bf16
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_triton_token_logprobs_backward_writes_rows_past_2_31(sparse_buffer):
    """The backward kernel's store: d logits into a strided output whose row 2 lies past 2**31
    (pre-filled with NaN, so a row written elsewhere fails the comparison)."""
    gen = torch.Generator().manual_seed(1)
    values = (torch.randn(3, V, generator=gen) * 3).bfloat16()
    targets = torch.tensor([0, 31, 40])
    dlogp, dent = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    logits = far_apart(sparse_buffer, values)
    out = far_apart(sparse_buffer, torch.full((3, V), float("nan")).bfloat16(), at=V)
    _, ent, lse_parts = token_logprobs_forward(logits, targets, 0.9)
    token_logprobs_backward(logits, targets, lse_parts, ent, dlogp, dent, 0.9, out=out)
    want = logprob_grads(formula, values.double(), targets, torch.stack([dlogp, dent]).double())[2]
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-2)


@pytest.mark.parametrize("impl", [kernels.gold_decoy_contrast, cuda_ext.gold_decoy_contrast], ids=["triton", "csrc"])
def test_gold_decoy_contrast_reads_weight_rows_past_2_31(sparse_buffer, impl):
    """An LM head of V = 3 rows ROW_STRIDE apart (row 2 past 2**31 elements), R = 3 rows of K = 2
    divergent positions: the first reads W[gold] - W[decoy] by id (the offset id * row stride), the
    second runs both passes' fused-linear log-probs; forward, belief and the gradients to the
    hidden states and the weight."""
    gen = torch.Generator().manual_seed(2)
    H = V
    w_vals = (torch.randn(3, H, generator=gen) / 4).bfloat16()
    gold_h, decoy_h = ((torch.randn(3, 2, H, generator=gen) * 2).bfloat16() for _ in range(2))
    gold_ids = torch.tensor([[2, 0], [1, 2], [2, 1]])
    decoy_ids = torch.tensor([[0, 2], [2, 0], [1, 2]])
    divergent = torch.ones(3, 2, dtype=torch.bool)
    upstream = torch.randn(3, 2, generator=gen)

    def run(fn, weight, gold, decoy):
        weight, gold, decoy = (t.detach().requires_grad_(True) for t in (weight, gold, decoy))
        contrast, belief = fn(gold, decoy, weight, None, gold_ids, decoy_ids, divergent, 0.9)
        grads = torch.autograd.grad((contrast * upstream.to(contrast.dtype)).sum() + belief.sum(), (gold, decoy, weight))
        return contrast.detach(), belief.detach(), *grads

    got = run(impl, far_apart(sparse_buffer, w_vals), gold_h, decoy_h)
    same = run(reference.gold_decoy_contrast, w_vals, gold_h, decoy_h)  # torch's own bf16 forward, contiguous head
    exact = run(reference.gold_decoy_contrast, w_vals.double(), gold_h.double(), decoy_h.double())
    for name, a, b in zip(("contrast", "belief"), got, same):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for name, a, b in zip(("dgold", "ddecoy", "dweight"), got[2:], exact[2:]):  # bf16 gradients vs fp64
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2, msg=lambda m, name=name: f"{name}: {m}")
    first = impl(gold_h[:, :1], None, far_apart(sparse_buffer, w_vals), None, gold_ids[:, :1], decoy_ids[:, :1],
                 divergent[:, :1], 0.9)[0]
    exact = ((gold_h[:, 0].double() * (w_vals[gold_ids[:, 0]].double() - w_vals[decoy_ids[:, 0]].double())).sum(-1) / 0.9)
    torch.testing.assert_close(first[:, 0].double(), exact, rtol=0, atol=1e-5)  # the far row read at the right place
