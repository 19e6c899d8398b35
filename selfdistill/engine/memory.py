"""Precision and activation-memory options every engine applies to the plain HF model it wraps.

- `enable_activation_checkpointing` (`model.gradient_checkpointing`): HF's own per-decoder-layer
  checkpointing, non-reentrant. It checkpoints each layer's `forward`, not its `__call__`, so
  module hooks stay outside the recomputed region: FSDP2's per-layer all-gather hooks (the engine
  applies `fully_shard` after this) and ZeRO-3's per-module parameter fetch hooks run once in
  forward and are re-run by their own backward hooks, never twice inside a replay. The recompute
  repeats the same ops on the same inputs, so loss and gradients are those of the plain model.
- `enable_autocast` (`engine.mixed_precision=bf16` on `single` / `ddp`): every forward of the
  policy runs under `torch.autocast(bf16)` (matmuls in bf16, reductions and norms in fp32); the
  parameters stay fp32, so gradients, the optimizer's master weights and its moments are fp32.
  It wraps the model's own `forward`, so training, rollouts and the behaviour/old log-probs all see
  the same numerics (a ratio of 1 on-policy), and the frozen reference copied from the policy
  computes like it. What runs outside the model's forward, the fused LM-head log-prob op of
  `selfdistill.algo.logprobs`, takes the fp32 final hidden states and the fp32 head weight.
  (FSDP2 has its own MixedPrecisionPolicy and DeepSpeed its bf16 mode: `engine.fsdp2`,
  `engine.deepspeed`.)
- `warn_low_precision_training`: AdamW on bf16/fp16 parameters has no fp32 master copy.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def enable_activation_checkpointing(model) -> None:
    """Turn on HF activation checkpointing (non-reentrant) on every decoder layer of `model`."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.gradient_checkpointing=true but {type(model).__name__} does not support HF "
                         "activation checkpointing; set model.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def enable_autocast(model, dtype: torch.dtype, device_type: str) -> None:
    """Run every forward of `model` under `torch.autocast(device_type, dtype)`.

    The instance's `forward` becomes a bound wrapper of the class's: `copy.deepcopy` rebinds it to
    the copy (the frozen reference), and `inspect.signature` still sees the real parameters (HF
    `generate` reads them, e.g. to pass `logits_to_keep`)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError(f"engine.mixed_precision=bf16 keeps fp32 master weights, but the model has "
                         f"{sorted({str(p.dtype) for p in model.parameters()})} parameters; set model.dtype=float32")
    forward = type(model).forward

    @functools.wraps(forward)
    def autocast_forward(self, *args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(self, *args, **kwargs)

    model.forward = types.MethodType(autocast_forward, model)


def warn_low_precision_training(dtype: torch.dtype, engine: str) -> None:
    """The warning for an optimizer over bf16/fp16 parameters (the caller warns once per run)."""
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))
    warnings.warn(
        f"model.dtype={name} with an optimizer on engine={engine}: AdamW updates the {name} weights in place, with "
        f"no fp32 master copy, so any update smaller than about 1/256 of a weight rounds away (lr 1e-6 does "
        f"nothing). Set model.dtype=float32 engine.mixed_precision=bf16: bf16 compute, fp32 master weights and "
        f"optimizer state.", UserWarning, stacklevel=3)
