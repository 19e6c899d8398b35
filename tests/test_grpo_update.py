"""One clipped policy update moves log-probs the way the advantages say (a sign/wiring check of
rollout -> routed advantages -> loss -> engine step, on the tiny model)."""

from __future__ import annotations

import torch

from selfdistill.algo import grpo
from selfdistill.algo.logprobs import completion_logprobs
from selfdistill.engine import build_engine
from selfdistill.models import load_model_and_tokenizer
from selfdistill.rollout import build_rollout_backend
from tests.conftest import TINY_RUN, compose_config


def test_positive_advantage_raises_and_negative_lowers_sequence_logprob():
    cfg = compose_config(["experiment=demo", *TINY_RUN, "grpo.lr=1e-3", "grpo.warmup_steps=0", "algo.entropy_coef=0"])
    torch.manual_seed(0)
    engine = build_engine(cfg)
    model, tok = load_model_and_tokenizer(cfg.model)
    engine.wrap(model)
    engine.setup_optimizer(cfg.grpo)
    backend = build_rollout_backend("hf", model, tok)
    prompt = tok("<|bos|>Q: 1+2\nA: ", add_special_tokens=False)["input_ids"]
    batch = grpo.generate_group_rollouts(backend, [prompt], cfg)
    adv = torch.zeros(len(batch))
    adv[0], adv[1] = 1.0, -1.0
    token_adv = adv[:, None] * batch.loss_mask.float()
    pad = tok.pad_token_id

    def seq_logp():
        with torch.no_grad():
            lp, _ = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.completion_mask, pad, cfg.rollout.temperature)
        return lp.sum(1)

    before = seq_logp()
    applied, stats = grpo.policy_update(engine, batch, token_adv, pad, cfg, step=0)
    after = seq_logp()
    assert applied == 1 and stats["ratio_mean"] == 1.0  # on-policy: ratio exactly 1
    assert after[0] > before[0]
    assert after[1] < before[1]
