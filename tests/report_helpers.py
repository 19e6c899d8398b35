"""Synthetic sweep directories for the report tests: real manifests (selfdistill.manifest) around
hand-written per-sample evaluation rows."""

from __future__ import annotations

import copy
import json
import os

from selfdistill.eval import SAMPLES_FILE
from selfdistill.manifest import RunManifest, write_json_atomic
from tests.conftest import compose_config

_BASE_CFG = None


def base_config():
    global _BASE_CFG
    if _BASE_CFG is None:
        _BASE_CFG = compose_config(["experiment=base"])
    return copy.deepcopy(_BASE_CFG)


def sample_rows(split: str, step: int, correct: list, *, meta: list | None = None, bands: list | None = None,
                domains: list | None = None, samples: int = 1) -> list[dict]:
    """One row per entry of `correct` (problem i = entry i // samples, sample = i % samples)."""
    rows = []
    for idx, c in enumerate(correct):
        i, j = divmod(idx, samples)
        rows.append({"split": split, "step": step, "stage": "grpo", "problem_index": i, "problem_id": f"p{i}", "sample": j,
                     "correct": bool(c), "grade": int(bool(c)), "meta": bool(meta[idx]) if meta else False, "length": 10,
                     "truncated": False, "data_source": "src", "domain": domains[idx] if domains else "algebra",
                     "difficulty": None, "band": bands[idx] if bands else "unknown"})
    return rows


def make_run(root, arm: str, seed: int, rows: list[dict], *, status: str = "finished", overrides: dict | None = None,
             heldout_sha: str = "heldout-hash", heldin_sha: str = "heldin-hash", error: str | None = None) -> str:
    """A run directory `root/<arm>_seed<seed>` with a manifest and the given sample rows."""
    cfg = base_config()
    cfg.reward.name, cfg.experiment_name, cfg.seed = arm, arm, seed
    if arm in ("cf", "asym_cf"):
        cfg.rollout.split_arms = True
    for key, value in (overrides or {}).items():
        node, leaf = key.rsplit(".", 1)
        target = cfg
        for part in node.split("."):
            target = getattr(target, part)
        setattr(target, leaf, value)
    run_dir = os.path.join(str(root), f"{arm}_seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    m = RunManifest(run_dir, cfg)
    m.data.update(status=status, git={"commit": "abc123", "dirty": False},
                  data={"splits": {"heldout": {"n": 10, "sha256": heldout_sha}, "heldin": {"n": 10, "sha256": heldin_sha}}})
    if error:
        m.data["error"] = {"type": "RuntimeError", "message": error, "traceback": ""}
    write_json_atomic(m.path, m.data)
    with open(os.path.join(run_dir, SAMPLES_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return run_dir
