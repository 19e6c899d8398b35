"""`manifest.json`: what a run was, in a fixed, versioned schema (seed
`autonomous-post-training-paper.txt`: fixed-schema result manifests make runs comparable).

Written atomically (temporary file, fsync, rename) by rank 0 when the run starts, again when its
data is loaded, and at the end; a crash leaves the last complete version (`running`, or `failed`
with the error), never a half-written file. Schema `selfdistill.manifest/1`:

    schema, run_dir, experiment_name, arm (reward.name), seed, status (running | finished | failed),
    error ({type, message, traceback} or null), started_at, ended_at (ISO 8601 UTC), resumed_from
    (the checkpoint this attempt continued, or null), argv (the command line),
    config (resolved), config_sha256 (of its canonical JSON), git ({commit or "unknown", dirty}),
    code ({sha256, files}: the package's source as it ran, see `code_state`; absent in manifests
    written before it was added), packages ({name: version or null}), grader ({source_sha256, math_verify}),
    decoys ({source_sha256, seed}), data ({source, synthetic generator config or null,
    files: {train|eval|val: {path, sha256}}, splits: {train|heldin|heldout: {n, sha256}}}),
    world_size, hardware ({hostname, platform, python, cpus, device, accelerators}),
    files ({metrics, eval_samples, summary, checkpoints}: paths relative to run_dir)

Versions of the grader and the decoys are the sha256 of the source that defines them
(`rewards/grader.py` + `rewards/regions.py`: how answers are extracted and judged; `data/decoys.py`)
with the math-verify version and the decoy seed: any change to either shows up, whoever made it.
A split's sha256 hashes its rows' id, prompt, gold, data_source, domain and difficulty in order,
so two runs evaluated the same problems exactly when the hashes agree (synthetic data included).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import traceback
from importlib import metadata
from typing import Any, Optional

SCHEMA = "selfdistill.manifest/1"
MANIFEST_FILE = "manifest.json"
PACKAGES = ("selfdistill", "torch", "transformers", "triton", "deepspeed", "hydra-core", "omegaconf", "math-verify",
            "numpy", "safetensors", "flash-attn")
RUN_FILES = {"metrics": "metrics.jsonl", "eval_samples": "eval_samples.jsonl", "summary": "summary.json",
             "checkpoints": "checkpoints"}
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sources_sha256(*relpaths: str) -> str:
    h = hashlib.sha256()
    for rel in relpaths:
        with open(os.path.join(_PKG_DIR, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def package_versions() -> dict[str, Optional[str]]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: str = _PKG_DIR) -> dict:
    """{commit, dirty} of the checkout holding the code that ran; commit "unknown" outside git."""
    def git(*args: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


CODE_PACKAGES = ("selfdistill", "selfdistill.kernels", "selfdistill.conf", "selfdistill.csrc")
CODE_SUFFIXES = (".py", ".yaml", ".cpp", ".cu", ".h", ".cuh")
CODE_PATHS = ("selfdistill", "kernels", "conf", "csrc", "pyproject.toml")  # the same code, as checkout paths


def code_state() -> dict:
    """{sha256, files} of the code that ran: every source file (Python, Hydra configs, C++/CUDA) of
    the package and its mapped subpackages, keyed by its package-relative name, in sorted order.

    The same code hashes the same in a checkout, an editable or a regular install, whatever else the
    checkout holds (README, results) and whether or not it is committed, so the report's twin audit
    compares this rather than git commits (which change with every documentation commit)."""
    import importlib.util

    roots = {}
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = os.path.realpath(list(spec.submodule_search_locations)[0])
    nested = set(roots.values())
    files = {}
    for name, root in roots.items():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                                 and os.path.realpath(os.path.join(dirpath, d)) not in nested)
            for fn in filenames:
                if fn.endswith(CODE_SUFFIXES):
                    path = os.path.join(dirpath, fn)
                    files[f"{name}/{os.path.relpath(path, root)}"] = path
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(key.encode("utf-8") + b"\0" + file_sha256(files[key]).encode("ascii") + b"\0")
    return {"sha256": h.hexdigest(), "files": len(files)}


def hardware(device: Optional[str] = None) -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "device": device, "accelerators": []}
    try:
        import torch

        if torch.cuda.is_available():
            info["accelerators"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001 - hardware facts are best effort, never a reason to fail a run
        pass
    return info


def split_sha256(examples) -> str:
    return canonical_sha256([[ex.id, ex.prompt, ex.gold, ex.data_source, ex.domain, ex.difficulty] for ex in examples])


def describe_data(data_cfg, splits: dict[str, list]) -> dict:
    """The manifest's `data` entry: the generator config (synthetic) or file hashes, and the
    content hash and size of every split the run uses."""
    files = {}
    for name in ("train", "eval", "val"):
        path = getattr(data_cfg, f"{name}_path", None)
        if path and (data_cfg.source == "files" or name == "val"):
            files[name] = {"path": os.path.abspath(path), "sha256": file_sha256(path)}
    synthetic = None
    if data_cfg.source == "synthetic":
        from dataclasses import asdict, is_dataclass

        synthetic = asdict(data_cfg.synthetic) if is_dataclass(data_cfg.synthetic) else dict(data_cfg.synthetic)
    return {"source": data_cfg.source, "synthetic": synthetic, "decoy_seed": data_cfg.decoy_seed, "files": files,
            "splits": {name: {"n": len(rows), "sha256": split_sha256(rows)} for name, rows in splits.items()}}


def write_json_atomic(path: str, obj: Any) -> None:
    """Write `obj` as JSON to `path` so that readers see the old or the new file, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2, default=str, allow_nan=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_manifest(run_dir: str) -> dict:
    with open(os.path.join(run_dir, MANIFEST_FILE)) as f:
        return json.load(f)


# Taken once, when the process imports this module: a process runs the code it imported at its start
# (a Hydra multirun trains every job in one process), whatever happens to the files or the
# checkout's HEAD while it runs.
PROCESS_GIT = git_state()
PROCESS_CODE = code_state()


class RunManifest:
    """The manifest of one run; only the instance with `enabled` (rank 0) writes."""

    def __init__(self, run_dir: str, cfg, *, world_size: int = 1, device: Optional[str] = None, enabled: bool = True):
        from selfdistill.config import to_container

        self.path = os.path.join(run_dir, MANIFEST_FILE)
        self.enabled = enabled
        config = to_container(cfg)
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "run_dir": os.path.abspath(run_dir), "experiment_name": config.get("experiment_name"),
            "arm": config["reward"]["name"], "seed": config["seed"], "status": "running", "error": None,
            "started_at": now(), "ended_at": None, "resumed_from": None, "argv": list(sys.argv),
            "config": config, "config_sha256": canonical_sha256(config), "git": PROCESS_GIT,
            "code": PROCESS_CODE, "packages": package_versions(),
            "grader": {"source_sha256": _sources_sha256("rewards/grader.py", "rewards/regions.py"),
                       "math_verify": metadata.version("math-verify")},
            "decoys": {"source_sha256": _sources_sha256("data/decoys.py"), "seed": config["data"]["decoy_seed"]},
            "data": None, "world_size": world_size, "hardware": hardware(device), "files": dict(RUN_FILES),
        }

    def write(self) -> None:
        if self.enabled:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json_atomic(self.path, self.data)

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def finish(self) -> None:
        self.update(status="finished", ended_at=now())

    def fail(self, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.update(status="failed", ended_at=now(),
                    error={"type": type(exc).__name__, "message": str(exc)[:4000], "traceback": tb[-8000:]})

    @contextlib.contextmanager
    def failure_recorded(self):
        """Mark the manifest failed (with the error) if the body raises, then re-raise."""
        try:
            yield
        except BaseException as e:
            self.fail(e)
            raise
