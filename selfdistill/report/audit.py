"""The twin audit ledger (seed `metacognition-rewards.txt`: "is the twin really matched?").

Every arm's run is checked against the base run of the same seed; each check passes, fails or
does not apply (n/a), and a failed check marks the comparison without hiding it:

  base twin      a base run with the same seed exists
  config         the resolved configs differ only in what an arm may change: `reward.*` and its
                 rollout split (`rollout.split_arms`, `rollout.without_mode`), its name
                 (`experiment_name`); operational keys (progress bars, logging, checkpoint
                 cadence, resume) are listed but allowed
  held-out data  the same held-out problems (content hash of the evaluated split)
  held-in data   the same held-in problems
  grader         the same grader source and math-verify version
  decoys         the same decoy source and seed
  steps          the same evaluated (split, step) points
  finished       both runs finished
  code           the same code: equal `code.sha256` (the package's source as it ran); for manifests
                 without it, the same git commit, or two commits that differ only outside the code
                 paths (`selfdistill.manifest.CODE_PATHS`) in this checkout's history; n/a when a
                 commit is unknown or a run had uncommitted changes
"""

from __future__ import annotations

import os
import subprocess
from typing import Optional

from selfdistill.manifest import CODE_PATHS
from selfdistill.report.runs import Run

ARM_KEYS = ("experiment_name", "rollout.split_arms", "rollout.without_mode")
ARM_PREFIXES = ("reward.",)
OPERATIONAL_KEYS = ("trainer.progress", "trainer.tensorboard", "trainer.wandb", "trainer.wandb_project",
                    "trainer.log_every", "trainer.save_every", "trainer.keep_last", "trainer.resume")
ABSENT = "<absent>"


def flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(arm_cfg: dict, base_cfg: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(disallowed, arm-allowed, operational) differences, each {key, base, arm}."""
    a, b = flatten(arm_cfg), flatten(base_cfg)
    bad, arm, ops = [], [], []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if va == vb:
            continue
        entry = {"key": key, "base": vb, "arm": va}
        if key in ARM_KEYS or key.startswith(ARM_PREFIXES):
            arm.append(entry)
        elif key in OPERATIONAL_KEYS:
            ops.append(entry)
        else:
            bad.append(entry)
    return bad, arm, ops


def _check(name: str, status: str, detail: str) -> dict:
    return {"check": name, "status": status, "detail": detail}


def _equal(name: str, what: str, a, b) -> dict:
    if a == b:
        return _check(name, "pass", f"identical {what}")
    return _check(name, "fail", f"{what} differ: base {b!r} vs arm {a!r}")


def _split_hash(run: Run, split: str) -> Optional[str]:
    entry = ((run.manifest.get("data") or {}).get("splits") or {}).get(split)
    return entry["sha256"] if entry and entry.get("n") else None


def _eval_points(run: Run) -> list[tuple[str, int]]:
    return sorted({(r["split"], r["step"]) for r in run.samples})


def code_changed_between(a: str, b: str, repo: str) -> Optional[bool]:
    """Whether commits `a` and `b` differ in a code path (`CODE_PATHS`), per the git history of the
    checkout at `repo`; None when that history does not hold both commits."""
    try:
        proc = subprocess.run(["git", "diff", "--quiet", a, b, "--", *CODE_PATHS], cwd=repo, capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: False, 1: True}.get(proc.returncode)


def code_check(arm_manifest: dict, base_manifest: dict, repo: Optional[str] = None) -> dict:
    """The `code` check of a pair (module docstring); `repo`: the checkout whose git history decides
    whether two commits differ in code (default: the one holding this package)."""
    ca, cb = arm_manifest.get("code") or {}, base_manifest.get("code") or {}
    if ca.get("sha256") and cb.get("sha256"):
        return _equal("code", f"source hashes ({ca.get('files')} / {cb.get('files')} files)", ca["sha256"], cb["sha256"])
    ga, gb = arm_manifest.get("git") or {}, base_manifest.get("git") or {}
    a, b = ga.get("commit"), gb.get("commit")
    if "unknown" in (a, b) or None in (a, b) or ga.get("dirty") or gb.get("dirty"):
        return _check("code", "n/a", f"cannot verify: commits {b} / {a}, uncommitted changes {gb.get('dirty')} / "
                                     f"{ga.get('dirty')}")
    if a == b:
        return _check("code", "pass", "identical git commits")
    changed = code_changed_between(b, a, repo or os.path.dirname(os.path.abspath(__file__)))
    if changed is False:
        return _check("code", "pass", f"commits {b[:12]} / {a[:12]} differ only outside {', '.join(CODE_PATHS)}")
    why = "differ in code" if changed else "differ and this checkout's history does not hold both"
    return _check("code", "fail", f"git commits {why}: base {b!r} vs arm {a!r}")


def audit_pair(arm: Run, base: Optional[Run]) -> dict:
    """The ledger entry of one arm run against its base twin."""
    if base is None:
        checks = [_check("base twin", "fail", f"no base run with seed {arm.seed}")]
        return {"run": arm.name, "arm": arm.arm, "seed": arm.seed, "base_run": None, "checks": checks, "passed": False,
                "config_differences": {"disallowed": [], "arm": [], "operational": []}}
    bad, arm_diff, ops = config_differences(arm.manifest["config"], base.manifest["config"])
    checks = [_check("base twin", "pass", base.path)]
    shown = ", ".join(f"{d['key']}: base={d['base']!r} arm={d['arm']!r}" for d in bad)
    checks.append(_check("config", "fail", f"{len(bad)} key(s) differ beyond the arm: {shown}") if bad else
                  _check("config", "pass", f"differs only in {', '.join(d['key'] for d in arm_diff) or 'nothing'}"
                                           + (f" (operational: {', '.join(d['key'] for d in ops)})" if ops else "")))
    checks.append(_equal("held-out data", "held-out split hashes", _split_hash(arm, "heldout"), _split_hash(base, "heldout")))
    checks.append(_equal("held-in data", "held-in split hashes", _split_hash(arm, "heldin"), _split_hash(base, "heldin")))
    checks.append(_equal("grader", "grader versions", arm.manifest.get("grader"), base.manifest.get("grader")))
    checks.append(_equal("decoys", "decoy versions", arm.manifest.get("decoys"), base.manifest.get("decoys")))
    pa, pb = _eval_points(arm), _eval_points(base)
    checks.append(_check("steps", "pass", f"{len(pa)} evaluated (split, step) points in both") if pa == pb else
                  _check("steps", "fail", f"evaluated points differ: only base {sorted(set(pb) - set(pa))}, "
                                          f"only arm {sorted(set(pa) - set(pb))}"))
    checks.append(_check("finished", "pass", "both finished") if arm.finished and base.finished else
                  _check("finished", "fail", f"base {base.status}, arm {arm.status}"))
    checks.append(code_check(arm.manifest, base.manifest))
    return {"run": arm.name, "arm": arm.arm, "seed": arm.seed, "base_run": base.name, "checks": checks,
            "passed": all(c["status"] != "fail" for c in checks),
            "config_differences": {"disallowed": bad, "arm": arm_diff, "operational": ops}}


def audit_ledger(runs: dict[tuple[str, int], Run], base_arm: str) -> list[dict]:
    """One entry per non-base run, in (arm, seed) order."""
    return [audit_pair(run, runs.get((base_arm, seed))) for (arm, seed), run in sorted(runs.items()) if arm != base_arm]
