"""One GRPO-family step, split into the phases of DESIGN.md's data flow.

rollout -> grade -> reward heads -> group advantages routed to token regions -> clipped policy
update. The trainer calls these in order and times each phase; nothing here owns a loop over steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.algo.advantages import group_centered, meta_weight, reward_metrics, route_advantages, zero_std_stats
from selfdistill.algo.logprobs import completion_logprobs
from selfdistill.algo.update import LossTerm, row_chunks, run_update
from selfdistill.config import Config
from selfdistill.rewards.regions import meta_regions
from selfdistill.rollout.base import MetaMode, RolloutBatch, rollout_seed


def meta_modes_for_group(cfg: Config) -> list[MetaMode]:
    """The n meta modes of one group: all `allow`, or n/2 `allow` then n/2 without (cf, asym_cf)."""
    n = cfg.rollout.n
    if not cfg.rollout.split_arms:
        return [MetaMode.ALLOW] * n
    without = MetaMode.PLACEBO if cfg.rollout.without_mode == "placebo" else MetaMode.BAN
    return [MetaMode.ALLOW] * (n // 2) + [without] * (n - n // 2)


def generate_group_rollouts(backend, prompts: list[list[int]], cfg: Config, seeds: list[int] | None = None) -> RolloutBatch:
    """n rollouts per prompt; `seeds` (one per prompt) seeds rollout j of prompt i with (seeds[i], j).
    The n rows of a prompt are contiguous, so the backend prefills their shared prompt once."""
    n, r = cfg.rollout.n, cfg.rollout
    modes = meta_modes_for_group(cfg) * len(prompts)
    batch = backend.generate(
        [p for p in prompts for _ in range(n)], modes, max_new_tokens=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p,
        seeds=[rollout_seed(s, j) for s in seeds for j in range(n)] if seeds is not None else None,
        max_rows_per_call=r.max_rows_per_call, compile=r.compile,
    )
    batch.group_ids = torch.arange(len(prompts)).repeat_interleave(n)
    return batch


@dataclass
class Advantages:
    tokens: Tensor  # [R, T] routed per-token advantages
    keep: Tensor  # [R] bool: rows kept after zero-std filtering
    metrics: dict[str, float]


def assemble_advantages(batch: RolloutBatch, heads: dict[str, Tensor], meta_route: str | None, meta_ids: tuple[int, int],
                        cfg: Config, steps_applied: int) -> Advantages:
    """Centre each head on its group (SPEC section 4), weight the meta head, route to token regions."""
    g = batch.group_ids
    adv_correct, _ = group_centered(heads["correctness"], g)
    w = meta_weight(steps_applied, cfg.reward.meta_weight, cfg.reward.meta_warmup_steps)
    meta_heads = [k for k in heads if k != "correctness"]
    meta_adv = group_centered(heads[meta_heads[0]], g)[0] if meta_heads else None
    regions = meta_regions(batch.completion_ids, batch.lengths, *meta_ids)
    tokens = route_advantages(adv_correct, meta_adv, meta_route, meta_mask=regions.meta, answer_mask=regions.answer,
                              valid_mask=regions.valid, with_arm=batch.with_arm, meta_w=w if meta_adv is not None else None)
    keep = zero_std_stats(heads, g).keep if cfg.algo.filter_zero_std else torch.ones(len(batch), dtype=torch.bool)
    metrics = {**reward_metrics(heads, g), "reward/meta_weight": w}
    return Advantages(tokens=tokens, keep=keep, metrics=metrics)


def select_rows(batch: RolloutBatch, adv: Tensor, keep: Tensor) -> tuple[RolloutBatch, Tensor]:
    idx = keep.nonzero(as_tuple=True)[0]
    sub = RolloutBatch(
        prompt_ids=[batch.prompt_ids[i] for i in idx.tolist()],
        completion_ids=batch.completion_ids[idx], completion_mask=batch.completion_mask[idx],
        forced_mask=batch.forced_mask[idx], group_ids=batch.group_ids[idx], with_arm=batch.with_arm[idx],
        texts=[batch.texts[i] for i in idx.tolist()],
    )
    return sub, adv[idx]


@torch.no_grad()
def reference_logprobs(ref_model, batch: RolloutBatch, pad_id: int, temperature: float,
                       micro_batch_size: int | None = None) -> Tensor | None:
    """Per-token log-probs [R, T] of the rollouts under the frozen reference (the KL term), in
    micro-batches of `micro_batch_size` rows; None for no rows. The reference is a plain model on
    every rank (no collectives), so ranks may run different numbers of these forwards."""
    if len(batch) == 0:
        return None
    parts = []
    for rows in row_chunks(len(batch), micro_batch_size):
        r = rows.tolist()
        logp, _ = completion_logprobs(ref_model, [batch.prompt_ids[i] for i in r], batch.completion_ids[rows],
                                      batch.completion_mask[rows], pad_id, temperature)
        parts.append(logp)
    return torch.cat(parts)


def policy_loss_term(cfg: Config, token_adv: Tensor, batch: RolloutBatch, device, ref_logp: Tensor | None = None,
                     coef: float = 1.0) -> LossTerm:
    """The clipped policy loss of SPEC section 5 (progressive weights, section 7) as an update term.
    Its denominator is rows for grpo / gspo / dr_grpo (dr_grpo's constant length cancels) and
    loss-mask tokens for dapo."""
    a = cfg.algo
    token_adv, loss_mask, lengths = token_adv.to(device), batch.loss_mask.to(device), batch.lengths.to(device)
    ref_logp = ref_logp.to(device) if ref_logp is not None else None

    def fn(rows: Tensor, out) -> tuple[Tensor, dict[str, Tensor]]:
        return ops.dispatched_policy_loss(
            out.logp, out.old_logp, token_adv[rows], loss_mask[rows], lengths[rows],
            ref_logp=ref_logp[rows] if ref_logp is not None else None, entropy=out.entropy,
            loss_type=a.loss_type, clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip,
            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
            token_weighting=a.token_weighting, max_len_norm=a.max_len_norm or cfg.rollout.max_new_tokens,
        )

    return LossTerm("policy", coef, per_token=a.loss_type == "dapo", fn=fn)


def policy_update(engine, batch: RolloutBatch, token_adv: Tensor, pad_id: int, cfg: Config, step: int,
                  ref_logp: Tensor | None = None, filler: RolloutBatch | None = None, *,
                  extra_terms: tuple[LossTerm, ...] = (), policy_coef: float = 1.0,
                  micro_batch_size: int | None = None, on_applied_step=None) -> tuple[int, dict[str, float]]:
    """PPO-style epochs x minibatches of the clipped loss (plus `extra_terms`, e.g. a distillation
    loss), each minibatch in micro-batches of `micro_batch_size` rows (default `grpo.micro_batch_size`).
    Returns (optimizer steps applied, metrics). `ref_logp`: the reference's per-token log-probs of
    these rows (`reference_logprobs`) for the KL term. `on_applied_step`: called after each applied
    optimizer step (SDPO's EMA teacher). Loss weighting across micro-batches and ranks:
    `selfdistill.algo.update`."""
    terms = [policy_loss_term(cfg, token_adv, batch, engine.device, ref_logp, policy_coef), *extra_terms]
    return run_update(engine, batch, terms, pad_id=pad_id, temperature=cfg.rollout.temperature,
                      ppo_epochs=cfg.algo.ppo_epochs, num_minibatches=cfg.algo.num_minibatches,
                      micro_batch_size=micro_batch_size if micro_batch_size is not None else cfg.grpo.micro_batch_size,
                      step=step, filler=filler, on_applied_step=on_applied_step)
