"""DeepSpeed ZeRO-2 and ZeRO-3 engines, configured from the Hydra config (no JSON files).

`deepspeed_config()` turns the typed config into DeepSpeed's config dict: AdamW built by DeepSpeed
as `torch.optim.AdamW` (`torch_adam: true`, the optimizer every other engine uses, so the numerics
match), the stage's gradient clip, bf16 or fp32, the ZeRO stage; `engine.deepspeed` is deep-merged
on top for anything else (offload, bucket sizes, `stage3_param_persistence_threshold`, ...).
The lr schedule is the trainer's, not DeepSpeed's: a LambdaLR over `selfdistill.optim.lr_multiplier`
on the same AdamW, stepped only when an update was applied. A new stage (sft -> grpo) resets the
moments and sets the stage's lr / betas / weight decay / clip, like the fresh AdamW of the others.

The guarded step: a hook on every parameter checks its gradient on this rank before DeepSpeed
reduces it (so the error names the rank whose backward produced it), the verdict is agreed across
ranks, and a refused update goes through DeepSpeed's own overflow path (gradients dropped, no
optimizer step, `was_step_applied() == False`), which this engine switches on from the verdict.

ZeRO-3 specifics: the LM-head weight stays gathered from the model's forward until the optimizer
step (an "external parameter" of the root module), because `completion_logprobs` hands it to the
fused log-prob op after the forward; generation gathers all
parameters once (`deepspeed.zero.GatheredParameters`) and lifts the per-module fetch hooks so that
ranks may run different numbers of decode steps.

Checkpoints: weights are consolidated from the fp32 master copy (`safe_get_full_fp32_param`) for
the HF directory; optimizer partitions are written per rank by `DeepSpeedEngine.save_checkpoint`
under `<checkpoint>/deepspeed/` and restored with `load_checkpoint` (same world size).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os

import torch
import torch.distributed as dist

from selfdistill.config import Config, StageOptimConfig
from selfdistill.engine.base import Engine, ensure_process_group
from selfdistill.optim import lr_multiplier

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which `build_optimizer` uses for the other engines
TAG = "zero"  # the DeepSpeed checkpoint tag inside <checkpoint>/deepspeed/


def deepspeed_config(cfg: Config, stage: StageOptimConfig, zero_stage: int, world_size: int) -> dict:
    """DeepSpeed's config dict for `cfg` (the values of `stage` seed it; each stage resets them)."""
    config = {
        # The trainer feeds batches itself and steps after every backward: these only make
        # DeepSpeed's batch bookkeeping consistent (train = micro x accumulation x world).
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(stage.grad_clip),
        "optimizer": {"type": "AdamW", "params": {
            "lr": float(stage.lr), "betas": [float(b) for b in stage.betas], "eps": ADAM_EPS,
            "weight_decay": float(stage.weight_decay), "torch_adam": True,
        }},
        "bf16": {"enabled": cfg.engine.mixed_precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, dict(cfg.engine.deepspeed or {}))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _first_training_stage(cfg: Config) -> StageOptimConfig:
    name = next((s for s in cfg.trainer.stages if s in ("sft", "grpo", "sdpo", "sdft")), "sft")
    return getattr(cfg, name)


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, zero_stage: int):
        if zero_stage not in (2, 3):
            raise ValueError(f"ZeRO stage {zero_stage} is not offered; use deepspeed_zero2 or deepspeed_zero3")
        if zero_stage == 3 and not cfg.engine.gather_for_generation:
            raise ValueError("engine.gather_for_generation=false is not supported with deepspeed_zero3: HF generate "
                             "would fetch each layer per decode step with ranks out of step; use fsdp2 for that "
                             "memory/communication trade-off, or keep gather_for_generation=true")
        ensure_process_group(cfg)
        super().__init__(cfg)
        self.zero_stage = zero_stage
        self.name = f"deepspeed_zero{zero_stage}"
        self._grad_checks: list[tuple[str, torch.Tensor]] = []
        self._refuse_update = False

    def wrap(self, model):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self._prepare(model)
        model = model.to(self.device)
        self._broadcast_from_rank0(model)
        self.ds_config = deepspeed_config(self.cfg, _first_training_stage(self.cfg), self.zero_stage, self.world_size)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.ds_config)
        self.model = engine
        self._install_update_switch()
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                p.register_hook(self._gradient_check(name))
        if self.zero_stage == 3:
            self._keep_output_embedding_gathered()
        return engine

    def setup_optimizer(self, stage: StageOptimConfig):
        self.stage_cfg = stage
        zero = self.model.optimizer
        adamw = zero.optimizer  # the torch.optim.AdamW over this rank's fp32 partitions
        adamw.state.clear()  # fresh moments per stage, as the other engines' new AdamW
        for group in adamw.param_groups:
            group.pop("initial_lr", None)  # else the new LambdaLR would keep the previous stage's base lr
            group.update(lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
        zero.clip_grad = float(stage.grad_clip)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lambda s, c=stage: lr_multiplier(s, c))
        self.optimizer = zero
        if self._model_dtype != torch.float32 and not self.ds_config["bf16"]["enabled"]:
            self._warn_low_precision(self._model_dtype)  # bf16 mode would keep fp32 master partitions
        return zero

    def no_sync(self):
        # ZeRO-2/3 reduce (and partition) gradients during every backward; DeepSpeed refuses no_sync.
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulation(self, last: bool):
        """DeepSpeed's own gradient accumulation: a micro-batch that is not the `last` of the step is
        not an accumulation boundary, so its gradients are accumulated and `step` applies them once.
        (The config keeps gradient_accumulation_steps=1, so DeepSpeed does not rescale the loss: the
        update loop weights each micro-batch itself.)"""
        self.model.set_gradient_accumulation_boundary(last)
        try:
            yield
        finally:
            self.model.set_gradient_accumulation_boundary(True)

    @contextlib.contextmanager
    def generation_context(self):
        """ZeRO-3: gather every parameter once for the rollout phase, partition again after.

        Memory: the full model is resident on every rank while generating (ZeRO-3's saving is
        suspended for the rollout phase). The module fetch/release hooks are lifted meanwhile, so a
        rank that finishes its rollouts early issues no collectives the others would wait for."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        offload = self.model.optimizer.parameter_offload
        params = list(self.unwrapped().parameters())
        with deepspeed.zero.GatheredParameters(params):
            for p in params:
                p.ds_active_sub_modules.clear()
            for hook in [*offload.forward_hooks, *offload.backward_hooks]:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                offload._register_deepspeed_module(offload.module)

    # -- the guarded step ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def _gradient_check(self, name: str):
        def hook(grad: torch.Tensor):
            self._grad_checks.append((name, torch.isfinite(grad).all()))  # no host sync here
        return hook

    def _install_update_switch(self) -> None:
        """Let the agreed verdict decide DeepSpeed's overflow check, so a refused update takes
        DeepSpeed's own skip path (gradients dropped, optimizer untouched, step not applied)."""
        zero = self.model.optimizer
        if self.zero_stage == 3:
            check = zero._overflow_check_and_loss_scale_update

            def overflow_check(update_scale=True):
                if not self._refuse_update:
                    return check(update_scale=update_scale)
                zero.overflow = True
                return zero._loss_scale_update_and_overflow_cleanup() if update_scale else True

            zero._overflow_check_and_loss_scale_update = overflow_check
        else:
            zero.check_grad_overflow = True
            zero.has_overflow = lambda partition_gradients=True: self._refuse_update

    def step(self, loss_value: float, step: int) -> tuple[bool, float]:
        bad = [] if math.isfinite(loss_value) else [f"loss={loss_value}"]
        checks, self._grad_checks = self._grad_checks, []
        if checks and not bool(torch.stack([ok for _, ok in checks]).all()):
            bad.append(f"gradient of {next(n for n, ok in checks if not ok)}")
        refuse = self._any_rank(bool(bad))
        if refuse and self.cfg.trainer.on_nonfinite == "raise":
            return self._refuse(step, bad, float("nan"))  # raises before DeepSpeed touches anything
        self._refuse_update = refuse
        try:
            self.model.step()
        finally:
            self._refuse_update = False
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self.model.was_step_applied():
            self.scheduler.step()
            return True, norm
        # Refused by the verdict, or an overflow DeepSpeed found after the reduction: not applied.
        self.skipped_steps += 1
        return False, norm

    # -- checkpoint state ----------------------------------------------------------------------
    def _full_fp32(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full fp32 master copy of `p` on every rank (a collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)
        if full is None:  # not handled by the optimizer (frozen): gather the module's copy
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().clone().float()
        return full

    def full_state_dict(self) -> dict:
        module, out = self.unwrapped(), {}
        for name, p in module.named_parameters():
            full = self._full_fp32(p)
            if self.is_main:
                out[name] = full.detach().to("cpu", copy=True)
        if self.is_main:
            out.update({n: b.detach().cpu().clone() for n, b in _persistent_buffers(module)})
        return out

    def load_model_weights(self, ckpt_dir: str) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        from selfdistill import checkpoint as ckpt

        module = self.unwrapped()
        named = list(module.named_parameters())
        state = ckpt.read_model_weights(ckpt_dir) if self.is_main else {}
        if self.is_main:
            missing = [n for n, _ in named if n not in state]
            if missing:
                raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}")
        # One parameter at a time: rank 0 broadcasts the fp32 value, every rank writes its model
        # copy (its partition under ZeRO-3) and its fp32 master partition.
        for name, p in named:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            value = state[name].to(self.device, torch.float32) if self.is_main else torch.empty(shape, device=self.device)
            if self.distributed:
                dist.broadcast(value, src=0)
            with torch.no_grad():
                if self.zero_stage == 3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        p.data.copy_(value)
                else:
                    p.data.copy_(value)
            safe_set_full_fp32_param(p, value)
        for name, b in _persistent_buffers(module):
            if self.is_main and name in state:
                b.copy_(state[name])
            if self.distributed:
                dist.broadcast(b, src=0)
        self._restore_dir = ckpt_dir

    def optimizer_state_dict(self) -> dict:
        # Moments and fp32 master partitions are in the per-rank DeepSpeed files (`save_sharded_state`).
        return {"scheduler": self.scheduler.state_dict(), "deepspeed_tag": TAG}

    def save_sharded_state(self, ckpt_dir: str) -> None:
        if self.scheduler is None:
            return  # no stage has set up the optimizer: nothing to resume mid-stage
        self.model.save_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag=TAG, save_latest=False)

    def load_optimizer_state_dict(self, state: dict) -> None:
        path = os.path.join(self._restore_dir or "", "deepspeed")
        loaded, _ = self.model.load_checkpoint(path, tag=state.get("deepspeed_tag", TAG), load_module_strict=True,
                                               load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"{path}/{TAG} missing or unreadable: no DeepSpeed optimizer partitions to resume from")
        self.scheduler.load_state_dict(state["scheduler"])

    def frozen_copy(self):
        state = {name: full.to(self._model_dtype) for name, full in self.full_parameters().items()}
        return self._materialize(state)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        # The fp32 master copies (one gather per parameter under ZeRO-2 and ZeRO-3 alike).
        return {name: self._full_fp32(p) for name, p in self.unwrapped().named_parameters()}

    def _keep_output_embedding_gathered(self) -> None:
        """`completion_logprobs` reads the LM-head weight after the model's forward and backward
        needs it again: make it an external parameter of the root module, fetched when the
        model's forward starts and never released by a submodule (embedding, head) finishing; it
        is partitioned again when the optimizer steps (and re-fetched by the next forward)."""
        import deepspeed

        root = self.unwrapped()
        weight = root.get_output_embeddings().weight
        deepspeed.zero.register_external_parameter(root, weight)
        weight.is_external_param = True


def _persistent_buffers(module):
    """(name, buffer) of the buffers a state dict holds (not e.g. rotary inv_freq)."""
    for mod_name, mod in module.named_modules():
        for b_name, b in mod._buffers.items():
            if b is not None and b_name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{b_name}" if mod_name else b_name), b
