"""Fail-closed numerics: a non-finite loss or gradient never reaches an optimizer step, and a NaN
reward in one rollout never touches its siblings' advantages (SPEC sections 2 and 4)."""

from __future__ import annotations

import math

import pytest
import torch

from selfdistill.algo import grpo
from selfdistill.engine import NonFiniteError, build_engine
from selfdistill.models import load_model_and_tokenizer, meta_token_ids
from selfdistill.rollout import RolloutBatch
from tests.conftest import TINY_RUN, compose_config


def _engine(policy):
    cfg = compose_config(["experiment=demo", *TINY_RUN, f"trainer.on_nonfinite={policy}", "grpo.warmup_steps=0"])
    engine = build_engine(cfg)
    model, tok = load_model_and_tokenizer(cfg.model)
    engine.wrap(model)
    engine.setup_optimizer(cfg.grpo)
    return cfg, engine, model, tok


def _poison_one_gradient(model):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    name, param = next((n, p) for n, p in model.named_parameters() if "layers.0.mlp.up_proj" in n)
    param.grad[0, 0] = float("nan")
    return name


def test_nonfinite_gradient_raises_naming_step_rank_and_tensor():
    _, engine, model, _ = _engine("raise")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = _poison_one_gradient(model)
    with pytest.raises(NonFiniteError) as e:
        engine.step(0.5, step=7)
    msg = str(e.value)
    assert "step 7" in msg and "rank 0" in msg and name in msg and "on_nonfinite=skip" in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_loss_skip_is_counted_and_changes_nothing():
    _, engine, model, _ = _engine("skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    applied, _ = engine.step(float("inf"), step=0)
    assert applied is False and engine.skipped_steps == 1
    assert engine.optimizer.state_dict()["state"] == {}  # Adam moments untouched
    assert engine.scheduler.last_epoch == 0  # schedule not advanced
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the next finite step applies normally
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    assert engine.step(0.5, step=1)[0] is True


def test_planted_nan_reward_leaves_siblings_alone_and_weights_finite():
    cfg, engine, model, tok = _engine("raise")
    open_id, close_id = meta_token_ids(tok)
    prompt = tok("<|bos|>Q: 1+2\nA: ", add_special_tokens=False)["input_ids"]
    text = tok("1+2=3 <|meta|>check<|/meta|> \\boxed{3}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    R, T = 8, len(text)
    ids = torch.tensor([text] * R)
    mask = torch.ones(R, T, dtype=torch.bool)
    batch = RolloutBatch(prompt_ids=[prompt] * R, completion_ids=ids, completion_mask=mask,
                         forced_mask=torch.zeros(R, T, dtype=torch.bool), group_ids=torch.arange(2).repeat_interleave(4),
                         with_arm=torch.ones(R, dtype=torch.bool), texts=[""] * R)
    correctness = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
    meta = torch.tensor([float("nan"), 2.0, 0.5, -1.0, 0.0, 1.0, float("inf"), 3.0])
    adv = grpo.assemble_advantages(batch, {"correctness": correctness, "pmi_shift": meta}, "meta", (open_id, close_id), cfg, steps_applied=80)
    # hand-worked centring: correctness group means 0 and 0.5; meta members {2, 0.5, -1} (mean 0.5)
    # and {0, 1, 3} (mean 4/3); the NaN and inf rollouts are non-members with 0; weight w(80) = 0.8
    exp_corr = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.5, 0.5, 0.5, -1.5])
    exp_meta = 0.8 * torch.tensor([0.0, 1.5, 0.0, -1.5, -4 / 3, -1 / 3, 0.0, 5 / 3])
    meta_pos = torch.zeros(T, dtype=torch.bool)
    start, end = text.index(open_id), text.index(close_id)
    meta_pos[start:end + 1] = True
    for i in range(R):
        assert torch.allclose(adv.tokens[i][~meta_pos], exp_corr[i].expand(int((~meta_pos).sum())))
        assert torch.allclose(adv.tokens[i][meta_pos], exp_meta[i].expand(int(meta_pos.sum())))
    applied, stats = grpo.policy_update(engine, batch, adv.tokens, tok.pad_token_id, cfg, step=0)
    assert applied == 1 and math.isfinite(stats["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_empty_groups_and_empty_completions_stay_finite():
    """A group whose rollouts are all empty (no completion token) or all unscored gives 0 advantage
    and no loss; its presence does not change the update of the other groups; a batch where zero-std
    filtering keeps nothing applies no step."""
    cfg, engine, model, tok = _engine("raise")
    prompt = tok("<|bos|>Q: 1+2\nA: ", add_special_tokens=False)["input_ids"]
    text = tok("1+2=3 \\boxed{3}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    R, T = 8, len(text)
    ids = torch.tensor([text] * R)
    mask = torch.ones(R, T, dtype=torch.bool)
    mask[4:] = False  # group 1: four empty completions (nothing generated, not even EOS)
    ids[4:] = tok.pad_token_id
    batch = RolloutBatch(prompt_ids=[prompt] * R, completion_ids=ids, completion_mask=mask,
                         forced_mask=torch.zeros(R, T, dtype=torch.bool), group_ids=torch.arange(2).repeat_interleave(4),
                         with_arm=torch.ones(R, dtype=torch.bool), texts=[""] * R)
    correctness = torch.tensor([1.0, -1.0, -1.0, 1.0] + [float("nan")] * 4)  # group 1: nothing scorable
    adv = grpo.assemble_advantages(batch, {"correctness": correctness}, None, meta_token_ids(tok), cfg, steps_applied=0)
    assert torch.isfinite(adv.tokens).all() and not adv.tokens[4:].any()

    # The same update as the non-empty group alone: grpo averages over sequences, so the empty
    # rows only rescale the loss by 4/8, and the global gradient norm by the same factor.
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied, stats = grpo.policy_update(engine, batch, adv.tokens, tok.pad_token_id, cfg, step=0)
    assert applied == 1 and math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    cfg2, engine2, model2, _ = _engine("raise")
    model2.load_state_dict(before)
    sub, sub_adv = grpo.select_rows(batch, adv.tokens, torch.arange(R) < 4)
    _, stats2 = grpo.policy_update(engine2, sub, sub_adv, tok.pad_token_id, cfg2, step=0)
    assert stats["grad_norm"] == pytest.approx(stats2["grad_norm"] / 2, rel=1e-5)

    # zero-std filtering of a batch whose groups are all constant keeps no row: no step, no error
    cfg.algo.filter_zero_std = True
    flat = grpo.assemble_advantages(batch, {"correctness": torch.tensor([1.0] * 4 + [float("nan")] * 4)}, None,
                                    meta_token_ids(tok), cfg, steps_applied=0)
    assert not flat.keep.any()
    empty, empty_adv = grpo.select_rows(batch, flat.tokens, flat.keep)
    filler = grpo.select_rows(batch, flat.tokens, torch.arange(R) == 0)[0]
    assert grpo.policy_update(engine, empty, empty_adv, tok.pad_token_id, cfg, step=1, filler=filler) == (0, {})
