"""Finding and reading the runs of a sweep: every directory below the given ones that holds a
`manifest.json` (selfdistill.manifest), with its evaluated samples (`eval_samples.jsonl`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from selfdistill.eval import HELD_IN, HELD_OUT, SAMPLES_FILE
from selfdistill.manifest import MANIFEST_FILE, SCHEMA


@dataclass
class Run:
    path: str
    manifest: dict
    samples: list[dict] = field(default_factory=list)

    @property
    def arm(self) -> str:
        return self.manifest["arm"]

    @property
    def seed(self) -> int:
        return self.manifest["seed"]

    @property
    def status(self) -> str:
        return self.manifest["status"]

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"

    def steps(self, split: str) -> list[int]:
        return sorted({r["step"] for r in self.samples if r["split"] == split})

    def rows(self, split: str, step: int) -> list[dict]:
        return [r for r in self.samples if r["split"] == split and r["step"] == step]

    def accuracy(self, split: str, step: int) -> float:
        rows = self.rows(split, step)
        return sum(r["correct"] for r in rows) / len(rows)

    def last_step(self, split: str) -> Optional[int]:
        steps = self.steps(split)
        return steps[-1] if steps else None


def read_samples(path: str) -> list[dict]:
    """Rows of an `eval_samples.jsonl`; a sample evaluated twice at one step (a resumed run repeats
    the evaluations after its last checkpoint) keeps its last row."""
    if not os.path.isfile(path):
        return []
    latest: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                latest[(r["split"], r["step"], r["problem_index"], r["sample"])] = r
    return list(latest.values())


def load_run(path: str) -> Run:
    with open(os.path.join(path, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    if manifest.get("schema") != SCHEMA:
        raise ValueError(f"{path}/{MANIFEST_FILE}: schema {manifest.get('schema')!r}, this report reads {SCHEMA!r}")
    return Run(path, manifest, read_samples(os.path.join(path, manifest["files"].get("eval_samples", SAMPLES_FILE))))


def find_runs(paths: list[str]) -> tuple[list[Run], list[tuple[str, str]]]:
    """(runs found below `paths`, [(directory, why it was skipped)]). A directory with a
    metrics.jsonl but no manifest is listed as skipped (a run from before manifests, or not started)."""
    runs, skipped = [], []
    for root in paths:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"selfdistill-report: {root!r} is not a directory; pass a multirun directory or run directories")
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in ("checkpoints", "tensorboard", ".hydra", "plots"))
            if MANIFEST_FILE in files:
                try:
                    runs.append(load_run(d))
                except (ValueError, KeyError, json.JSONDecodeError) as e:
                    skipped.append((d, str(e)))
                dirs[:] = []
            elif "metrics.jsonl" in files:
                skipped.append((d, f"no {MANIFEST_FILE}"))
    return runs, skipped


__all__ = ["HELD_IN", "HELD_OUT", "Run", "find_runs", "load_run", "read_samples"]
