"""Memory-control checks on 2 ranks, run by tests/test_memory_controls.py:

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 tests/dist_memory_helpers.py OUT

- fsdp2 and deepspeed_zero3, with and without `model.gradient_checkpointing`: loss and the full
  (consolidated) gradient of one backward on each rank's half of a fixed batch, and how often a
  layer's projection ran (1 plain, 2 when the layer is recomputed in backward);
- ddp with `engine.mixed_precision=bf16`: parameter / optimizer-state / compute dtypes after a step
  and a digest of the weights (equal on both ranks).

Each rank writes OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selfdistill.engine import build_engine  # noqa: E402
from selfdistill.models import load_model_and_tokenizer  # noqa: E402
from tests.conftest import compose_config  # noqa: E402
from tests.dist_helpers import ENGINE_EXTRA, TINY_MODEL, loss_on  # noqa: E402


def make(name: str, *overrides: str):
    cfg = compose_config([*TINY_MODEL, f"engine={name}", *ENGINE_EXTRA.get(name, []), *overrides])
    torch.manual_seed(0)
    engine = build_engine(cfg)
    model, _ = load_model_and_tokenizer(cfg.model)
    calls = [0]
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    engine.wrap(model)
    engine.setup_optimizer(cfg.sft)
    return engine, calls


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (summed over ranks), on every rank."""
    out = {}
    for name, p in engine.unwrapped().named_parameters():
        if engine.name.startswith("deepspeed"):
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = g.detach().float().cpu().clone()
    return out


def checkpointing(name: str) -> dict:
    losses, grads, calls = {}, {}, {}
    for label, extra in (("plain", ()), ("checkpointed", ("model.gradient_checkpointing=true",))):
        engine, count = make(name, *extra)
        loss = loss_on(engine, step=0)
        engine.backward(loss)
        losses[label], grads[label], calls[label] = float(loss), full_grads(engine), count[0]
    diff = max(float((grads["plain"][k] - grads["checkpointed"][k]).abs().max()) for k in grads["plain"])
    scale = max(float(g.abs().max()) for g in grads["plain"].values())
    return {"loss": losses, "calls": calls, "grad_max_abs_diff": diff, "grad_max_abs": scale}


def ddp_bf16() -> dict:
    engine, _ = make("ddp", "engine.mixed_precision=bf16")
    compute = []
    engine.unwrapped().model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: compute.append(str(o.dtype)))
    loss = loss_on(engine, step=0)
    engine.backward(loss)
    applied, _ = engine.step(float(loss), 0)
    model = engine.unwrapped()
    states = {str(v.dtype) for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()}
    return {"param_dtypes": sorted({str(p.dtype) for p in model.parameters()}), "state_dtypes": sorted(states),
            "compute_dtype": compute[0], "applied": applied,
            "weights_digest": [float(p.detach().double().sum()) for p in model.parameters()]}


def main(out: str) -> None:
    result = {name: checkpointing(name) for name in ("fsdp2", "deepspeed_zero3")}
    result["ddp_bf16"] = ddp_bf16()
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
