"""Evaluation of the current policy (selfdistill.eval): the `eval` stage and periodic validation.

- `run` (the `eval` stage): held-out accuracy per data_source, domain and difficulty band, plus the
  held-in set when the run has one (unless a validation at this very step already did it); logged
  and kept in the run summary as "after <previous training stage>".
- `validate`: the held-in set, called by `StageContext.after_step` every `eval.every` steps of a
  training stage (`eval.val_stages`); logged as stage "val".

Every evaluated sample is appended to `<run_dir>/eval_samples.jsonl` with its split, global step
and stage, so any two runs can be compared problem by problem (selfdistill.report).
"""

from __future__ import annotations

import os

from selfdistill.eval import HELD_IN, HELD_OUT, SAMPLES_FILE, SPLIT_STREAMS, append_samples, evaluate, sampling_settings
from selfdistill.stages.context import StageContext


def run(ctx: StageContext) -> None:
    cfg, engine, st = ctx.cfg, ctx.engine, ctx.state
    stages = cfg.trainer.stages[: st.stage_index]
    after = next((s for s in reversed(stages) if s != "eval"), "init")
    res = evaluate_split(ctx, HELD_OUT, evaluated_held_out(ctx), after)
    if ctx.held_in and ctx.last_validation_step != st.global_step:
        res.update(evaluate_split(ctx, HELD_IN, ctx.held_in, after))
    st.evals.append({"after": after, **res})
    ctx.metrics.log({"stage": "eval", "after": after, **res}, st.global_step)
    if engine.is_main:
        print(f"[selfdistill] held-out accuracy after {after}: {res['heldout/accuracy']:.3f} (n={int(res['heldout/n'])})")


def validate(ctx: StageContext, stage: str) -> None:
    """Held-in validation during training stage `stage`."""
    res = evaluate_split(ctx, HELD_IN, ctx.held_in, stage)
    ctx.metrics.log({"stage": "val", "during": stage, **res}, ctx.state.global_step)


def evaluated_held_out(ctx: StageContext) -> list:
    """The held-out problems the eval stage evaluates (the first `eval.num_prompts`, or all)."""
    n = ctx.cfg.eval.num_prompts
    return ctx.held_out[:n] if n else ctx.held_out


def evaluate_split(ctx: StageContext, split: str, examples: list, stage: str) -> dict[str, float]:
    """Evaluate `examples` on every rank's share, write the gathered samples (rank 0), return the metrics."""
    cfg, engine = ctx.cfg, ctx.engine
    with engine.generation_context():
        result = evaluate(ctx.backend, ctx.tokenizer, examples, ctx.grader, **sampling_settings(cfg),
                          seed_keys=(cfg.seed, SPLIT_STREAMS[split]), data=cfg.data,
                          prefix=split, rank=engine.rank, world_size=engine.world_size, gather=engine.gather_objects,
                          progress=engine.is_main and cfg.trainer.progress)
    if split == HELD_IN:
        ctx.last_validation_step = ctx.state.global_step
    if engine.is_main:
        append_samples(os.path.join(ctx.run_dir, SAMPLES_FILE), result.rows, split=split, step=ctx.state.global_step,
                       stage=stage)
    return result.metrics
