"""The run's lifecycle: build, resume, run the configured stages in order, save.

    for stage in cfg.trainer.stages:        sft | grpo | sdpo | sdft | eval  (selfdistill.stages, one module each)
        run it (resumable mid-stage); checkpoint at its end
    write summary.json

The stages share one `StageContext` (engine, model, tokenizer, data, sampler, grader, rollout
backend, metrics, checkpointing and the resumable `TrainState`), built here once. The held-in
validation rows (selfdistill.eval) are taken out of the train split before the sampler sees it.

`manifest.json` (selfdistill.manifest) is written when the run starts, rewritten once the data is
loaded, and finally marked `finished`, or `failed` with the error if building or any stage raises.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from selfdistill import checkpoint as ckpt
from selfdistill import ops
from selfdistill.config import Config, to_container
from selfdistill.data import drop_long_prompts, load_splits
from selfdistill.data.sampler import PromptSampler
from selfdistill.engine import build_engine
from selfdistill.eval import held_in_split
from selfdistill.manifest import RunManifest, describe_data
from selfdistill.metrics import MetricsLogger
from selfdistill.models import load_model_and_tokenizer, meta_token_ids
from selfdistill.ops import fused_layers
from selfdistill.rewards.grader import Grader
from selfdistill.rollout import build_rollout_backend
from selfdistill.stages import STAGES, StageContext, TrainState
from selfdistill.stages.eval import evaluated_held_out

__all__ = ["Trainer", "TrainState", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str):
        if cfg.trainer.torch_threads:
            torch.set_num_threads(cfg.trainer.torch_threads)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        ops.set_backend(cfg.ops.backend)
        fused_layers.set_mode(cfg.ops.fused_layers)
        engine = build_engine(cfg)
        self.manifest = RunManifest(run_dir, cfg, world_size=engine.world_size, device=str(engine.device),
                                    enabled=engine.is_main)
        self.manifest.write()
        with self.manifest.failure_recorded():
            self.ctx = self._build(cfg, run_dir, engine)
            self._resume_from = self._find_resume()
            self.manifest.update(resumed_from=self._resume_from, data=describe_data(cfg.data, {
                "train": self.ctx.train_set, "heldin": self.ctx.held_in, "heldout": evaluated_held_out(self.ctx)}))

    @staticmethod
    def _build(cfg: Config, run_dir: str, engine) -> StageContext:
        seed_everything(cfg.seed + engine.rank)
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        fused_layers.apply_fused_layers(model, engine.device)  # CPU runs: fused RMSNorm / rotary (ops.fused_layers)
        model = engine.wrap(model)
        train_set, held_out = load_splits(cfg.data, tokenizer)  # tokenizer: data.max_prompt_tokens
        train_set, held_in = held_in_split(train_set, cfg.eval.val_size, cfg.data.val_path, cfg.data.decoy_seed)
        if cfg.data.val_path and cfg.data.max_prompt_tokens is not None:  # a held-in file obeys the limit too
            held_in = drop_long_prompts(held_in, tokenizer, cfg.data, "held-in")
        return StageContext(
            cfg=cfg, run_dir=run_dir, engine=engine, model=model, tokenizer=tokenizer, meta_ids=meta_token_ids(tokenizer),
            train_set=train_set, held_out=held_out, held_in=held_in, sampler=PromptSampler(len(train_set), cfg.seed),
            grader=Grader(timeout_s=cfg.reward.grader_timeout_s, workers=cfg.reward.grader_workers),
            backend=build_rollout_backend(cfg.rollout.backend, engine.unwrapped(), tokenizer),
            metrics=MetricsLogger(run_dir, enabled=engine.is_main, tensorboard=cfg.trainer.tensorboard,
                                  wandb_project=cfg.trainer.wandb_project if cfg.trainer.wandb else None,
                                  config=to_container(cfg)),
        )

    @property
    def state(self) -> TrainState:
        return self.ctx.state

    def _find_resume(self) -> str | None:
        mode, run_dir = self.ctx.cfg.trainer.resume, self.ctx.run_dir
        if mode == "never":
            return None
        if mode == "auto":
            return ckpt.find_latest(run_dir)
        if not os.path.isfile(os.path.join(mode, ckpt.COMPLETE)):
            raise FileNotFoundError(f"trainer.resume={mode!r} is not a complete checkpoint directory (no {ckpt.COMPLETE} file)")
        return mode

    def run(self) -> dict:
        with self.manifest.failure_recorded():
            summary = self._run_stages()
        self.manifest.finish()
        return summary

    def _run_stages(self) -> dict:
        ctx = self.ctx
        if self._resume_from:
            ctx.restore(self._resume_from)
        stages = ctx.cfg.trainer.stages
        while ctx.state.stage_index < len(stages):
            stage = stages[ctx.state.stage_index]
            STAGES[stage](ctx)
            ctx.state.stage_index += 1
            ctx.state.step = 0
            ctx.release_reference()  # each training stage pins the weights it starts from
            if stage != "eval" or ctx.state.stage_index == len(stages):
                ctx.save()
        summary = {"evals": ctx.state.evals, "meta_steps": ctx.state.meta_steps, "num_tokens": ctx.state.num_tokens}
        if ctx.engine.is_main:
            with open(os.path.join(ctx.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        ctx.metrics.close()
        ctx.grader.close()
        return summary
