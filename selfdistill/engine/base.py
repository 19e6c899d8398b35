"""The engine interface: wrap the model, step the optimizer safely, reduce metrics across ranks.

`Engine` itself is the single-process and DDP implementation; FSDP2 (`fsdp2.py`) and DeepSpeed
ZeRO-2/3 (`deepspeed.py`) subclass it. The trainer only ever talks to this interface:

    wrap(model) -> model            shard / replicate; every rank starts from rank 0's weights
    setup_optimizer(stage)          AdamW + the stage's lr schedule (`selfdistill.optim`), per stage
    backward(loss); step(loss, s)   the guarded optimizer step (below)
    generation_context()            full parameters available for `generate` (FSDP2 / ZeRO-3 gather)
    full_state_dict()               consolidated weights for the HF checkpoint (rank 0 uses them)
    load_model_weights(ckpt)        HF checkpoint weights into the (possibly sharded) model
    optimizer_state_dict() / save_sharded_state(dir) / load_optimizer_state_dict(state)
    frozen_copy()                   an unsharded, frozen copy of the policy (reference / scorer)
    full_parameters()               every parameter's full value on every rank (the EMA teacher's blend)

The optimizer step is guarded (SPEC section 4, issue 6/7): loss and gradients are checked for
finiteness on every rank, the verdict is agreed across ranks before anything is applied, and a
non-finite step is either raised (`trainer.on_nonfinite=raise`, naming step, rank and tensor) or
skipped and counted (`skip`): parameters, optimizer moments and the schedule are left untouched.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os

import torch
import torch.distributed as dist

from selfdistill.config import Config, StageOptimConfig
from selfdistill.engine.memory import LOW_PRECISION, enable_activation_checkpointing, enable_autocast, warn_low_precision_training
from selfdistill.optim import build_optimizer
from selfdistill.ops import fused_layers

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16}


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
        self._restore_dir: str | None = None  # checkpoint being resumed (its per-rank optimizer shards)
        self._warned_precision = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model and optimizer -------------------------------------------------------------------
    def wrap(self, model):
        self._prepare(model)
        model = model.to(self.device)
        dtype = MIXED_PRECISION[self.cfg.engine.mixed_precision]
        if dtype is not None:  # fp32 parameters, bf16 compute (selfdistill.engine.memory)
            enable_autocast(model, dtype, self.device.type)
        if self.distributed and self.name == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's parameters here: ranks seed their RNGs differently, so their
            # random inits differ.
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model
        return model

    def setup_optimizer(self, stage: StageOptimConfig):
        self.stage_cfg = stage
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), stage)
        low = [p.dtype for p in self.model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION]
        if low:
            self._warn_low_precision(low[0])
        return self.optimizer

    def _warn_low_precision(self, dtype: torch.dtype) -> None:
        """Warn once per run that the optimizer updates bf16/fp16 weights with no fp32 master copy."""
        if not self._warned_precision:
            self._warned_precision = True
            warn_low_precision_training(dtype, self.name)

    def unwrapped(self):
        return getattr(self.model, "module", self.model)

    def no_sync(self):
        """Skip the gradient all-reduce on accumulation micro-steps (DDP)."""
        if self.distributed and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulation(self, last: bool):
        """Around one micro-batch's forward and backward: gradients are synchronised across ranks only
        on the `last` micro-batch of an optimizer step (earlier ones accumulate locally)."""
        if last:
            yield
            return
        with self.no_sync():
            yield

    def generation_context(self):
        """Context in which the full parameters are available for `generate` (FSDP2/ZeRO-3 gather)."""
        return contextlib.nullcontext()

    # -- the guarded step ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients, before clipping."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads)

    def step(self, loss_value: float, step: int) -> tuple[bool, float]:
        """Check finiteness on every rank, then clip and apply, or refuse the update.

        The check looks at the unclipped gradients (clipping by a NaN norm would spread the NaN to
        every tensor and hide the one that had it). Returns (applied, grad_norm before clipping)."""
        total = self.grad_norm()
        bad = self._local_nonfinite(loss_value, total)
        if self._any_rank(bool(bad)):
            self.optimizer.zero_grad(set_to_none=True)
            return self._refuse(step, bad, float(total))
        if self.stage_cfg.grad_clip > 0:
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, self.stage_cfg.grad_clip, total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True, float(total)

    def _named_local_grads(self):
        """(name, this rank's gradient tensor) for every parameter that has one."""
        for n, p in self.unwrapped().named_parameters():
            if p.grad is not None:
                yield n, p.grad

    def _local_nonfinite(self, loss_value: float, grad_norm: torch.Tensor) -> list[str]:
        """What is non-finite on this rank: the loss, and the first gradient tensor (by name)."""
        bad = []
        if not math.isfinite(loss_value):
            bad.append(f"loss={loss_value}")
        if not torch.isfinite(grad_norm):
            first = next((n for n, g in self._named_local_grads() if not torch.isfinite(g).all()), "?")
            bad.append(f"gradient of {first} (grad_norm={float(grad_norm)})")
        return bad

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (one all-reduce; every rank must call)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _refuse(self, step: int, bad: list[str], grad_norm: float) -> tuple[bool, float]:
        """Raise (on_nonfinite=raise) or count a skipped step; the update was not applied."""
        where = f"rank {self.rank}: " + ", ".join(bad) if bad else f"another rank (rank {self.rank} was finite)"
        if self.cfg.trainer.on_nonfinite == "raise":
            raise NonFiniteError(
                f"non-finite values at optimizer step {step} on {where}; the update was not applied. "
                "Set trainer.on_nonfinite=skip to skip such steps (they are counted as train/skipped_steps)."
            )
        self.skipped_steps += 1
        return False, grad_norm

    # -- cross-rank helpers --------------------------------------------------------------------
    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over the ranks that report each key (a rank may lack a metric, e.g. a reward head
        with no member in its groups). Every rank must call it."""
        if not self.distributed:
            return dict(values)
        sums, counts = self._reduce(values)
        return {k: sums[k] / counts[k] for k in sums if counts[k] > 0}

    def reduce_max(self, values: dict[str, float]) -> dict[str, float]:
        """Max over ranks of each key (every rank must pass the same keys and call it)."""
        if not self.distributed:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.tolist()))

    def reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum over ranks (a missing key counts as 0). Every rank must call it."""
        if not self.distributed:
            return dict(values)
        return self._reduce(values)[0]

    def _reduce(self, values: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        keys = sorted({k for part in self.gather_objects(sorted(values)) for k in part})  # the union, same order
        t = torch.tensor([[float(values.get(k, 0.0)), 1.0 if k in values else 0.0] for k in keys],
                         dtype=torch.float64, device=self.device).reshape(-1, 2)
        dist.all_reduce(t)
        return dict(zip(keys, t[:, 0].tolist())), dict(zip(keys, t[:, 1].tolist()))

    def gather_objects(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank (picklable objects, e.g. metric dicts)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- checkpoint state ----------------------------------------------------------------------
    def full_state_dict(self) -> dict:
        """Consolidated model weights (every rank calls; rank 0 uses the result)."""
        return self.unwrapped().state_dict()

    def load_model_weights(self, ckpt_dir: str) -> None:
        """Load the HF weights of checkpoint `ckpt_dir` (every rank calls); remember it for resume."""
        from selfdistill import checkpoint as ckpt

        ckpt.load_model_weights(self.unwrapped(), ckpt_dir)
        self._restore_dir = ckpt_dir

    def optimizer_state_dict(self) -> dict:
        """Optimizer state that rank 0 stores in trainer_state.pt (sharded engines: the schedule only)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def save_sharded_state(self, ckpt_dir: str) -> None:
        """Every rank writes its own shards into `ckpt_dir` (sharded engines; no-op here)."""

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def frozen_copy(self):
        """An unsharded copy of the current policy on this device, eval mode, no gradients.

        The frozen reference/scorer of SPEC section 1. Sharded engines build it from the
        consolidated weights; `engine.shard_reference` then keeps only a slice of it per rank
        between scoring phases (selfdistill.engine.reference)."""
        return copy.deepcopy(self.unwrapped()).eval().requires_grad_(False)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """{name: the parameter's full value} on every rank, detached; what the EMA self-teacher blends
        in after each applied step (SPEC section 6). Here the parameters themselves (no copy);
        sharded engines gather them (a collective every rank enters)."""
        return {n: p.detach() for n, p in self.unwrapped().named_parameters()}

    # -- helpers for the sharded engines -------------------------------------------------------
    def _prepare(self, model) -> None:
        """Before wrapping (and before any sharding): remember the architecture, apply
        `model.gradient_checkpointing` (selfdistill.engine.memory)."""
        self._remember_architecture(model)
        if self.cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(model)

    def _remember_architecture(self, model) -> None:
        """Class, config and dtype of the plain HF model, to rebuild an unsharded copy later."""
        self._model_cls = type(model)
        self._model_config = getattr(model, "config", None)
        self._model_dtype = next(model.parameters()).dtype

    def _materialize(self, state: dict):
        """A plain model of the wrapped architecture holding `state` (a full state dict)."""
        with torch.device("meta"):
            model = self._model_cls._from_config(copy.deepcopy(self._model_config), dtype=self._model_dtype)
        model = model.to_empty(device=self.device)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = getattr(self._model_config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"consolidated weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if tied:
            model.tie_weights()
        # Non-persistent buffers (rotary inv_freq) are not in a state dict; engines never shard them.
        for name, buf in self.unwrapped().named_buffers():
            model.get_buffer(name).copy_(buf)
        fused_layers.apply_fused_layers(model)  # the layers the policy runs (a deepcopy keeps them too)
        return model.eval().requires_grad_(False)

    def _broadcast_from_rank0(self, model) -> None:
        """Make every rank hold rank 0's parameters and buffers (before sharding)."""
        if not self.distributed or self.world_size == 1:
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)


def default_backend(cfg: Config) -> str:
    """The process-group backend of `engine.backend` (auto: nccl on CUDA, gloo on CPU)."""
    backend = cfg.engine.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "gloo"
    return backend


def init_process_group(cfg: Config) -> None:
    """Join the torchrun process group (WORLD_SIZE > 1); no-op when already initialized."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = default_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and attempt is not None:
        # torchrun's agent store outlives a `--max-restarts` restart, keys included: a restarted rank
        # could read the dead attempt's gloo/NCCL addresses and wait on them until the timeout
        # (seen as a hang in init). A prefix per attempt keeps each attempt's rendezvous apart.
        from torch.distributed.constants import default_pg_timeout

        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                    is_master=False, timeout=default_pg_timeout)
        store = dist.PrefixStore(f"selfdistill/attempt-{attempt}", agent_store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        return
    dist.init_process_group(backend=backend)


def ensure_process_group(cfg: Config) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process (e.g. a benchmark run
    without torchrun): create a single-rank group backed by an in-process store."""
    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group(cfg)
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # what a launcher would set (DeepSpeed reads LOCAL_RANK)
    dist.init_process_group(default_backend(cfg), store=dist.HashStore(), rank=0, world_size=1)


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
    name, mp = cfg.engine.name, cfg.engine.mixed_precision
    if mp not in ("no", "bf16", "fp16"):
        raise ValueError(f"engine.mixed_precision={mp!r} is not valid; choose no or bf16")
    if mp == "fp16":
        raise ValueError("engine.mixed_precision=fp16 needs dynamic loss scaling, which the guarded step does not "
                         "implement; use engine.mixed_precision=bf16 (or no)")
    if name in ("single", "ddp"):
        if name == "single" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("engine=single under torchrun would train independent replicas; use engine=ddp, "
                             "fsdp2, deepspeed_zero2 or deepspeed_zero3")
        eng = Engine(cfg)
        eng.name = name
        return eng
    if name == "fsdp2":
        from selfdistill.engine.fsdp2 import FSDP2Engine

        return FSDP2Engine(cfg)
    if name in ("deepspeed_zero2", "deepspeed_zero3"):
        from selfdistill.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, zero_stage=int(name[-1]))
    raise ValueError(f"engine.name={name!r} is not valid; choose single, ddp, fsdp2, deepspeed_zero2 or deepspeed_zero3")
