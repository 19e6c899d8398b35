"""manifest.json (selfdistill.manifest): written at start, rewritten at the end, `failed` with the
error when a stage raises, atomic, and complete enough to audit a twin."""

from __future__ import annotations

import json
import os

import pytest

from selfdistill import manifest as mf
from selfdistill.config import to_container
from selfdistill.stages import STAGES
from selfdistill.trainer import Trainer


def _read(run_dir):
    with open(os.path.join(run_dir, "manifest.json")) as f:
        return json.load(f)


def test_a_finished_run_has_a_complete_manifest(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(["trainer.stages=[sft,eval]", "eval.val_size=4"])
    seen, real_eval = {}, STAGES["eval"]

    def spy_eval(ctx):  # the manifest while the run is going
        seen.update(_read(tmp_path))
        real_eval(ctx)

    monkeypatch.setitem(STAGES, "eval", spy_eval)
    Trainer(cfg, str(tmp_path)).run()
    assert seen["status"] == "running" and seen["ended_at"] is None and seen["data"] is not None
    m = _read(tmp_path)
    assert m["schema"] == mf.SCHEMA and m["status"] == "finished" and m["error"] is None
    assert m["started_at"] <= m["ended_at"]
    assert m["config"] == json.loads(json.dumps(to_container(cfg)))
    assert m["config_sha256"] == mf.canonical_sha256(to_container(cfg))
    assert (m["arm"], m["seed"], m["world_size"], m["experiment_name"]) == ("base", 0, 1, "demo")
    assert m["packages"]["torch"] and m["packages"]["math-verify"] and m["packages"]["hydra-core"]
    assert len(m["git"]["commit"]) == 40 or m["git"]["commit"] == "unknown"
    assert m["code"] == mf.code_state() == mf.PROCESS_CODE and m["code"]["files"] > 50 and m["git"] == mf.PROCESS_GIT
    assert set(m["grader"]) == {"source_sha256", "math_verify"} and m["decoys"]["seed"] == 42
    assert m["data"]["source"] == "synthetic" and m["data"]["synthetic"]["num_train"] == 64
    splits = m["data"]["splits"]
    assert (splits["train"]["n"], splits["heldin"]["n"], splits["heldout"]["n"]) == (60, 4, 8)
    assert m["hardware"]["cpus"] >= 1 and m["hardware"]["device"] == "cpu"
    for key in ("metrics", "eval_samples", "summary"):
        assert os.path.isfile(os.path.join(tmp_path, m["files"][key])), key
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_the_same_data_hashes_alike_and_a_changed_row_does_not(tiny_config, tmp_path):
    from selfdistill.data import load_splits

    cfg = tiny_config()
    _, held_out = load_splits(cfg.data)
    again = load_splits(cfg.data)[1]
    assert mf.split_sha256(held_out) == mf.split_sha256(again)
    again[3].gold = "999"
    assert mf.split_sha256(held_out) != mf.split_sha256(again)


def test_a_failing_stage_leaves_failed_with_the_error(tiny_config, tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("planted failure in grpo")

    monkeypatch.setitem(STAGES, "grpo", boom)
    trainer = Trainer(tiny_config(["trainer.stages=[sft,grpo]"]), str(tmp_path))
    with pytest.raises(RuntimeError, match="planted failure"):
        trainer.run()
    m = _read(tmp_path)
    assert m["status"] == "failed" and m["ended_at"]
    assert m["error"]["type"] == "RuntimeError" and m["error"]["message"] == "planted failure in grpo"
    assert "boom" in m["error"]["traceback"]


def test_a_failure_while_building_is_recorded(tiny_config, tmp_path, monkeypatch):
    import selfdistill.trainer as trainer_mod

    def no_data(*_):
        raise FileNotFoundError("train.parquet: no such file")

    monkeypatch.setattr(trainer_mod, "load_splits", no_data)
    with pytest.raises(FileNotFoundError):
        Trainer(tiny_config(), str(tmp_path))
    m = _read(tmp_path)
    assert m["status"] == "failed" and m["error"]["type"] == "FileNotFoundError" and m["data"] is None


def test_writes_are_atomic(tmp_path):
    path = str(tmp_path / "manifest.json")
    mf.write_json_atomic(path, {"status": "running"})

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError, match="cannot serialise"):
        mf.write_json_atomic(path, {"status": "finished", "bad": Unprintable()})
    assert json.load(open(path)) == {"status": "running"}  # the old complete file, not a part of the new one
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_git_commit_is_unknown_outside_a_checkout(tmp_path):
    assert mf.git_state(str(tmp_path)) == {"commit": "unknown", "dirty": None}


def test_code_hash_covers_the_package_sources_only(tmp_path, monkeypatch):
    pkg = tmp_path / "codepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("a = 1\n")
    (pkg / "conf.yaml").write_text("k: 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mf, "CODE_PACKAGES", ("codepkg",))
    first = mf.code_state()
    assert first["files"] == 3
    (pkg / "NOTES.md").write_text("docs are not code\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.py").write_text("cached\n")
    assert mf.code_state() == first
    (pkg / "sub" / "a.py").write_text("a = 2\n")
    changed = mf.code_state()
    assert changed["sha256"] != first["sha256"] and changed["files"] == 3
    (pkg / "sub" / "a.py").write_text("a = 1\n")
    assert mf.code_state() == first  # content, not modification time
