"""Evaluation stage: held-out accuracy of the current policy (per domain and difficulty band),
logged and kept in the run summary as "after <previous training stage>"."""

from __future__ import annotations

from selfdistill.data.sampler import rank_slice
from selfdistill.eval import evaluate, merge_rank_results
from selfdistill.stages.context import StageContext


def run(ctx: StageContext) -> None:
    cfg, engine = ctx.cfg, ctx.engine
    stages = cfg.trainer.stages[: ctx.state.stage_index]
    after = next((s for s in reversed(stages) if s != "eval"), "init")
    exs = ctx.held_out[: cfg.eval.num_prompts] if cfg.eval.num_prompts else ctx.held_out
    exs = rank_slice(exs[: len(exs) - len(exs) % engine.world_size], engine.rank, engine.world_size)
    with engine.generation_context():
        res = evaluate(ctx.backend, ctx.tokenizer, exs, ctx.grader, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, greedy=cfg.eval.greedy, temperature=cfg.rollout.temperature,
                       data=cfg.data, prefix="heldout",
                       progress=engine.is_main and cfg.trainer.progress)
    res = merge_rank_results(engine.gather_objects(res))  # ranks may hold different domains / bands
    ctx.state.evals.append({"after": after, **res})
    ctx.metrics.log({"stage": "eval", "after": after, **res}, ctx.state.global_step)
    if engine.is_main:
        print(f"[selfdistill] held-out accuracy after {after}: {res['heldout/accuracy']:.3f} (n={int(res['heldout/n'])})")
