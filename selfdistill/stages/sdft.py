"""SDFT stage (SPEC sections 6-7): the student learns what the self-teacher does with a demonstration.

    batch of rows (the first `sdft.train_pairs` of the train split, in curriculum order: selfdistill.data.sampler)
    -> teacher prompts from their demonstrations
    offline: the frozen teacher's sampled completions (generated once per row) -> the student, on the
             plain prompt, by token cross-entropy with progressive token weights
    online:  the student samples from the plain prompt -> the teacher scores its tokens -> distillation
             loss of `algo.distill.loss`
    -> one optimizer step -> every `sdft.eval_every` steps and at the last: score = 1 / (1 + eval token loss)

Each stage step is one optimizer step (the seed's budget counts steps: 30), so `algo.ppo_epochs` and
`algo.num_minibatches` do not apply here. The frozen teacher is the stage's pinned reference (its
starting weights); with `algo.distill.teacher=ema|live` (online only) a second teacher scores, and the
frozen one still writes the eval completions, so scores stay comparable across teachers.
Metrics: `loss`, `loss/cross_entropy` or `loss/distill` (+ `self_distillation/teacher_student_kl`),
`entropy`, `grad_norm`, `lr`, `num_tokens`, and at each eval `sdft/eval_token_loss`, `sdft/score`.
"""

from __future__ import annotations

import time

from selfdistill.algo import sdft
from selfdistill.algo.distill import cross_entropy_term, distill_term
from selfdistill.algo.teacher import SelfTeacher, teacher_outputs
from selfdistill.algo.teacher_context import teacher_prompt_ids, text_ids
from selfdistill.algo.update import run_update
from selfdistill.data import encode_prompt
from selfdistill.data.sampler import rank_slice
from selfdistill.rollout import build_rollout_backend
from selfdistill.rollout.base import MetaMode, rollout_seed
from selfdistill.stages.context import StageContext


def run(ctx: StageContext) -> None:
    cfg, c, d = ctx.cfg, ctx.cfg.sdft, ctx.cfg.algo.distill
    engine, tok = ctx.engine, ctx.tokenizer
    pairs = ctx.train_set[: c.train_pairs] if c.train_pairs else ctx.train_set
    demos = sdft.demonstrations(pairs, "the training split")
    held_out = ctx.held_out[: c.eval_prompts]
    if len(held_out) < engine.world_size:
        raise ValueError(f"SDFT's score needs held-out rows with demonstrations (at least one per rank, {engine.world_size}); "
                         f"the held-out split has {len(ctx.held_out)}: set data.eval_path (data=files) or data.synthetic.num_eval")
    held_out_demos = sdft.demonstrations(held_out, "the held-out split")
    order = sdft.sampler_order(c.curriculum, c.batching)
    keys = [len(text_ids(tok, x)) for x in demos] if order != "shuffled" else None
    ctx.sampler.set_order(order, keys, restart=ctx.state.step == 0, limit=len(pairs) if c.train_pairs else None)
    ctx.setup_optimizer(c)
    ctx.pin_reference()  # the frozen teacher: offline samples and the eval completions
    teacher = ctx.build_teacher(d.teacher)
    frozen = SelfTeacher("frozen", weights=ctx.reference())
    samples = sdft.TeacherSamples(cfg.seed)
    eval_set = None
    bar = ctx.progress(c.steps, f"sdft[{cfg.algo.sdft.mode}]")
    while ctx.state.step < c.steps:
        t0 = time.perf_counter()
        idx = rank_slice(ctx.sampler.next_batch(c.batch_size), engine.rank, engine.world_size)
        exs = [ctx.train_set[i] for i in idx]
        prompts = [encode_prompt(tok, ex, cfg.data) for ex in exs]
        teacher_prompts = [_teacher_prompt(ctx, ex, demos[i]) for i, ex in zip(idx, exs)]
        if cfg.algo.sdft.mode == "offline":
            with frozen.scoring_model() as model:  # every rank enters (a sharded copy is gathered)
                missing = samples.missing(idx)
                if missing:
                    where = {r: k for k, r in enumerate(idx)}
                    samples.add(missing, sdft.generate(build_rollout_backend(cfg.rollout.backend, model, tok),
                                                       [teacher_prompts[where[r]] for r in missing],
                                                       max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                                       top_p=cfg.rollout.top_p, seeds=samples.seeds(missing)))
            batch = sdft.completion_batch(prompts, samples.get(idx), tok.pad_token_id)
            temperature, term = 1.0, cross_entropy_term(batch, engine.device, cfg.algo.token_weighting)
        else:
            first = engine.rank * len(idx)
            seeds = [rollout_seed(cfg.seed, ctx.state.global_step, first + k) for k in range(len(idx))]
            with engine.generation_context():
                batch = ctx.backend.generate(prompts, [MetaMode.ALLOW] * len(prompts), max_new_tokens=cfg.rollout.max_new_tokens,
                                             temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seeds=seeds)
            temperature = cfg.rollout.temperature
            with teacher.scoring_model() as model:
                tout = teacher_outputs(teacher, model, teacher_prompts, batch, tok.pad_token_id, temperature,
                                       c.micro_batch_size, with_hidden=d.loss == "topk", engine=engine)
            term = distill_term(d, tout, batch, engine.device, coef=1.0, temperature=temperature,
                                token_weighting=cfg.algo.token_weighting, report_entropy=True)
        _, upd = run_update(engine, batch, [term], pad_id=tok.pad_token_id, temperature=temperature, ppo_epochs=1,
                            num_minibatches=1, micro_batch_size=c.micro_batch_size, step=ctx.state.step,
                            on_applied_step=teacher.after_optimizer_step)
        ntok = int(engine.reduce_sum({"ntok": int(batch.loss_mask.sum())})["ntok"])
        ctx.state.num_tokens += ntok
        record = engine.reduce_mean({**upd, "completions/mean_length": float(batch.lengths.float().mean())})
        done = ctx.state.step + 1
        if done == c.steps or (c.eval_every and done % c.eval_every == 0):
            eval_set = eval_set or _eval_completions(ctx, frozen, held_out, held_out_demos)
            loss = _eval_token_loss(ctx, *eval_set)
            record.update({"sdft/eval_token_loss": loss, "sdft/score": sdft.score(loss)})
        dt = time.perf_counter() - t0
        record.update({"lr": engine.scheduler.get_last_lr()[0], "num_tokens": ctx.state.num_tokens,
                       "perf/step_s": dt, "perf/tokens_per_s": ntok / dt, "train/skipped_steps": engine.skipped_steps})
        ctx.after_step(record, bar, "sdft")
    bar.close()


def _teacher_prompt(ctx: StageContext, example, demonstration: str) -> list[int]:
    d = ctx.cfg.algo.distill
    return teacher_prompt_ids(ctx.tokenizer, example, d.template, text_ids(ctx.tokenizer, demonstration),
                              data=ctx.cfg.data, max_tokens=d.max_teacher_prompt_tokens)


def _eval_completions(ctx: StageContext, frozen: SelfTeacher, rows, demos) -> tuple[list, list]:
    """(student prompts, the frozen teacher's greedy completions) of this rank's share of the
    held-out rows (cut to a multiple of the world size): generated once per stage run."""
    engine, tok = ctx.engine, ctx.tokenizer
    keep = len(rows) - len(rows) % engine.world_size
    mine = rank_slice(list(zip(rows[:keep], demos[:keep])), engine.rank, engine.world_size)
    prompts = [encode_prompt(tok, ex, ctx.cfg.data) for ex, _ in mine]
    with frozen.scoring_model() as model:
        completions = sdft.generate(build_rollout_backend(ctx.cfg.rollout.backend, model, tok),
                                    [_teacher_prompt(ctx, ex, demo) for ex, demo in mine],
                                    max_new_tokens=ctx.cfg.rollout.max_new_tokens, temperature=1.0, top_p=1.0, seeds=None)
    return prompts, completions


def _eval_token_loss(ctx: StageContext, prompts: list, completions: list) -> float:
    """The student's mean token cross-entropy on the held-out teacher completions (all ranks)."""
    with ctx.policy_for_generation() as model:
        nll, ntok = sdft.token_nll(model, prompts, completions, ctx.tokenizer.pad_token_id, ctx.cfg.eval.batch_size)
    totals = ctx.engine.reduce_sum({"nll": nll, "ntok": ntok})
    return totals["nll"] / max(totals["ntok"], 1.0)
