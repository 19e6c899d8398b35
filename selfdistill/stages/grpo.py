"""GRPO-family RL stage (SPEC sections 2-5): one loop of

    prompts -> n rollouts each -> grade -> reward heads (scorer passes) -> group advantages routed
    to token regions -> clipped policy update (epochs x minibatches x micro-batches) -> metrics

`collect_rollouts` (everything up to the advantages) and `update_policy` are the phases SDPO reuses
with its distillation term added to the update; the loop below only strings them together.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfdistill.algo import grpo
from selfdistill.algo.grpo import Advantages
from selfdistill.algo.update import LossTerm
from selfdistill.data import encode_prompt
from selfdistill.data.sampler import rank_slice
from selfdistill.rewards.regions import rollout_outside_meta_texts
from selfdistill.rewards.registry import get_reward
from selfdistill.rewards.scoring import compute_reward_heads
from selfdistill.rollout.base import RolloutBatch, rollout_seed
from selfdistill.stages.context import StageContext

SUMMED_METRICS = ("scorer/sequences", "scorer/tokens")  # per-step counts in the record (grader/* are summed too)
TOKEN_MEAN_METRICS = ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "ratio_mean")


@dataclass
class Rollouts:
    """One step's rollouts with everything computed from them before the update."""

    examples: list  # one per prompt (group), this rank's share of the global batch
    batch: RolloutBatch
    grades: Tensor  # [R] 1 correct / 0 wrong / -1 grader failure
    heads: dict[str, Tensor]  # head -> raw values [R] (NaN = non-member)
    advantages: Advantages
    reward_metrics: dict[str, float]
    times: dict[str, float] = field(default_factory=dict)  # phase -> seconds


def run(ctx: StageContext) -> None:
    cfg, c = ctx.cfg, ctx.cfg.grpo
    ctx.setup_optimizer(c, cfg.algo.ppo_epochs * cfg.algo.num_minibatches)
    if needs_reference(cfg):
        ctx.pin_reference()
    bar = ctx.progress(c.steps, f"grpo[{cfg.reward.name}]")
    while ctx.state.step < c.steps:
        t0 = time.perf_counter()
        ro = collect_rollouts(ctx, c.batch_size)
        t = time.perf_counter()
        applied, upd = update_policy(ctx, ro)
        ctx.state.meta_steps += applied
        ro.times["update"] = time.perf_counter() - t
        ctx.after_step(step_record(ctx, ro, upd, t0), bar, "grpo")
    bar.close()


def needs_reference(cfg) -> bool:
    """A frozen reference is needed for the KL term or for an arm whose scorer is not the policy."""
    return cfg.algo.kl_coef > 0 or (arm_scores(cfg) and not cfg.reward.use_policy_as_scorer)


def arm_scores(cfg) -> bool:
    """The reward arm runs scorer passes (PMI, gm, belief open/close)."""
    return get_reward(cfg.reward.name).needs_scorer


def scorer(ctx: StageContext):
    """(context, scorer model) for the reward's scorer passes: the policy on full parameters
    (`reward.use_policy_as_scorer`), the gathered reference, or no scorer."""
    if not arm_scores(ctx.cfg):
        return contextlib.nullcontext(None)
    if ctx.cfg.reward.use_policy_as_scorer:
        return ctx.policy_for_generation()
    return ctx.reference().gathered()


def collect_rollouts(ctx: StageContext, num_prompts: int) -> Rollouts:
    """Sample this step's prompts, generate n rollouts each, grade, score the reward heads and
    assemble the routed advantages (SPEC sections 2-4)."""
    cfg, engine = ctx.cfg, ctx.engine
    times, t = {}, time.perf_counter()
    idx = rank_slice(ctx.sampler.next_batch(num_prompts), engine.rank, engine.world_size)
    exs = [ctx.train_set[i] for i in idx]
    prompts = [encode_prompt(ctx.tokenizer, ex, cfg.data) for ex in exs]
    # Rollouts are seeded per prompt (seed, step, position in the global batch), not by the rank's
    # RNG: the same samples for any world size, and after a resume.
    first = engine.rank * len(idx)
    seeds = [rollout_seed(cfg.seed, ctx.state.global_step, first + i) for i in range(len(idx))]
    with engine.generation_context():
        batch = grpo.generate_group_rollouts(ctx.backend, prompts, cfg, seeds)
    times["rollout"] = time.perf_counter() - t
    t = time.perf_counter()
    golds = [ex.gold for ex in exs for _ in range(cfg.rollout.n)]
    grades = torch.tensor(ctx.grader.grade(rollout_outside_meta_texts(batch, ctx.tokenizer, ctx.meta_ids), golds))
    times["grade"] = time.perf_counter() - t
    t = time.perf_counter()
    with scorer(ctx) as model:
        heads, meta_route, reward_metrics = compute_reward_heads(cfg.reward, batch, grades, exs, model, ctx.tokenizer, ctx.meta_ids)
    adv = grpo.assemble_advantages(batch, heads, meta_route, ctx.meta_ids, cfg, ctx.state.meta_steps)
    times["score"] = time.perf_counter() - t
    return Rollouts(exs, batch, grades, heads, adv, reward_metrics, times)


def update_policy(ctx: StageContext, ro: Rollouts, extra_terms: tuple[LossTerm, ...] = (),
                  policy_coef: float = 1.0, on_applied_step=None) -> tuple[int, dict[str, float]]:
    """The clipped policy update on the rows zero-std filtering keeps (plus `extra_terms`, whose rows
    are those kept rows in order: `ro.advantages.keep`), in micro-batches of the running stage's
    `micro_batch_size`. Returns (optimizer steps applied, metrics); (0, {}) when no rank has a row left."""
    cfg, engine = ctx.cfg, ctx.engine
    pad = ctx.tokenizer.pad_token_id
    micro = getattr(cfg, ctx.stage).micro_batch_size  # grpo's, or sdpo's when SDPO runs this update
    sub, token_adv = grpo.select_rows(ro.batch, ro.advantages.tokens, ro.advantages.keep)
    if not engine.reduce_sum({"rows": len(sub)})["rows"]:  # every rank decides alike
        return 0, {}
    ref_logp = None
    if cfg.algo.kl_coef > 0:
        with ctx.reference().gathered() as ref:
            ref_logp = grpo.reference_logprobs(ref, sub, pad, cfg.rollout.temperature, micro)
    filler = None if len(sub) else grpo.select_rows(ro.batch, ro.advantages.tokens, torch.arange(len(ro.batch)) == 0)[0]
    return grpo.policy_update(engine, sub, token_adv, pad, cfg, ctx.state.meta_steps, ref_logp, filler,
                              extra_terms=extra_terms, policy_coef=policy_coef, micro_batch_size=micro,
                              on_applied_step=on_applied_step)


def step_record(ctx: StageContext, ro: Rollouts, upd: dict[str, float], t0: float) -> dict:
    """The step's metrics (TRL's names where they exist): counts summed over ranks, the update's token
    means weighted by each rank's loss tokens, everything else the mean of the ranks' values."""
    engine, batch = ctx.engine, ro.batch
    correct = (ro.grades == 1).float()
    r = ro.heads["correctness"].view(-1, ctx.cfg.rollout.n)
    lengths = batch.lengths.float()
    record = {
        "reward": float(r.mean()), "reward_std": float(r.std(1).mean()), "accuracy": float(correct.mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/clipped_ratio": float(batch.truncated.float().mean()) if batch.truncated is not None else 0.0,
        **upd, **ro.advantages.metrics, **ro.reward_metrics,
    }
    # Token means of the update (entropy, kl, clip ratios) are weighted by each rank's loss tokens,
    # so N ranks report the token mean one process would (ranks hold different token counts).
    loss_tokens = int(batch.loss_mask[ro.advantages.keep].sum())
    weighted = {f"{k}@tokens": record.pop(k) * loss_tokens for k in TOKEN_MEAN_METRICS if k in record}
    counts = engine.reduce_sum({"ntok": int(batch.completion_mask.sum()), "loss_tokens": loss_tokens, **weighted,
                                **ctx.grader.metrics(), **{k: record.pop(k) for k in SUMMED_METRICS if k in record}})
    ntok = int(counts.pop("ntok"))  # the global batch's completion tokens
    total_loss_tokens = counts.pop("loss_tokens")
    token_means = {k: counts.pop(f"{k}@tokens") / total_loss_tokens for k in TOKEN_MEAN_METRICS
                   if f"{k}@tokens" in counts and total_loss_tokens}
    ctx.state.num_tokens += ntok
    dt = time.perf_counter() - t0
    record = {**engine.reduce_mean(record), **token_means, **counts}
    record.update({"perf/step_s": dt, "perf/tokens_per_s": ntok / dt, "num_tokens": ctx.state.num_tokens,
                   "lr": engine.scheduler.get_last_lr()[0], "train/skipped_steps": engine.skipped_steps,
                   **{f"perf/{k}_s": v for k, v in ro.times.items()}})
    return record
