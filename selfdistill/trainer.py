"""The step loop: stages (sft, grpo, eval) in order, each a loop of steps, with resume.

    for stage in cfg.trainer.stages:        sft | grpo | eval, resumable mid-stage
        sft:   batch -> masked CE -> guarded optimizer step
        grpo:  prompts -> rollouts -> grade -> reward heads -> advantages -> clipped update
        eval:  greedy held-out accuracy (per domain and difficulty band)
    metrics every step, checkpoints every `trainer.save_every` steps and at every stage end

Everything a step depends on lives in `TrainState`, the engine's optimizer/scheduler, the sampler
and the RNGs, and all of it is checkpointed, so a killed run resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from selfdistill import checkpoint as ckpt
from selfdistill import ops
from selfdistill.algo import grpo
from selfdistill.algo.sft import sft_loss
from selfdistill.config import Config, to_container
from selfdistill.data import encode_prompt, load_splits
from selfdistill.data.sampler import PromptSampler, rank_slice
from selfdistill.engine import build_engine
from selfdistill.engine.reference import build_reference
from selfdistill.eval import evaluate, merge_rank_results
from selfdistill.metrics import MetricsLogger
from selfdistill.models import load_model_and_tokenizer, meta_token_ids
from selfdistill.rewards.grader import Grader
from selfdistill.rewards.regions import rollout_outside_meta_texts
from selfdistill.rewards.registry import get_reward
from selfdistill.rewards.scoring import compute_reward_heads
from selfdistill.rollout import build_rollout_backend
from selfdistill.rollout.base import rollout_seed


@dataclass
class TrainState:
    stage_index: int = 0  # position in cfg.trainer.stages of the stage in progress
    step: int = 0  # iterations done in the current stage (one batch each)
    meta_steps: int = 0  # s of SPEC section 4: optimizer steps applied by grpo, never reset on resume
    num_tokens: int = 0
    global_step: int = 0  # iterations over all stages (TensorBoard x-axis)
    reference: str | None = None  # checkpoint holding the frozen reference/scorer weights
    skipped_steps: int = 0  # optimizer steps refused for non-finite values (trainer.on_nonfinite=skip)
    grader: dict = field(default_factory=dict)  # cumulative grader counters
    metrics_rows: int = 0  # metrics.jsonl rows written up to this state
    sampler: dict = field(default_factory=dict)
    evals: list = field(default_factory=list)  # [{"after": stage, **metrics}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        if cfg.trainer.torch_threads:
            torch.set_num_threads(cfg.trainer.torch_threads)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        ops.set_backend(cfg.ops.backend)
        self.engine = build_engine(cfg)
        seed_everything(cfg.seed + self.engine.rank)
        model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        self.model = self.engine.wrap(model)
        self.meta_ids = meta_token_ids(self.tokenizer)
        self.train_set, self.held_out = load_splits(cfg.data)
        self.sampler = PromptSampler(len(self.train_set), cfg.seed)
        self.grader = Grader(timeout_s=cfg.reward.grader_timeout_s, workers=cfg.reward.grader_workers)
        self.backend = build_rollout_backend(cfg.rollout.backend, self.engine.unwrapped(), self.tokenizer)
        self.metrics = MetricsLogger(run_dir, enabled=self.engine.is_main, tensorboard=cfg.trainer.tensorboard,
                                     wandb_project=cfg.trainer.wandb_project if cfg.trainer.wandb else None, config=to_container(cfg))
        self.state = TrainState()
        self.reference_model = None
        self._resume_from = self._find_resume()

    # -- resume --------------------------------------------------------------------------------
    def _find_resume(self) -> str | None:
        mode = self.cfg.trainer.resume
        if mode == "never":
            return None
        if mode == "auto":
            return ckpt.find_latest(self.run_dir)
        if not os.path.isfile(os.path.join(mode, ckpt.COMPLETE)):
            raise FileNotFoundError(f"trainer.resume={mode!r} is not a complete checkpoint directory (no {ckpt.COMPLETE} file)")
        return mode

    def _restore(self, path: str) -> None:
        saved = ckpt.load_trainer_state(path)
        self.engine.load_model_weights(path)  # into the (possibly sharded) model; sharded optimizer state follows
        self.state = TrainState(**saved["state"])
        self.sampler.load_state_dict(self.state.sampler)
        self.engine.skipped_steps = self.state.skipped_steps
        for k in ("graded", "timeouts", "crashes"):  # global counts, carried on by rank 0
            setattr(self.grader, k, int(self.state.grader.get(f"grader/{k}", 0)) if self.engine.is_main else 0)
        self.metrics.truncate_to(self.state.metrics_rows)  # rows a killed run logged after this checkpoint
        self._pending_optim = saved.get("optim")
        ckpt.load_rng_state(path, self.engine.rank)
        if self.engine.is_main:
            print(f"[selfdistill] resumed from {path}: stage {self.cfg.trainer.stages[self.state.stage_index] if self.state.stage_index < len(self.cfg.trainer.stages) else 'done'}, step {self.state.step}")

    def save(self) -> str:
        st = self.state
        st.sampler = self.sampler.state_dict()
        st.skipped_steps = self.engine.skipped_steps
        st.metrics_rows = self.metrics.rows
        st.grader = self.engine.reduce_sum(self.grader.metrics())
        stage = self.cfg.trainer.stages[min(st.stage_index, len(self.cfg.trainer.stages) - 1)]
        name = ckpt.checkpoint_name(stage, st.global_step)
        protect = (os.path.basename(st.reference),) if st.reference else ()
        return ckpt.save_checkpoint(self.run_dir, name, engine=self.engine, tokenizer=self.tokenizer,
                                    trainer_state={"state": asdict(st)}, keep_last=self.cfg.trainer.keep_last, protect=protect)

    # -- the stage loop ------------------------------------------------------------------------
    def run(self) -> dict:
        self._pending_optim = None
        if self._resume_from:
            self._restore(self._resume_from)
        stages = self.cfg.trainer.stages
        while self.state.stage_index < len(stages):
            stage = stages[self.state.stage_index]
            {"sft": self.run_sft, "grpo": self.run_grpo, "eval": self.run_eval}[stage]()
            self.state.stage_index += 1
            self.state.step = 0
            if stage != "eval" or self.state.stage_index == len(stages):
                self.save()
        summary = {"evals": self.state.evals, "meta_steps": self.state.meta_steps, "num_tokens": self.state.num_tokens}
        if self.engine.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self.metrics.close()
        self.grader.close()
        return summary

    def _setup_stage_optimizer(self, stage_cfg, steps_per_iter: int = 1) -> None:
        stage_cfg = copy.deepcopy(stage_cfg)
        stage_cfg.steps = stage_cfg.steps * steps_per_iter
        stage_cfg.warmup_steps = stage_cfg.warmup_steps * steps_per_iter
        self.engine.setup_optimizer(stage_cfg)
        if self._pending_optim is not None and self.state.step > 0:
            self.engine.load_optimizer_state_dict(self._pending_optim)
        self._pending_optim = None

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, initial=self.state.step, desc=desc, dynamic_ncols=True,
                    disable=not (self.engine.is_main and self.cfg.trainer.progress))

    def _after_step(self, record: dict, bar, stage: str) -> None:
        st = self.state
        st.step += 1
        st.global_step += 1
        if st.step % self.cfg.trainer.log_every == 0 or st.step == 1:
            self.metrics.log({"stage": stage, **record}, st.global_step)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3f}" for k in ("loss", "reward", "accuracy") if k in record})
        if self.cfg.trainer.save_every and st.step % self.cfg.trainer.save_every == 0:
            self.save()

    def run_sft(self) -> None:
        c = self.cfg.sft
        self._setup_stage_optimizer(c)
        bar = self._progress(c.steps, "sft")
        while self.state.step < c.steps:
            t0 = time.perf_counter()
            idx = rank_slice(self.sampler.next_batch(c.batch_size), self.engine.rank, self.engine.world_size)
            exs = [self.train_set[i] for i in idx]
            missing = [ex.id for ex in exs if not ex.solution]
            if missing:
                raise ValueError(f"sft needs worked solutions; rows {missing[:3]} have none (extra_info.solution)")
            prompts = [encode_prompt(self.tokenizer, ex, self.cfg.data.system_prompt) for ex in exs]
            loss, ntok = sft_loss(self.model, self.tokenizer, prompts, [ex.solution for ex in exs])
            # The step's loss is the mean over all tokens of the global batch: weight this rank's
            # token mean by its share of them, so the rank-averaged gradient equals the
            # single-process gradient of the same batch (ranks hold different token counts).
            global_ntok = int(self.engine.reduce_sum({"ntok": ntok})["ntok"])
            loss = loss * (ntok * self.engine.world_size / max(global_ntok, 1))
            self.engine.backward(loss)
            _, grad_norm = self.engine.step(float(loss.detach()), self.state.step)
            self.state.num_tokens += global_ntok
            dt = time.perf_counter() - t0
            rec = self.engine.reduce_mean({"sft/loss": float(loss.detach()), "grad_norm": grad_norm})
            self._after_step({**rec, "loss": rec["sft/loss"], "lr": self.engine.scheduler.get_last_lr()[0],
                              "perf/step_s": dt, "perf/tokens_per_s": global_ntok / dt}, bar, "sft")
        bar.close()

    def _reference(self):
        """Frozen reference/scorer: the weights the grpo stage started from (SPEC section 1),
        replicated or sharded across ranks (`engine.shard_reference`, selfdistill.engine.reference)."""
        if self.reference_model is None:
            ref = self.engine.frozen_copy()  # a plain full model, also under FSDP2 / ZeRO-3
            if self.state.reference:
                ckpt.load_model_weights(ref, self.state.reference)
            self.reference_model = build_reference(ref.eval().requires_grad_(False), self.cfg, self.engine.rank, self.engine.world_size)
        return self.reference_model

    def _scorer(self):
        """(context, scorer model) for the reward's scorer passes: the policy on full parameters
        (`reward.use_policy_as_scorer`), the gathered reference, or no scorer."""
        if not self._scores():
            return contextlib.nullcontext(None)
        if self.cfg.reward.use_policy_as_scorer:
            return _yielding(self.engine.generation_context(), self.engine.unwrapped())
        return self._reference().gathered()

    def run_grpo(self) -> None:
        cfg, c = self.cfg, self.cfg.grpo
        self._setup_stage_optimizer(c, cfg.algo.ppo_epochs * cfg.algo.num_minibatches)
        if self.state.step == 0 and self.state.reference is None and self._needs_reference():
            self.state.reference = self.save() if self.state.global_step else cfg.model.path
        bar = self._progress(c.steps, f"grpo[{cfg.reward.name}]")
        pad = self.tokenizer.pad_token_id
        while self.state.step < c.steps:
            times, t0 = {}, time.perf_counter()
            idx = rank_slice(self.sampler.next_batch(c.batch_size), self.engine.rank, self.engine.world_size)
            exs = [self.train_set[i] for i in idx]
            prompts = [encode_prompt(self.tokenizer, ex, cfg.data.system_prompt) for ex in exs]
            # Rollouts are seeded per prompt (seed, step, position in the global batch), not by the
            # rank's RNG: the same samples for any world size, and after a resume.
            first = self.engine.rank * len(idx)
            seeds = [rollout_seed(cfg.seed, self.state.global_step, first + i) for i in range(len(idx))]
            with self.engine.generation_context():
                batch = grpo.generate_group_rollouts(self.backend, prompts, cfg, seeds)
            times["rollout"] = time.perf_counter() - t0
            t = time.perf_counter()
            golds = [ex.gold for ex in exs for _ in range(cfg.rollout.n)]
            grades = torch.tensor(self.grader.grade(rollout_outside_meta_texts(batch, self.tokenizer, self.meta_ids), golds))
            times["grade"] = time.perf_counter() - t
            t = time.perf_counter()
            with self._scorer() as scorer:
                heads, meta_route, reward_metrics = compute_reward_heads(
                    cfg.reward, batch, grades, exs, scorer, self.tokenizer, self.meta_ids)
            adv = grpo.assemble_advantages(batch, heads, meta_route, self.meta_ids, cfg, self.state.meta_steps)
            times["score"] = time.perf_counter() - t
            t = time.perf_counter()
            sub, token_adv = grpo.select_rows(batch, adv.tokens, adv.keep)
            applied, upd = (0, {})
            if self.engine.reduce_sum({"rows": len(sub)})["rows"]:  # every rank decides alike
                ref_logp = None
                if cfg.algo.kl_coef > 0:
                    with self._reference().gathered() as ref:
                        ref_logp = grpo.reference_logprobs(ref, sub, pad, cfg.rollout.temperature)
                filler = None if len(sub) else grpo.select_rows(batch, adv.tokens, torch.arange(len(batch)) == 0)[0]
                applied, upd = grpo.policy_update(self.engine, sub, token_adv, pad, cfg, self.state.meta_steps, ref_logp, filler)
            self.state.meta_steps += applied
            times["update"] = time.perf_counter() - t
            record = self._grpo_record(batch, grades, heads, upd, adv.metrics, reward_metrics)
            # Counts add up over the ranks (one reduction for all of them); everything else is the
            # mean of the ranks' values.
            counts = self.engine.reduce_sum({"ntok": int(batch.completion_mask.sum()), **self.grader.metrics(),
                                             **{k: record.pop(k) for k in SUMMED_METRICS if k in record}})
            ntok = int(counts.pop("ntok"))  # the global batch's completion tokens
            self.state.num_tokens += ntok
            dt = time.perf_counter() - t0
            record = {**self.engine.reduce_mean(record), **counts}
            record.update({"perf/step_s": dt, "perf/tokens_per_s": ntok / dt, "num_tokens": self.state.num_tokens,
                           "lr": self.engine.scheduler.get_last_lr()[0], "train/skipped_steps": self.engine.skipped_steps,
                           **{f"perf/{k}_s": v for k, v in times.items()}})
            self._after_step(record, bar, "grpo")
        bar.close()

    def _scores(self) -> bool:
        """The reward arm runs scorer passes (PMI, gm, belief open/close)."""
        return get_reward(self.cfg.reward.name).needs_scorer

    def _needs_reference(self) -> bool:
        """A frozen reference is needed for the KL term or for an arm that runs scorer passes."""
        return self.cfg.algo.kl_coef > 0 or (self._scores() and not self.cfg.reward.use_policy_as_scorer)

    def _grpo_record(self, batch, grades, heads, upd, adv_metrics, reward_metrics) -> dict:
        correct = (grades == 1).float()
        r = heads["correctness"].view(-1, self.cfg.rollout.n)
        lengths = batch.lengths.float()
        return {
            "reward": float(r.mean()), "reward_std": float(r.std(1).mean()), "accuracy": float(correct.mean()),
            "completions/mean_length": float(lengths.mean()), "completions/clipped_ratio": float(batch.truncated.float().mean()) if batch.truncated is not None else 0.0,
            **upd, **adv_metrics, **reward_metrics,
        }

    def run_eval(self) -> None:
        cfg = self.cfg
        stages = cfg.trainer.stages[: self.state.stage_index]
        after = next((s for s in reversed(stages) if s != "eval"), "init")
        exs = self.held_out[: cfg.eval.num_prompts] if cfg.eval.num_prompts else self.held_out
        exs = rank_slice(exs[: len(exs) - len(exs) % self.engine.world_size], self.engine.rank, self.engine.world_size)
        with self.engine.generation_context():
            res = evaluate(self.backend, self.tokenizer, exs, self.grader, max_new_tokens=cfg.eval.max_new_tokens,
                           batch_size=cfg.eval.batch_size, greedy=cfg.eval.greedy, temperature=cfg.rollout.temperature,
                           system_prompt=cfg.data.system_prompt, prefix="heldout",
                           progress=self.engine.is_main and cfg.trainer.progress)
        res = merge_rank_results(self.engine.gather_objects(res))  # ranks may hold different domains / bands
        self.state.evals.append({"after": after, **res})
        self.metrics.log({"stage": "eval", "after": after, **res}, self.state.global_step)
        if self.engine.is_main:
            print(f"[selfdistill] held-out accuracy after {after}: {res['heldout/accuracy']:.3f} (n={int(res['heldout/n'])})")


SUMMED_METRICS = ("scorer/sequences", "scorer/tokens")  # per-step counts in the record (grader/* are summed too)


@contextlib.contextmanager
def _yielding(ctx, value):
    """Enter `ctx`, yield `value`."""
    with ctx:
        yield value
