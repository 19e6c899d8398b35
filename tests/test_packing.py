"""Packed rows for the log-prob forward (selfdistill/algo/packing.py, algo/logprobs.py): one
sequence of the real tokens, each distinct prompt once. References: a hand-worked layout, each row
alone through the HF model (no padding, no packing, the log-softmax of its logits), and the padded
layout (`uses_packing` off) for gradients."""

from __future__ import annotations

import pytest
import torch

from selfdistill.algo import grpo, logprobs, packing
from selfdistill.algo.logprobs import completion_outputs, packing_scope, uses_packing
from selfdistill.engine import build_engine
from selfdistill.engine.memory import enable_activation_checkpointing
from selfdistill.models import load_model_and_tokenizer
from selfdistill.rollout import build_rollout_backend
from tests.conftest import TINY_RUN, compose_config, random_tiny_model

PROMPTS = [[1, 5, 6, 7], [1, 5, 6, 7], [1, 9, 10], [1, 5, 6, 7], [1, 9, 10], [2]]  # shared and distinct, mixed lengths
LENGTHS = [7, 3, 5, 1, 7, 4]


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_model(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             intermediate_size=64)[0]


def _rows(T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(5, 60, (len(PROMPTS), T), generator=g)
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    return comp.masked_fill(~mask, 0), mask


def _forward(model, comp, mask, packed: bool, **kw):
    saved = logprobs.uses_packing
    logprobs.uses_packing = lambda *a, **k: packed
    try:
        return completion_outputs(model, PROMPTS, comp, mask, 0, **kw)
    finally:
        logprobs.uses_packing = saved


def test_pack_rows_hand_worked_layout():
    comp = torch.tensor([[20, 21, 0], [30, 0, 0], [40, 41, 42]])
    mask = comp != 0
    p = packing.pack_rows([[1, 2, 3], [1, 2, 3], [4, 5]], comp, mask, torch.device("cpu"))
    # each distinct prompt once; then the completions, longest first, each without its last token
    # (it predicts nothing); row 1's only token enters nowhere
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 40, 41, 20]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 3]]  # positions within each row
    # the state before each completion token (row-major): its prompt's last token, then its own previous token
    assert p.predictors.tolist() == [2, 7, 2, 4, 5, 6]
    prompts, completions = p.layout.blocks  # 2 completion rows: one block
    assert prompts.queries.tolist() == prompts.keys.tolist() == [[0, 1, 2], [3, 4, 0]]
    assert prompts.mask[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 0]]  # causal, the pad key never seen
    assert completions.queries.tolist() == [[5, 6], [7, 0]] and completions.real.tolist() == [[True, True], [True, False]]
    assert completions.keys.tolist() == [[3, 4, 0, 5, 6], [0, 1, 2, 7, 0]]
    # row 2 (prompt of 2 tokens): query t sees its prompt's 2 real slots and its completion up to t
    assert completions.mask[0, 0].int().tolist() == [[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    assert completions.mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_rows_of_one_token_enter_only_through_their_prompt():
    comp = torch.tensor([[20, 0], [30, 0]])
    p = packing.pack_rows([[1, 2], [3]], comp, comp != 0, torch.device("cpu"))
    assert p.input_ids.tolist() == [[1, 2, 3]] and p.predictors.tolist() == [1, 2] and len(p.layout.blocks) == 1


def test_rows_of_similar_length_share_an_attention_block():
    lengths = torch.tensor([3, 40, 7, 40, 12] * 8)
    mask = torch.arange(40) < lengths[:, None]
    p = packing.pack_rows([[1, 2]] * 40, torch.where(mask, 9, 0), mask, torch.device("cpu"))
    widths = [b.queries.shape for b in p.layout.blocks[1:]]
    assert widths == [(16, 39), (16, 11), (8, 2)]  # 40 rows in blocks of 16, each as wide as its longest row
    assert p.input_ids.shape[1] == 2 + int((lengths - 1).sum())


def test_packed_logprobs_equal_each_row_alone(tiny):
    comp, mask = _rows()
    assert uses_packing(tiny, PROMPTS, mask)
    with torch.no_grad():
        out = completion_outputs(tiny, PROMPTS, comp, mask, 0, temperature=0.7, with_entropy=True)
        for i, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS)):
            ids = torch.tensor([prompt + comp[i, :n].tolist()])
            logits = tiny(input_ids=ids).logits[0, len(prompt) - 1: -1].double() / 0.7
            ref = logits.log_softmax(-1)
            torch.testing.assert_close(out.logp[i, :n].double(), ref.gather(1, comp[i, :n, None])[:, 0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out.entropy[i, :n].double(), -(ref.exp() * ref).sum(-1), atol=2e-5, rtol=1e-5)
            assert not out.logp[i, n:].any()


def test_packed_gradients_equal_the_padded_layout(tiny):
    comp, mask = _rows()
    grads = {}
    for packed in (True, False):
        tiny.zero_grad(set_to_none=True)
        out = _forward(tiny, comp, mask, packed, with_entropy=True, with_hidden=True)
        w = torch.linspace(-1, 1, out.hidden.numel()).view_as(out.hidden)
        (out.logp.sum() + 0.3 * out.entropy.sum() + (out.hidden * w).sum()).backward()
        grads[packed] = ({n: p.grad.clone() for n, p in tiny.named_parameters()}, out)
    (g_packed, o_packed), (g_padded, o_padded) = grads[True], grads[False]
    torch.testing.assert_close(o_packed.hidden, o_padded.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_packed.logp, o_padded.logp, atol=1e-5, rtol=1e-5)
    for n, g in g_padded.items():
        torch.testing.assert_close(g_packed[n], g, atol=1e-5 * float(g.abs().max()), rtol=1e-4, msg=n)


def test_rows_that_cannot_pack_take_the_padded_layout(tiny):
    comp, mask = _rows()
    holed = mask.clone()
    holed[0, 1] = False  # a completion mask with a hole
    assert not uses_packing(tiny, PROMPTS, holed)
    assert not uses_packing(tiny, [[], *PROMPTS[1:]], mask)  # an empty prompt
    saved = tiny.config._attn_implementation
    try:
        tiny.config._attn_implementation = "flash_attention_2"  # keeps its own kernel
        assert not uses_packing(tiny, PROMPTS, mask)
    finally:
        tiny.config._attn_implementation = saved
    assert uses_packing(tiny, PROMPTS, mask)


def test_activation_checkpointing_packs_only_inside_the_scope(tiny):
    """The backward recomputes each layer and looks its attention up again: a packed forward with
    gradients under checkpointing needs the switch held over the backward (`packing_scope`)."""
    comp, mask = _rows()
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    _forward(tiny, comp, mask, True).logp.sum().backward()
    plain = {n: p.grad.clone() for n, p in tiny.named_parameters()}
    enable_activation_checkpointing(tiny)  # the trainer's own switch (model.gradient_checkpointing)
    try:
        assert not uses_packing(tiny, PROMPTS, mask)  # a backward outside the scope would not find it
        with torch.no_grad():
            assert uses_packing(tiny, PROMPTS, mask)  # nothing to recompute
        calls = []
        real = packing.grouped_prefix_attention
        packing.AttentionInterface.register(packing.GROUPED_PREFIX, lambda *a, **k: calls.append(k.get("grouped_layout")) or real(*a, **k))
        tiny.zero_grad(set_to_none=True)
        with packing_scope(tiny):
            assert uses_packing(tiny, PROMPTS, mask)
            completion_outputs(tiny, PROMPTS, comp, mask, 0).logp.sum().backward()
        assert tiny.config._attn_implementation == "sdpa"
        # 2 layers in the forward, 2 again in the backward's recomputation, each with the layout
        assert len(calls) == 4 and all(c is not None for c in calls)
        for n, g in plain.items():
            torch.testing.assert_close(tiny.get_parameter(n).grad, g, atol=1e-6, rtol=1e-5, msg=n)
    finally:
        packing.AttentionInterface.register(packing.GROUPED_PREFIX, packing.grouped_prefix_attention)
        (getattr(tiny, "activation_checkpointing_disable", None) or tiny.gradient_checkpointing_disable)()
        tiny.eval()


def test_an_unpacked_forward_under_the_switch_is_plain_sdpa(tiny):
    comp, mask = _rows()
    with torch.no_grad():
        ref = _forward(tiny, comp, mask, False).logp
        with packing_scope(tiny):
            assert tiny.config._attn_implementation == packing.GROUPED_PREFIX
            under = _forward(tiny, comp, mask, False).logp
    torch.testing.assert_close(under, ref, atol=1e-6, rtol=1e-6)


def test_the_policy_update_runs_packed():
    """Dispatch on the trainer's path: the update's forwards attend through the packed layout, and
    the step's gradient is the padded layout's (float rounding)."""
    cfg = compose_config(["experiment=demo", *TINY_RUN, "algo.loss_type=dapo", "algo.entropy_coef=0.01"])
    torch.manual_seed(0)
    engine = build_engine(cfg)
    model, tok = load_model_and_tokenizer(cfg.model)
    engine.wrap(model)
    engine.setup_optimizer(cfg.grpo)
    prompts = [tok(f"<|bos|>Q: {a}*3\nA: ", add_special_tokens=False)["input_ids"] for a in (4, 56)]
    batch = grpo.generate_group_rollouts(build_rollout_backend("hf", model, tok), prompts, cfg, seeds=[1, 2])
    token_adv = torch.linspace(-1, 1, len(batch))[:, None] * batch.loss_mask.float()
    layouts, grads = [], {}
    real = packing.grouped_prefix_attention
    packing.AttentionInterface.register(packing.GROUPED_PREFIX, lambda *a, **k: layouts.append(k.get("grouped_layout")) or real(*a, **k))
    real_step, saved = engine.step, logprobs.uses_packing

    def record_and_drop(packed):  # the accumulated gradient at the optimizer step, then no step
        def step(_loss, _step):
            grads[packed] = [p.grad.clone() for p in model.parameters()]
            engine.optimizer.zero_grad(set_to_none=True)
            return True, 0.0
        return step

    try:
        for packed in (True, False):
            logprobs.uses_packing = saved if packed else (lambda *a, **k: False)
            engine.step = record_and_drop(packed)
            grpo.policy_update(engine, batch, token_adv, tok.pad_token_id, cfg, 0)
            if packed:
                assert layouts and all(lay is not None and lay.calls for lay in layouts)
                assert {lay.blocks[0].queries.shape[0] for lay in layouts} == {2}  # 8 rows, their 2 prompts once each
    finally:
        packing.AttentionInterface.register(packing.GROUPED_PREFIX, real)
        engine.step, logprobs.uses_packing = real_step, saved
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)
