"""Plumbing shared by the result scripts (sdft_recipes.py, sdpo_vs_grpo.py): compose and run an
experiment in this process, share one SFT checkpoint between arms, summarise, print markdown, JSON.

Arms that start "from the same SFT checkpoint" resume from the checkpoint a `trainer.stages=[sft]`
run writes at its end: its trainer state says the SFT stage is done, so an experiment whose stages
start with `sft` continues with its next stage from exactly those weights, sampler and RNG state.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import argparse

import torch
from bench_step import compose  # the benchmark scripts' one way to compose and validate a config

# The tiny settings of `--smoke` (seconds per run on a 2-core CPU): the path runs, the numbers mean nothing.
SMOKE_MODEL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2",
               "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128"]
QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]


def train(overrides: list[str], run_dir: str) -> tuple[list[dict], float]:
    """Run the composed experiment into `run_dir`: (its metrics rows, wall seconds)."""
    from selfdistill.metrics import read_metrics
    from selfdistill.trainer import Trainer

    t0 = time.perf_counter()
    Trainer(compose(overrides), run_dir).run()
    seconds = time.perf_counter() - t0
    path = os.path.join(run_dir, "metrics.jsonl")
    return (read_metrics(path) if os.path.isfile(path) else []), seconds


def sft_checkpoint(overrides: list[str], run_dir: str) -> tuple[str, float]:
    """(the end-of-SFT checkpoint of `overrides` run with only its SFT stage, wall seconds)."""
    from selfdistill import checkpoint as ckpt

    _, seconds = train([*overrides, "trainer.stages=[sft]"], run_dir)
    return ckpt.find_latest(run_dir), seconds


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """The result scripts' command line: seeds, --smoke, threads, run directory, JSON, Hydra overrides;
    `extra(parser)` adds a script's own options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (model init, sampler, rollouts / samples)")
    p.add_argument("--smoke", action="store_true", help="tiny model and 3 steps: exercises the path, measures nothing")
    p.add_argument("--threads", type=int, default=0, help="trainer.torch_threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="directory for the runs (default: a new temporary one)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (key=value)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


def common_overrides(args, smoke: list[str]) -> list[str]:
    """Overrides every run of a result script gets."""
    return [*QUIET, *(smoke if args.smoke else []), *([f"trainer.torch_threads={args.threads}"] if args.threads else []),
            *args.overrides]


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine()),
            "load_avg_1m_at_end": os.getloadavg()[0], "torch": torch.__version__, "python": sys.version.split()[0]}
