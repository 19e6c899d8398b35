"""Checkpoints: an HF directory (safetensors + config + tokenizer) plus the trainer state.

Layout under `<run_dir>/checkpoints/`:

    <stage>-step-000040/          one checkpoint, written atomically
        model.safetensors, config.json, tokenizer files   (AutoModelForCausalLM.from_pretrained works)
        trainer_state.pt           step, stage, sampler, warmup position, optimizer, scheduler
        rng-rank00000.pt ...       every RNG of every rank
        optimizer/ | deepspeed/    FSDP2 / DeepSpeed only: per-rank optimizer shards
        teacher/model.safetensors  an EMA self-teacher's weights (SDPO / SDFT with teacher=ema)
        COMPLETE                   written last, before the rename
    latest                         name of the newest complete checkpoint (replaced atomically)

A checkpoint is first written to a hidden temp directory, its files fsync'ed, then renamed into
place; only then is `latest` replaced. `resume=auto` takes `latest` if it names a directory with
`COMPLETE`, else the newest directory that has one; half-written directories are ignored.
Trainer state is loaded with `torch.load(weights_only=True)`: no pickled code runs on load.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
_NAME = re.compile(r"^(?P<stage>[a-z_]+)-step-(?P<step>\d+)$")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-step-{step:06d}"


def save_checkpoint(run_dir: str, name: str, *, engine, tokenizer, trainer_state: dict, keep_last: int = 0,
                    protect: tuple[str, ...] = (), extra_weights: dict[str, dict] | None = None) -> str:
    """Write checkpoint `name` atomically; every rank calls this (sharded engines gather).
    `extra_weights`: {subdirectory: state dict} of further models (an EMA teacher), written by rank 0
    as `<subdirectory>/model.safetensors` (`read_extra_weights`)."""
    root = os.path.join(run_dir, CKPT_DIR)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}")
    weights = engine.full_state_dict()
    opt_state = engine.optimizer_state_dict() if engine.optimizer is not None else None
    if engine.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        engine.unwrapped().save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "optim": opt_state}, os.path.join(tmp, "trainer_state.pt"))
        for sub, state in (extra_weights or {}).items():
            from safetensors.torch import save_file

            os.makedirs(os.path.join(tmp, sub))
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, sub, "model.safetensors"))
    engine.barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{engine.rank:05d}.pt"))
    engine.save_sharded_state(tmp)  # FSDP2 / DeepSpeed: every rank writes its optimizer shards
    engine.barrier()
    if engine.is_main:
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(name + "\n")
        _fsync_tree(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        latest_tmp = os.path.join(root, ".latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, os.path.join(root, "latest"))
        _fsync_dir(root)
        if keep_last > 0:
            _prune(root, keep_last, protect=protect)
    engine.barrier()
    return final


def _complete_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _NAME.match(n) and os.path.isfile(os.path.join(root, n, COMPLETE))]
    # the step in a name is the run's global step, which only grows, across stages too
    return sorted(names, key=lambda n: int(_NAME.match(n)["step"]))


def _prune(root: str, keep_last: int, protect: tuple[str, ...]) -> None:
    """Keep the newest `keep_last` checkpoints plus the protected ones (e.g. the reference)."""
    names = [n for n in _complete_checkpoints(root) if n not in protect]
    for n in names[:-keep_last] if len(names) > keep_last else []:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def find_latest(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of `run_dir`, or None."""
    root = os.path.join(run_dir, CKPT_DIR)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if _NAME.match(name) and os.path.isfile(os.path.join(root, name, COMPLETE)):
            return os.path.join(root, name)
    names = _complete_checkpoints(root)
    return os.path.join(root, names[-1]) if names else None


def load_trainer_state(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=True)


def load_rng_state(ckpt: str, rank: int) -> None:
    path = os.path.join(ckpt, f"rng-rank{rank:05d}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: the checkpoint was written by fewer ranks; resume with the same world size")
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))


def read_model_weights(ckpt: str) -> dict:
    """The safetensors weights of `ckpt` as one state dict (CPU tensors)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in checkpoint {ckpt}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(ckpt, f)))
    return state


def read_extra_weights(ckpt: str, sub: str) -> dict:
    """The state dict `save_checkpoint(extra_weights={sub: ...})` wrote into `ckpt`."""
    from safetensors.torch import load_file

    path = os.path.join(ckpt, sub, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: checkpoint {ckpt} holds no {sub} weights")
    return load_file(path)


def load_model_weights(model, ckpt: str) -> None:
    """Load safetensors weights of `ckpt` into `model` (strict: every key must match)."""
    state = read_model_weights(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings are saved once; the tied key reappears on load.
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
