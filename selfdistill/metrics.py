"""Metrics sinks: JSONL (always), TensorBoard (optional, on by default), wandb (optional). Rank 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True, wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.rows = 0  # JSONL rows written by this run (checkpointed, see truncate_to)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("trainer.wandb=true needs wandb: pip install 'selfdistill[wandb]'") from e
            self._wandb = wandb.init(project=wandb_project, config=config, dir=run_dir)

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (str, bool)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        self.rows += 1
        for k, v in clean.items():
            if isinstance(v, float) and math.isfinite(v):
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def truncate_to(self, num_rows: int) -> None:
        """Keep the first `num_rows` JSONL rows: drop what a run killed after its last checkpoint
        logged, so a resumed run's file reads as one uninterrupted trajectory."""
        self.rows = num_rows
        if not self.enabled or not os.path.isfile(self.path):
            return
        rows = read_metrics(self.path)
        kept = rows[:num_rows]
        if len(kept) != len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, allow_nan=True) + "\n" for r in kept)
            os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
