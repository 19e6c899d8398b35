"""Supervised fine-tuning stage: teacher-forced cross-entropy on worked solutions (the demonstrations
of the data rows), masked to the completion.

    batch of rows -> micro-batches -> masked CE (accumulated) -> guarded optimizer step

The step's loss is the mean over every completion token of the global batch: each micro-batch's
token mean is weighted by its share of those tokens (times the world size, since the engines average
gradients over ranks), so micro-batching and data parallelism give the single-process gradient.
"""

from __future__ import annotations

import time

from selfdistill.algo.sft import encode_solutions, sft_loss
from selfdistill.algo.update import row_chunks
from selfdistill.data import encode_prompt
from selfdistill.data.sampler import rank_slice
from selfdistill.stages.context import StageContext


def run(ctx: StageContext) -> None:
    c, engine = ctx.cfg.sft, ctx.engine
    ctx.setup_optimizer(c)
    bar = ctx.progress(c.steps, "sft")
    while ctx.state.step < c.steps:
        t0 = time.perf_counter()
        idx = rank_slice(ctx.sampler.next_batch(c.batch_size), engine.rank, engine.world_size)
        exs = [ctx.train_set[i] for i in idx]
        missing = [ex.id for ex in exs if not ex.solution]
        if missing:
            raise ValueError(f"sft needs worked solutions; rows {missing[:3]} have none (extra_info.solution)")
        prompts = [encode_prompt(ctx.tokenizer, ex, ctx.cfg.data) for ex in exs]
        completions = encode_solutions(ctx.tokenizer, [ex.solution for ex in exs])
        chunks = row_chunks(len(exs), c.micro_batch_size)  # equal rows per rank: equal chunk counts
        global_ntok = int(engine.reduce_sum({"ntok": sum(len(x) for x in completions)})["ntok"])
        loss_value = 0.0
        for j, rows in enumerate(chunks):
            with engine.accumulation(last=j == len(chunks) - 1):
                r = rows.tolist()
                loss, ntok = sft_loss(ctx.model, [prompts[i] for i in r], [completions[i] for i in r], ctx.tokenizer.pad_token_id)
                loss = loss * (ntok * engine.world_size / max(global_ntok, 1))
                engine.backward(loss)
                loss_value += float(loss.detach())
        _, grad_norm = engine.step(loss_value, ctx.state.step)
        ctx.state.num_tokens += global_ntok
        dt = time.perf_counter() - t0
        rec = engine.reduce_mean({"sft/loss": loss_value, "grad_norm": grad_norm})
        ctx.after_step({**rec, "loss": rec["sft/loss"], "lr": engine.scheduler.get_last_lr()[0],
                        "perf/step_s": dt, "perf/tokens_per_s": global_ntok / dt}, bar, "sft")
    bar.close()

