"""The reward-arm sweep (conf/sweep/arms.yaml), the SLURM launcher config, and one real mini sweep
(2 arms x 1 seed, a few steps, through `selfdistill-train -m`) reported by `python -m selfdistill.report`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfdistill.config import validate
from selfdistill.report.writer import SECTIONS
from tests.conftest import TINY_RUN
from tests.test_experiments_compose import ARMS, SPLIT_ARMS, flat, twin_violations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compose(overrides, hydra_cfg=False):
    with initialize_config_module(config_module="selfdistill.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


def test_the_sweep_covers_every_arm_and_three_seeds_with_held_in_validation():
    cfg = _compose(["+sweep=arms"], hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert params.experiment.split(",") == list(ARMS) and params.seed == "1,2,3"
    assert cfg.hydra.sweep.dir == "sweeps/arms"
    assert (cfg.eval.every, cfg.eval.val_size, list(cfg.eval.val_stages)) == (10, 200, ["grpo"])


def test_the_sweep_keeps_the_arms_twins():
    composed = {}
    for arm in ARMS:
        cfg = _compose(["+sweep=arms", f"experiment={arm}", "seed=2"])
        validate(cfg)
        composed[arm] = flat(OmegaConf.to_container(cfg, resolve=True))
        assert composed[arm]["eval.every"] == 10 and composed[arm]["seed"] == 2
    for arm in ARMS:
        assert twin_violations(composed[arm], composed["base"], arm in SPLIT_ARMS) == []


def test_the_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = _compose(["+sweep=arms", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra_cfg=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == ("gpu", 1, 1, 120)


@pytest.mark.slow
def test_a_real_mini_sweep_produces_a_report_with_every_section_and_valid_pngs(tmp_path):
    import matplotlib.image

    sweep = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    train = [sys.executable, "-m", "selfdistill.train", "-m", "+sweep=arms", "experiment=base,pmi", "seed=1", *TINY_RUN,
             "eval.val_size=8", "eval.every=1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p for p in os.listdir(sweep) if not p.endswith(".yaml")) == ["0_base_seed1", "1_pmi_seed1"]
    proc = subprocess.run([sys.executable, "-m", "selfdistill.report", str(sweep), "report.bootstrap_samples=200"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("Twin audit ledger")

    md = (sweep / "report.md").read_text()
    for i, title in enumerate(SECTIONS, start=1):
        assert f"## {i}. {title}" in md, title
    report = json.loads((sweep / "report.json").read_text())
    assert report["arms"] == ["base", "pmi"] and not report["status"]["partial"]
    (entry,) = report["audit"]
    failed = [c for c in entry["checks"] if c["status"] == "fail"]
    assert failed == [], failed  # real twins: config, data, grader, decoys, steps all match
    (pair,) = report["comparisons"]
    assert pair["compared"] and pair["step"] == 7 and pair["problems"] == 8 and pair["heldin_step"] == 7
    assert [p["step"] for p in report["heldin_curves"]["base"]["mean"]] == [4, 5, 6, 7]
    assert set(report["plots"]) == {"val_accuracy", "delta_vs_base", "domains", "bands", "meta_by_band"}
    for rel in report["plots"].values():
        image = matplotlib.image.imread(sweep / rel)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, (rel, image.shape)
        assert image.std() > 0  # not a blank canvas
        assert f"]({rel})" in md
