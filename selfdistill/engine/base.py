"""The engine interface: wrap the model, step the optimizer safely, reduce metrics across ranks.

`Engine` itself is the single-process and DDP implementation; FSDP2 and DeepSpeed subclass it.
The optimizer step is guarded (SPEC section 4, issue 6/7): loss and gradients are checked for
finiteness on every rank, the verdict is agreed across ranks, and a non-finite step is either
raised (`trainer.on_nonfinite=raise`, naming step, rank and tensor) or skipped and counted
(`skip`): parameters, optimizer moments and the schedule are left untouched.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from selfdistill.config import Config, StageOptimConfig
from selfdistill.optim import build_optimizer


class NonFiniteError(RuntimeError):
    pass


class Engine:
    name = "single"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = _pick_device(cfg.trainer.device, self.distributed)
        self.model = None
        self.optimizer = None
        self.scheduler = None
        self.skipped_steps = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model and optimizer -------------------------------------------------------------------
    def wrap(self, model):
        model = model.to(self.device)
        if self.distributed and self.name == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model
        return model

    def setup_optimizer(self, stage: StageOptimConfig):
        self.stage_cfg = stage
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), stage)
        return self.optimizer

    def unwrapped(self):
        return getattr(self.model, "module", self.model)

    def no_sync(self):
        """Skip the gradient all-reduce on accumulation micro-steps (DDP)."""
        if self.distributed and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def generation_context(self):
        """Context in which the full parameters are available for `generate` (FSDP2/ZeRO-3 gather)."""
        return contextlib.nullcontext()

    # -- the guarded step ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def step(self, loss_value: float, step: int) -> tuple[bool, float]:
        """Clip, check finiteness on every rank, then apply or refuse the update.

        Returns (applied, grad_norm)."""
        grad_norm = self.clip_grad_norm(self.stage_cfg.grad_clip)
        bad = []
        if not torch.isfinite(torch.tensor(loss_value)):
            bad.append(f"loss={loss_value}")
        if not torch.isfinite(grad_norm):
            first = next((n for n, p in self.unwrapped().named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()), "?")
            bad.append(f"gradient of {first} (grad_norm={float(grad_norm)})")
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            where = f"rank {self.rank}: " + ", ".join(bad) if bad else f"another rank (rank {self.rank} was finite)"
            if self.cfg.trainer.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"non-finite values at optimizer step {step} on {where}; the update was not applied. "
                    "Set trainer.on_nonfinite=skip to skip such steps (they are counted as train/skipped_steps)."
                )
            self.skipped_steps += 1
            return False, float(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True, float(grad_norm)

    # -- cross-rank helpers --------------------------------------------------------------------
    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- checkpoint state ----------------------------------------------------------------------
    def full_state_dict(self) -> dict:
        """Consolidated model weights (every rank calls; rank 0 uses the result)."""
        return self.unwrapped().state_dict()

    def optimizer_state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _pick_device(name: str, distributed: bool) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"trainer.device={name!r} is not valid; choose auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    local = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def build_engine(cfg: Config) -> Engine:
    name = cfg.engine.name
    if name in ("single", "ddp"):
        eng = Engine(cfg)
        eng.name = name
        return eng
    raise NotImplementedError(f"engine.name={name}: not implemented yet; use engine=single or engine=ddp")
