"""Micro-batching with gradient accumulation (`<stage>.micro_batch_size`): the accumulated gradient of
a step equals the whole batch's gradient for every loss type (float rounding), and so do its metrics;
SFT likewise. Gradients are captured at the optimizer step, before clipping and Adam."""

from __future__ import annotations

import pytest
import torch

from selfdistill.algo import grpo
from selfdistill.algo.update import row_chunks
from selfdistill.engine import build_engine
from selfdistill.models import load_model_and_tokenizer
from selfdistill.rollout import build_rollout_backend
from selfdistill.stages import sft as sft_stage
from selfdistill.trainer import Trainer
from tests.conftest import TINY_RUN, compose_config


class GradientSpy:
    """Wraps `engine.step`: records the accumulated gradients and the loss value; then applies the
    step (`apply=True`) or drops the gradients."""

    def __init__(self, engine, apply: bool = False):
        self.engine, self.apply, self.grads, self.losses = engine, apply, [], []
        self._step = engine.step
        engine.step = self.step

    def step(self, loss_value, step):
        model = self.engine.unwrapped()
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        self.losses.append(loss_value)
        if self.apply:
            return self._step(loss_value, step)
        self.engine.optimizer.zero_grad(set_to_none=True)
        return True, 0.0


def _setup(extra):
    cfg = compose_config(["experiment=demo", *TINY_RUN, "rollout.max_new_tokens=12", "rollout.n=4", *extra])
    torch.manual_seed(0)
    engine = build_engine(cfg)
    model, tok = load_model_and_tokenizer(cfg.model)
    engine.wrap(model)
    engine.setup_optimizer(cfg.grpo)
    return cfg, engine, model, tok


def _rollouts(cfg, model, tok):
    backend = build_rollout_backend("hf", model, tok)
    prompts = [tok(f"<|bos|>Q: {a}+{a}\nA: ", add_special_tokens=False)["input_ids"] for a in (1, 23)]
    batch = grpo.generate_group_rollouts(backend, prompts, cfg, seeds=[11, 12])
    g = torch.Generator().manual_seed(3)
    token_adv = torch.randn(len(batch), generator=g)[:, None] * batch.loss_mask.float()
    return batch, token_adv


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_micro_batched_gradient_equals_full_batch(loss_type):
    extra = [f"algo.loss_type={loss_type}", "algo.entropy_coef=0.01", "algo.token_weighting=ramp", "algo.dual_clip=3.0"]
    cfg, engine, model, tok = _setup(extra)
    batch, token_adv = _rollouts(cfg, model, tok)
    assert len(set(batch.lengths.tolist())) > 1, "want rows of different lengths"
    ref_logp = grpo.reference_logprobs(model, batch, tok.pad_token_id, cfg.rollout.temperature) - 0.05
    cfg.algo.kl_coef = 0.1
    spy = GradientSpy(engine)
    runs = {}
    for mbs in (None, 3, 1):
        _, stats = grpo.policy_update(engine, batch, token_adv, tok.pad_token_id, cfg, 0, ref_logp, micro_batch_size=mbs)
        runs[mbs] = (spy.grads[-1], stats)
    full_grads, full_stats = runs[None]
    for mbs in (3, 1):
        grads, stats = runs[mbs]
        assert grads.keys() == full_grads.keys()
        for n, g in full_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=f"{loss_type} mbs={mbs} {n}")
        for k, v in full_stats.items():
            assert stats[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (loss_type, mbs, k)


def test_micro_batches_with_two_minibatches_use_the_behaviour_logprobs():
    """num_minibatches=2: the second minibatch's ratio is against the log-probs before the first
    step, whatever the micro-batch size (the behaviour pass is micro-batched too)."""
    cfg, engine, model, tok = _setup(["algo.loss_type=dapo", "algo.num_minibatches=2", "grpo.warmup_steps=0", "grpo.lr=1e-2"])
    batch, token_adv = _rollouts(cfg, model, tok)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    spy = GradientSpy(engine, apply=True)
    results = []
    for mbs in (None, 2):
        model.load_state_dict(init)
        engine.setup_optimizer(cfg.grpo)
        _, stats = grpo.policy_update(engine, batch, token_adv, tok.pad_token_id, cfg, 0, micro_batch_size=mbs)
        results.append((stats, spy.grads[-2:]))
    (s0, g0), (s1, g1) = results
    assert s0["ratio_mean"] != 1.0  # the second minibatch saw a moved policy
    assert s1["ratio_mean"] == pytest.approx(s0["ratio_mean"], rel=1e-5)
    for n, g in g0[0].items():  # the first minibatch's gradient
        torch.testing.assert_close(g1[0][n], g, rtol=1e-3, atol=1e-6, msg=f"minibatch 0 {n}")
    # The second's, after one Adam step at lr 1e-2: Adam divides each gradient by its own RMS, so the
    # float rounding of a near-zero first gradient (other micro-batches, other packing) moves its
    # weight by up to ~lr; compared at the scale of each gradient tensor.
    for n, g in g0[1].items():
        torch.testing.assert_close(g1[1][n], g, rtol=1e-3, atol=1e-3 * float(g.abs().max()), msg=f"minibatch 1 {n}")


def test_row_chunks():
    assert [c.tolist() for c in row_chunks(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [c.tolist() for c in row_chunks(3, None)] == [[0, 1, 2]]
    assert [c.tolist() for c in row_chunks(3, 8)] == [[0, 1, 2]]
    assert row_chunks(0, 2) == []


def test_sft_micro_batched_gradient_equals_full_batch(tmp_path):
    grads = {}
    for mbs in ("null", "3"):
        cfg = compose_config(["experiment=demo", *TINY_RUN, "sft.steps=1", "sft.batch_size=8", f"sft.micro_batch_size={mbs}",
                              "trainer.stages=[sft]"])
        trainer = Trainer(cfg, str(tmp_path / mbs))
        spy = GradientSpy(trainer.ctx.engine)
        sft_stage.run(trainer.ctx)
        grads[mbs] = (spy.grads[0], spy.losses[0])
    (g0, l0), (g1, l1) = grads["null"], grads["3"]
    assert l1 == pytest.approx(l0, rel=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_micro_batch_size_must_be_positive():
    from selfdistill.config import ConfigError

    with pytest.raises(ConfigError, match="grpo.micro_batch_size=0"):
        compose_config(["experiment=demo", "grpo.micro_batch_size=0"])
