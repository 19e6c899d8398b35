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


def loss_denominator(loss_type: str, loss_mask: Tensor) -> float:
    """What `policy_loss` divides a minibatch's summed token losses by: rows for grpo, gspo and
    dr_grpo (dr_grpo's constant length cancels), loss tokens for dapo."""
    return float((loss_mask != 0).sum()) if loss_type == "dapo" else float(loss_mask.shape[0])


@torch.no_grad()
def reference_logprobs(ref_model, batch: RolloutBatch, pad_id: int, temperature: float) -> Tensor | None:
    """Per-token log-probs [R, T] of the rollouts under the frozen reference (the KL term); None for
    no rows."""
    if len(batch) == 0:
        return None
    logp, _ = completion_logprobs(ref_model, batch.prompt_ids, batch.completion_ids, batch.completion_mask, pad_id, temperature)
    return logp


def policy_update(engine, batch: RolloutBatch, token_adv: Tensor, pad_id: int, cfg: Config, step: int,
                  ref_logp: Tensor | None = None, filler: RolloutBatch | None = None) -> tuple[int, dict[str, float]]:
    """PPO-style epochs x minibatches of the clipped loss. Returns (optimizer steps applied, metrics).
    `ref_logp`: the reference's per-token log-probs of these rows (`reference_logprobs`) for the KL term.

    Under data parallelism every rank takes the same number of optimizer steps and each step's loss
    is the one a single process would compute on the global minibatch: a rank's loss is weighted by
    its share of the global denominator (rows, or tokens for dapo), so ranks holding different
    numbers of rows (zero-std filtering) still average to the global mean. A rank with no rows in a
    minibatch runs a zero-weight pass on one row (of `filler` when it has none of its own) so it still
    joins the collectives.
    """
    a, model, temp = cfg.algo, engine.model, cfg.rollout.temperature
    device = engine.device
    R = len(batch)
    filler = batch if R else filler  # a rank with rows pads its own empty minibatches
    if filler is None:
        raise ValueError("policy_update: this rank has no rows; pass `filler` (one row) so it can join the step")
    old_logp = None
    if R and (a.ppo_epochs > 1 or a.num_minibatches > 1):
        with torch.no_grad():
            old_logp, _ = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.completion_mask, pad_id, temp)
    if ref_logp is not None:
        ref_logp = ref_logp.to(device)
    loss_mask = batch.loss_mask.to(device)
    lengths = batch.lengths.to(device)
    token_adv = token_adv.to(device)
    applied, sums, count = 0, {}, 0
    for _ in range(a.ppo_epochs):
        for rows in torch.arange(R).tensor_split(a.num_minibatches):
            local = loss_denominator(a.loss_type, loss_mask[rows]) if rows.numel() else 0.0
            total = engine.reduce_sum({"d": local})["d"] if engine.world_size > 1 else local
            if total == 0:  # no rows (or, for dapo, no tokens) on any rank: every rank skips alike
                continue
            if rows.numel() == 0:
                _zero_weight_pass(engine, filler, pad_id, temp)
            else:
                r = rows.tolist()
                logp, entropy = completion_logprobs(
                    model, [batch.prompt_ids[i] for i in r], batch.completion_ids[rows], batch.completion_mask[rows], pad_id, temp, with_entropy=True,
                )
                old = old_logp[rows] if old_logp is not None else logp.detach()
                loss, stats = ops.dispatched_policy_loss(
                    logp, old, token_adv[rows], loss_mask[rows], lengths[rows],
                    ref_logp=ref_logp[rows] if ref_logp is not None else None, entropy=entropy,
                    loss_type=a.loss_type, clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip,
                    kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
                    token_weighting=a.token_weighting, max_len_norm=a.max_len_norm or cfg.rollout.max_new_tokens,
                )
                if engine.world_size > 1:  # exactly 1.0 when the ranks' shares are equal
                    loss = loss * (local * engine.world_size / total)
                engine.backward(loss)
                count += 1
                for k, v in {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}}.items():
                    sums[k] = sums.get(k, 0.0) + v
            ok, grad_norm = engine.step(float(loss.detach()) if rows.numel() else 0.0, step + applied)
            applied += int(ok)
            if rows.numel():
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
    return applied, {k: v / max(count, 1) for k, v in sums.items()}


def _zero_weight_pass(engine, filler: RolloutBatch, pad_id: int, temp: float) -> None:
    """Forward and backward one row with weight 0: gradients of zero, but the rank takes part in the
    sharded forward (FSDP2 / ZeRO-3 gathers) and the gradient reduction like its peers."""
    logp, _ = completion_logprobs(engine.model, filler.prompt_ids[:1], filler.completion_ids[:1], filler.completion_mask[:1], pad_id, temp)
    engine.backward(logp.sum() * 0.0)  # logp is 0 off the completion mask
