"""Dependency direction: `selfdistill.rewards` sits below `selfdistill.algo` (algo/advantages.py
imports the registry's routes; the rewards never import algo, the trainer, evaluation or the
engines). Checked on the import statements of every module of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import selfdistill.rewards

ABOVE_REWARDS = ("selfdistill.algo", "selfdistill.trainer", "selfdistill.eval", "selfdistill.engine", "selfdistill.train")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_rewards_import_nothing_above_them():
    files = sorted(Path(selfdistill.rewards.__file__).parent.glob("*.py"))
    assert len(files) >= 10
    bad = {f.name: sorted(m for m in imported_modules(f) if m.startswith(ABOVE_REWARDS)) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_sees_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from selfdistill.algo.logprobs import unwrap\n")
    assert "selfdistill.algo.logprobs" in imported_modules(f)
