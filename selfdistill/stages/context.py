"""What every stage shares: the built run (engine, model, tokenizer, data, sampler, grader, rollout
backend, metrics) and its resumable state, plus the few services a stage loop calls (optimizer per
stage, progress bar, per-step logging and checkpointing, the frozen reference, the self-teacher).

Everything a step depends on lives in `TrainState`, the engine's optimizer/scheduler, the sampler
and the RNGs, and all of it is checkpointed (`save` / `restore`), so a killed run resumes exactly.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from selfdistill import checkpoint as ckpt
from selfdistill.algo.teacher import SelfTeacher, load_teacher_weights
from selfdistill.config import Config
from selfdistill.engine.reference import build_reference


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


@dataclass
class StageContext:
    cfg: Config
    run_dir: str
    engine: object
    model: object  # the engine-wrapped policy
    tokenizer: object
    meta_ids: tuple[int, int]
    train_set: list
    held_out: list
    sampler: object
    grader: object
    backend: object  # rollout backend over the unwrapped policy
    metrics: object
    state: TrainState = field(default_factory=TrainState)
    held_in: list = field(default_factory=list)  # validation rows training never samples (selfdistill.eval)
    pending_optim: dict | None = None  # optimizer state restored from a checkpoint, applied by the stage
    resumed_from: str | None = None  # the checkpoint this run resumed from
    teacher: SelfTeacher | None = None  # the running stage's self-teacher (SDPO / SDFT)
    last_validation_step: int | None = None  # global step of the latest held-in evaluation
    _reference: object = None

    @property
    def stage(self) -> str:
        stages = self.cfg.trainer.stages
        return stages[min(self.state.stage_index, len(stages) - 1)]

    # -- per-stage services --------------------------------------------------------------------
    def setup_optimizer(self, stage_cfg, steps_per_iter: int = 1) -> None:
        """A fresh optimizer and schedule for this stage (`steps_per_iter` optimizer steps per stage
        step); on resume mid-stage, the checkpoint's optimizer state."""
        stage_cfg = copy.deepcopy(stage_cfg)
        stage_cfg.steps = stage_cfg.steps * steps_per_iter
        stage_cfg.warmup_steps = stage_cfg.warmup_steps * steps_per_iter
        self.engine.setup_optimizer(stage_cfg)
        if self.pending_optim is not None and self.state.step > 0:
            self.engine.load_optimizer_state_dict(self.pending_optim)
        self.pending_optim = None

    def progress(self, total: int, desc: str):
        return tqdm(total=total, initial=self.state.step, desc=desc, dynamic_ncols=True,
                    disable=not (self.engine.is_main and self.cfg.trainer.progress))

    def after_step(self, record: dict, bar, stage: str) -> None:
        """Count the step, log it, update the bar, validate on the held-in set every `eval.every`
        steps, checkpoint every `trainer.save_every` steps (after the validation, so a resumed run
        does not repeat it)."""
        st = self.state
        st.step += 1
        st.global_step += 1
        if st.step % self.cfg.trainer.log_every == 0 or st.step == 1:
            self.metrics.log({"stage": stage, **record}, st.global_step)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3f}" for k in ("loss", "reward", "accuracy") if k in record})
        if self.validation_due(stage):
            from selfdistill.stages.eval import validate  # the eval stage module imports this one

            validate(self, stage)
        if self.cfg.trainer.save_every and st.step % self.cfg.trainer.save_every == 0:
            self.save()

    def validation_due(self, stage: str) -> bool:
        e = self.cfg.eval
        return (bool(self.held_in) and e.every > 0 and self.state.step % e.every == 0
                and (e.val_stages is None or stage in e.val_stages))

    # -- the frozen reference ------------------------------------------------------------------
    def pin_reference(self) -> None:
        """Fix the frozen reference/scorer (SPEC section 1) to the weights this stage starts from.

        At a stage's first step the policy *is* those weights: the reference is copied from memory
        (after any vocabulary resize, never re-read from the original model directory) and a
        checkpoint of them is written, which a resumed run reloads it from."""
        if self.state.reference is not None:
            return
        self._reference = None
        self.reference()
        self.state.reference = self.save()

    def reference(self):
        """The frozen reference, replicated or sharded across ranks (`engine.shard_reference`,
        selfdistill.engine.reference); `.gathered()` yields the plain model."""
        if self._reference is None:
            ref = self.engine.frozen_copy()  # a plain full model, also under FSDP2 / ZeRO-3
            if self.state.reference is not None:  # resumed: the policy has moved since
                ckpt.load_model_weights(ref, self.state.reference)
            self._reference = build_reference(ref.eval().requires_grad_(False), self.cfg, self.engine.rank,
                                              self.engine.world_size)
        return self._reference

    def release_reference(self) -> None:
        """Forget the reference and the self-teacher at the end of a stage (the next training stage
        pins its own)."""
        self.state.reference = None
        self._reference = None
        self.teacher = None

    # -- the self-teacher (SPEC section 6) -----------------------------------------------------
    def build_teacher(self, mode: str) -> SelfTeacher:
        """The stage's self-teacher (`algo.distill.teacher`): `frozen` = the pinned reference; `ema` =
        a copy of the stage-start weights, or on resume mid-stage the copy the checkpoint holds;
        `live` = the policy. Checkpoints written while it is set carry an EMA teacher's weights."""
        if mode == "frozen":
            self.pin_reference()
            self.teacher = SelfTeacher("frozen", weights=self.reference())
        elif mode == "ema":
            copy = self.engine.frozen_copy()  # at the stage's first step: the weights it starts from
            if self.state.step > 0:
                load_teacher_weights(copy, ckpt.read_extra_weights(self.resumed_from, "teacher"))
            self.teacher = SelfTeacher("ema", weights=build_reference(copy, self.cfg, self.engine.rank, self.engine.world_size),
                                       tau=self.cfg.algo.distill.ema_tau, full_parameters=self.engine.full_parameters)
        else:
            self.teacher = SelfTeacher(mode, live=self.policy_for_generation)
        return self.teacher

    def policy_for_generation(self):
        """(context, the unwrapped policy on full parameters) for passes outside the update."""
        return _yielding(self.engine.generation_context(), self.engine.unwrapped())

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> str:
        st = self.state
        st.sampler = self.sampler.state_dict()
        st.skipped_steps = self.engine.skipped_steps
        st.metrics_rows = self.metrics.rows
        st.grader = self.engine.reduce_sum(self.grader.metrics())
        name = ckpt.checkpoint_name(self.stage, st.global_step)
        protect = (os.path.basename(st.reference),) if st.reference else ()
        teacher = self.teacher.checkpoint_weights(keep=self.engine.is_main) if self.teacher is not None else None
        return ckpt.save_checkpoint(self.run_dir, name, engine=self.engine, tokenizer=self.tokenizer,
                                    trainer_state={"state": asdict(st)}, keep_last=self.cfg.trainer.keep_last, protect=protect,
                                    extra_weights={"teacher": teacher} if teacher is not None else None)

    def restore(self, path: str) -> None:
        saved = ckpt.load_trainer_state(path)
        self.resumed_from = path
        self.engine.load_model_weights(path)  # into the (possibly sharded) model; sharded optimizer state follows
        self.state = TrainState(**saved["state"])
        self.sampler.load_state_dict(self.state.sampler)
        self.engine.skipped_steps = self.state.skipped_steps
        for k in ("graded", "timeouts", "crashes"):  # global counts, carried on by rank 0
            setattr(self.grader, k, int(self.state.grader.get(f"grader/{k}", 0)) if self.engine.is_main else 0)
        self.metrics.truncate_to(self.state.metrics_rows)  # rows a killed run logged after this checkpoint
        self.pending_optim = saved.get("optim")
        ckpt.load_rng_state(path, self.engine.rank)
        if self.engine.is_main:
            where = self.cfg.trainer.stages[self.state.stage_index] if self.state.stage_index < len(self.cfg.trainer.stages) else "done"
            print(f"[selfdistill] resumed from {path}: stage {where}, step {self.state.step}")


@contextlib.contextmanager
def _yielding(ctx, value):
    """Enter `ctx`, yield `value`."""
    with ctx:
        yield value
