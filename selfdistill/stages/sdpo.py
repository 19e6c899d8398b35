"""SDPO stage (SPEC section 6): GRPO's rollouts with a self-teacher that has seen a correct sibling.

    prompts -> n rollouts each -> grade -> reward heads -> advantages      (stages.grpo.collect_rollouts)
    -> teacher contexts: first correct sibling's completion (or the grader's message)
    -> teacher pass: log-probs (top-K: hidden states) of each rollout's own tokens under its teacher prompt
    -> update: L = (1 - w) L_policy + w L_distill                          (stages.grpo.update_policy)
    -> EMA teacher blend after every applied optimizer step (teacher=ema) -> metrics

Everything up to the advantages and the update loop are GRPO's own phases, so SDPO composes with
every reward arm (a meta arm's head still shapes the policy term) and with `rollout=split`. With
`algo.filter_zero_std` the teacher scores, and the distillation term covers, the kept rows only.

Metrics besides GRPO's (`entropy` and `meta/emission_rate` included, every step):
`self_distillation/success_group_fraction` (groups with a correct rollout), `teacher_fraction`
(rollouts with a teacher context), `feedback_fraction` (rollouts whose context is the grader's
message), `distill_loss`, `policy_loss` (each term's value; the policy term is evaluated even at
w = 1, where it does not train) and `teacher_student_kl`.
"""

from __future__ import annotations

import time

from selfdistill.algo.distill import distill_term
from selfdistill.algo.grpo import select_rows
from selfdistill.algo.teacher import teacher_outputs
from selfdistill.algo.teacher_context import sdpo_contexts
from selfdistill.stages.context import StageContext
from selfdistill.stages.grpo import collect_rollouts, needs_reference, step_record, update_policy


def run(ctx: StageContext) -> None:
    cfg, c, d = ctx.cfg, ctx.cfg.sdpo, ctx.cfg.algo.distill
    ctx.setup_optimizer(c, cfg.algo.ppo_epochs * cfg.algo.num_minibatches)
    if needs_reference(cfg):
        ctx.pin_reference()
    teacher = ctx.build_teacher(d.teacher)
    bar = ctx.progress(c.steps, f"sdpo[{cfg.reward.name}, teacher={d.teacher}]")
    while ctx.state.step < c.steps:
        t0 = time.perf_counter()
        ro = collect_rollouts(ctx, c.batch_size)
        t = time.perf_counter()
        contexts = sdpo_contexts(ro.batch, ro.grades, ro.examples, ctx.tokenizer, ctx.meta_ids, d, cfg.data)
        kept = ro.advantages.keep
        sub, _ = select_rows(ro.batch, ro.advantages.tokens, kept)  # the rows update_policy trains on, in order
        prompts = [p for p, k in zip(contexts.prompts, kept.tolist()) if k]
        with teacher.scoring_model() as model:
            tout = teacher_outputs(teacher, model, prompts, sub, ctx.tokenizer.pad_token_id, cfg.rollout.temperature,
                                   c.micro_batch_size, with_hidden=d.loss == "topk", engine=ctx.engine)
        ro.times["teacher"] = time.perf_counter() - t
        t = time.perf_counter()
        term = distill_term(d, tout, sub, ctx.engine.device, coef=d.weight, temperature=cfg.rollout.temperature,
                            token_weighting=cfg.algo.token_weighting)
        applied, upd = update_policy(ctx, ro, extra_terms=(term,), policy_coef=1.0 - d.weight,
                                     on_applied_step=teacher.after_optimizer_step)
        ctx.state.meta_steps += applied
        ro.times["update"] = time.perf_counter() - t
        upd = {**upd, **_self_distillation_metrics(contexts, ro, cfg.rollout.n)}
        for term_name, key in (("policy", "policy_loss"), ("distill", "distill_loss")):
            if f"loss/{term_name}" in upd:
                upd[f"self_distillation/{key}"] = upd.pop(f"loss/{term_name}")
        ctx.after_step(step_record(ctx, ro, upd, t0), bar, "sdpo")
    bar.close()


def _self_distillation_metrics(contexts, ro, n: int) -> dict[str, float]:
    """This rank's shares (means over its rollouts / groups; the record averages the ranks)."""
    correct = (ro.grades == 1).view(-1, n)
    return {
        "self_distillation/success_group_fraction": float(correct.any(1).float().mean()),
        "self_distillation/teacher_fraction": float(contexts.has_teacher.float().mean()),
        "self_distillation/feedback_fraction": float(contexts.feedback.float().mean()),
    }
