"""Engines under torchrun (CPU, gloo, 2 processes): ddp, fsdp2, deepspeed_zero2, deepspeed_zero3.

The comparison that matters: `torchrun --nproc-per-node 2 ... engine=<name>` trains the same model
as one process with `engine=single` on the same global batch. SFT is deterministic given the data
(the trainer normalizes the loss by the global token count); GRPO rollouts are seeded per prompt
(seed, step, position in the global batch), not per rank, so both runs sample the same completions
and their updates can be compared step by step. Measured on this CPU: losses and grad norms agree to
<=1.5e-7 relative, weights after 4 SFT + 3 GRPO steps to <=1.9e-6 absolute (the order of the gradient
averaging differs); rewards, completion lengths, token counts and lrs are equal exactly. Tolerances
below leave ~10x headroom. Resuming a 2-rank checkpoint with 2 ranks continues bitwise identically.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.metrics import read_metrics
from tests.conftest import compose_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
ARGS = [
    "experiment=demo", "model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128",
    "data.synthetic.num_train=64", "data.synthetic.num_eval=4", "sft.steps=4", "sft.batch_size=8", "sft.warmup_steps=1",
    "grpo.steps=3", "grpo.batch_size=2", "rollout.n=2", "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
    "trainer.stages=[sft,grpo,eval]", "trainer.progress=false", "trainer.tensorboard=false", "trainer.torch_threads=1",
    "trainer.save_every=1", "trainer.keep_last=0", "reward.grader_workers=1", "trainer.device=cpu",
]
# ZeRO-3 keeps parameters below this many elements gathered; 0 makes the tiny model really partitioned.
ENGINE_ARGS = {"deepspeed_zero3": ["engine.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]}
EXACT = ("reward", "accuracy", "completions/mean_length", "num_tokens", "lr", "stage")
CLOSE = ("loss", "sft/loss", "grad_norm", "entropy")  # float reductions in a different order
# entropy is reported as the mean of the ranks' token means, not the global token mean (3e-4 apart here)
RTOL = {"loss": 1e-5, "sft/loss": 1e-5, "grad_norm": 1e-5, "entropy": 1e-2}
WEIGHT_ATOL = 2e-5
UNEVEN_ATOL = 2e-4  # 2% of the lr-sized first Adam step
TIMING = ("perf/",)
MID_GRPO = "grpo-step-000005"  # after 4 SFT steps, the stage-end save, and 1 GRPO step


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd, cwd, timeout=400):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


def _torchrun(engine, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "selfdistill.train", *ARGS, f"engine={engine}", *ENGINE_ARGS.get(engine, []), *extra]


def _final_weights(run_dir):
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    return load_file(os.path.join(run_dir, "checkpoints", latest, "model.safetensors"))


def _rows(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def _assert_same_training(single_run, run, engine, exact=EXACT, rtol=None):
    """Same metrics trajectory (exact where the arithmetic allows) and final weights as one process."""
    rtol = {**RTOL, **(rtol or {})}
    one, two = _rows(single_run), _rows(run)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a.keys() == b.keys()
        if a["stage"] == "eval":  # greedy completions of the held-out prompts, merged over the ranks
            assert a == b, (engine, a, b)
            continue
        for k in exact:
            if k in a:
                assert a[k] == b[k], (engine, a["step"], k, a[k], b[k])
        for k in CLOSE:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=rtol[k], abs=1e-8), (engine, a["step"], k)
    wa, wb = _final_weights(single_run), _final_weights(run)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{engine} {k}: {m}")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    _run([sys.executable, "-m", "selfdistill.train", *ARGS, "engine=single", f"hydra.run.dir={d}"], cwd=d)
    return str(d)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """engine -> run directory of a 2-rank run (started on first use, shared by the tests)."""
    runs = {}

    def get(engine):
        if engine not in runs:
            cwd = tmp_path_factory.mktemp(f"two-ranks-{engine}")
            # No hydra.run.dir: rank 0 picks Hydra's timestamped directory and shares it.
            _run(_torchrun(engine), cwd=cwd)
            found = glob.glob(os.path.join(cwd, "outputs", "*", "*"))
            assert len(found) == 1, f"expected one run directory for both ranks, found {found}"
            assert sorted(os.listdir(cwd)) == ["outputs"], "a rank wrote outside the run directory"
            runs[engine] = found[0]
        return runs[engine]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_match_one_rank(single_run, two_rank_runs, engine):
    run = two_rank_runs(engine)
    assert len(_rows(run)) == len(_rows(single_run)) == 8, "one metrics row per step (and the eval), written by rank 0 only"
    _assert_same_training(single_run, run, engine)

    # One .hydra/ and one log (rank 0's); every rank's shards in the same checkpoint.
    assert os.path.isdir(os.path.join(run, ".hydra")) and os.path.isfile(os.path.join(run, "train.log"))
    assert [f for f in os.listdir(run) if f.endswith(".log")] == ["train.log"]
    ckpt = os.path.join(run, "checkpoints", MID_GRPO)
    assert sorted(glob.glob(os.path.join(ckpt, "rng-rank*.pt"))) == [os.path.join(ckpt, f"rng-rank0000{r}.pt") for r in (0, 1)]
    if engine == "fsdp2":
        assert {os.path.basename(p) for p in glob.glob(os.path.join(ckpt, "optimizer", "*.distcp"))} == {"__0_0.distcp", "__1_0.distcp"}
    if engine.startswith("deepspeed"):
        shards = glob.glob(os.path.join(ckpt, "deepspeed", "zero", "*optim_states.pt"))
        assert len(shards) == 2, shards


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_two_ranks_continues_identically(two_rank_runs, tmp_path, engine):
    run = two_rank_runs(engine)
    _run(_torchrun(engine, f"trainer.resume={os.path.join(run, 'checkpoints', MID_GRPO)}", f"hydra.run.dir={tmp_path}"), cwd=tmp_path)
    resumed = _rows(tmp_path)
    assert [(r["stage"], r["step"]) for r in resumed] == [("grpo", 6), ("grpo", 7), ("eval", 7)]
    assert resumed == [r for r in _rows(run) if r["step"] >= 6]
    wa, wb = _final_weights(run), _final_weights(tmp_path)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (engine, k)


@pytest.mark.slow
def test_sharded_reference_holds_a_slice_and_gathers_the_full_model(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          os.path.join(ROOT, "tests", "dist_helpers.py"), "sharded_reference", str(tmp_path)], cwd=tmp_path)
    for rank in (0, 1):
        r = json.load(open(tmp_path / f"sharded_reference-rank{rank}.json"))
        assert r["gathered_equal"] and r["logits_equal"] and r["released"], r
        # half of every parameter, each rounded up to whole elements
        assert r["total_numel"] / 2 <= r["local_numel"] <= r["total_numel"] / 2 + 64, r


# A scoring arm on 2 ranks: one-step problems whose every SFT solution has a meta block, so the
# scorer gets members (as in tests/test_arms_train.py), plus a KL term on the frozen reference.
META_ARGS = [a for a in ARGS if not a.startswith(("sft.steps=", "data.synthetic.num_train=", "rollout.max_new_tokens="))] + [
    "data.synthetic.num_train=150", "data.synthetic.levels=[1]", "data.synthetic.meta_fraction=1.0", "sft.steps=30",
    "rollout.max_new_tokens=40", "reward.meta_warmup_steps=1", "algo.kl_coef=0.05", "trainer.save_every=0",
]


@pytest.mark.slow
@pytest.mark.parametrize("arm,engine,shard", [("pmi", "fsdp2", True), ("pmi", "deepspeed_zero3", True), ("cf", "ddp", False)])
def test_meta_arm_on_two_ranks_matches_one_process(tmp_path, arm, engine, shard):
    """Scorer passes and split rollouts under a multi-process engine, with the frozen reference
    replicated or sharded (`engine.shard_reference`): the same training as one process."""
    one = tmp_path / "single"
    _run([sys.executable, "-m", "selfdistill.train", *META_ARGS, f"experiment={arm}", "engine=single", f"hydra.run.dir={one}"], cwd=tmp_path)
    two = tmp_path / "two"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "selfdistill.train",
          *META_ARGS, f"experiment={arm}", f"engine={engine}", *ENGINE_ARGS.get(engine, []),
          f"engine.shard_reference={str(shard).lower()}", f"hydra.run.dir={two}"], cwd=tmp_path)
    rows = [r for r in _rows(one) if r["stage"] == "grpo"]
    assert len(rows) == 3 and all(r["reward/meta_weight"] > 0 for r in rows[1:])
    if arm == "pmi":
        assert sum(r.get("scorer/sequences", 0) for r in rows) > 0, "the scorer never ran: the test would prove nothing"
        assert all(r["kl"] >= 0 for r in rows)
    # The scorer batches each rank's rows apart (other padding, other float sums): the meta
    # advantages, a difference of log-prob differences, agree to ~1e-6, the grad norm to ~2e-5.
    _assert_same_training(one, two, engine, exact=(*EXACT, "scorer/sequences", "scorer/tokens", "grader/graded"),
                          rtol={"grad_norm": 2e-4, "loss": 2e-4})


@pytest.mark.slow
def test_torchrun_restart_resumes_in_the_same_run_dir(two_rank_runs, tmp_path):
    """`torchrun --max-restarts 1`: rank 0 dies after a mid-GRPO checkpoint; the restarted job finds
    the same run directory (named from the elastic agent, not the clock), resumes by itself and ends
    exactly where an uninterrupted 2-rank run ends."""
    env = dict(_env(), CRASH_AFTER=MID_GRPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           os.path.join(ROOT, "tests", "elastic_crash_once.py"), *ARGS, "engine=ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "resumed from" in log, log[-3000:]
    found = glob.glob(os.path.join(tmp_path, "outputs", "*", "*"))
    assert len(found) == 1, f"the restart must reuse the first attempt's run directory, found {found}"
    run, reference = found[0], two_rank_runs("ddp")
    assert _rows(run) == _rows(reference)
    wa, wb = _final_weights(reference), _final_weights(run)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_elastic_run_dir_is_stable_across_restarts(monkeypatch):
    from selfdistill.train import elastic_run_dir_arg

    env = {"TORCHELASTIC_RUN_ID": "abc123", "TORCHELASTIC_RESTART_COUNT": "0"}
    first = elastic_run_dir_arg(["train", "experiment=demo"], env)
    again = elastic_run_dir_arg(["train", "experiment=demo"], dict(env, TORCHELASTIC_RESTART_COUNT="1"))
    assert first == again and first.startswith("hydra.run.dir=outputs/") and first.endswith("-${experiment_name}-abc123")
    default_id = elastic_run_dir_arg(["train"], {"TORCHELASTIC_RUN_ID": "none"})
    assert default_id.endswith(f"-pid{os.getppid()}")  # the elastic agent is the workers' parent
    assert elastic_run_dir_arg(["train", "hydra.run.dir=/x"], env) is None  # the user's choice wins
    assert elastic_run_dir_arg(["train"], {}) is None  # not under torchrun: Hydra's default


@pytest.mark.slow
def test_guarded_step_holds_for_every_engine(tmp_path):
    """A NaN on rank 1: skip refuses the update on both ranks (weights, moments, schedule
    untouched, counted, training goes on); raise stops every rank, naming step, rank and tensor."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          os.path.join(ROOT, "tests", "dist_helpers.py"), "guarded_step", str(tmp_path)], cwd=tmp_path)
    ranks = [json.load(open(tmp_path / f"guarded_step-rank{r}.json")) for r in (0, 1)]
    for rank, report in enumerate(ranks):
        assert set(report) == set(ENGINES)
        for engine, r in report.items():
            assert r["first_applied"] and r["after_skip_applied"] and r["after_skip_changed"], (engine, r)
            assert not r["skip_applied"] and r["skipped_steps"] == 1, (engine, r)
            assert r["weights_unchanged"] and r["moments_unchanged"] and r["schedule_unchanged"], (engine, r)
            assert r["raised"] is not None and "optimizer step 7" in r["raised"], (engine, r)
            if rank == 1:
                assert "on rank 1: loss=nan, gradient of model." in r["raised"], (engine, r["raised"])
            if rank == 0:
                assert r["frozen_copy_diff"] == 0.0 and r["frozen_copy_frozen"], (engine, r)


@pytest.mark.slow
def test_ranks_with_unequal_rows_update_like_one_process(tmp_path):
    """Zero-std filtering leaves ranks with different numbers of rows (5 + 1, or 6 + 0): each rank's
    loss is weighted by its share of the global rows (grpo) or tokens (dapo), an empty rank joins
    the step with a zero-weight row, and the update equals one process on all 6 rows; also with
    micro-batches of 2 rows (gradients accumulated; DDP / FSDP2 sync once, DeepSpeed accumulates to
    its boundary), where rank 1 pads its one micro-batch with two zero-weight passes."""
    helper = os.path.join(ROOT, "tests", "dist_helpers.py")
    _run([sys.executable, helper, "uneven_rows", str(tmp_path)], cwd=tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", helper, "uneven_rows",
          str(tmp_path)], cwd=tmp_path)
    for loss_type in ("grpo", "dapo"):
        ref = torch.load(tmp_path / f"uneven-single-{loss_type}-6.pt", weights_only=True)
        for engine in ENGINES:
            for first in ("5", "6", "5-mb2"):
                got = torch.load(tmp_path / f"uneven-{engine}-{loss_type}-{first}.pt", weights_only=True)
                # The global gradient norm (before clipping) sees the loss scale; Adam's first step
                # (~lr * sign(g)) sees the direction, up to elements whose gradient is near eps.
                assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (engine, loss_type, first)
                shared = ref["weights"].keys() & got["weights"].keys()  # a tied lm_head may be left out
                assert len(shared) >= len(ref["weights"]) - 1, (engine, sorted(ref["weights"].keys() - shared))
                for k in shared:
                    v = ref["weights"][k]
                    torch.testing.assert_close(got["weights"][k], v, rtol=0, atol=UNEVEN_ATOL,
                                               msg=lambda m: f"{engine} {loss_type} {first} {k}: {m}")


@pytest.mark.slow
def test_sharded_engines_work_in_one_process(tmp_path):
    """fsdp2 / deepspeed without torchrun (benchmarks): a one-rank group, same numerics as single."""
    _run([sys.executable, os.path.join(ROOT, "tests", "dist_helpers.py"), "world_size_one", str(tmp_path)], cwd=tmp_path)
    report = json.load(open(tmp_path / "world_size_one-rank0.json"))
    for engine in ("fsdp2", "deepspeed_zero2", "deepspeed_zero3"):
        r = report[engine]
        assert r["world_size"] == 1 and r["generated"] == report["single"]["generated"], (engine, r)
        assert r["max_loss_diff"] <= 1e-6 and r["max_weight_diff"] <= 2e-5, (engine, r)
    assert report["fsdp2"]["max_weight_diff"] == 0.0  # one shard: FSDP2 runs the same arithmetic


@pytest.mark.slow
def test_fsdp2_generation_without_gathering_keeps_ranks_in_lockstep(tmp_path):
    """engine.gather_for_generation=false: ranks with different row counts, calls and completion
    lengths all finish (a rank that is done joins its peer's forwards), with the rows one process
    generates from the full model."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          os.path.join(ROOT, "tests", "dist_helpers.py"), "lockstep_generation", str(tmp_path)], cwd=tmp_path, timeout=300)
    r0, r1 = (json.load(open(tmp_path / f"lockstep_generation-rank{r}.json")) for r in (0, 1))
    assert r0["equal"] and r1["equal"], (r0, r1)
    assert r0["forwards"] == r1["forwards"], (r0, r1)
    assert max(max(x) for x in r0["lengths"]) < min(max(x) for x in r1["lengths"]), (r0, r1)  # rank 0 finished first


# -- fast checks ---------------------------------------------------------------------------------

def test_deepspeed_config_is_generated_from_the_hydra_config():
    from selfdistill.engine.deepspeed import deepspeed_config

    cfg = compose_config(["engine=deepspeed_zero3", "engine.mixed_precision=bf16", "sft.lr=3e-4", "sft.grad_clip=0.5",
                          "sft.weight_decay=0.1", "sft.betas=[0.9,0.95]",
                          "+engine.deepspeed.zero_optimization.overlap_comm=false"])
    c = deepspeed_config(cfg, cfg.sft, 3, world_size=4)
    assert c["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                          "weight_decay": 0.1, "torch_adam": True}}
    assert c["gradient_clipping"] == 0.5 and c["bf16"] == {"enabled": True} and c["fp16"] == {"enabled": False}
    assert c["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 100000, "overlap_comm": False}
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * 4
    assert "scheduler" not in c  # the trainer's LambdaLR drives the lr, as for every engine


def test_only_rank_zero_is_a_hydra_run():
    from selfdistill.train import rank_argv

    argv = ["train.py", "experiment=demo", "hydra.run.dir=/tmp/x", "hydra/job_logging=default"]
    assert rank_argv(argv, 0, 2) == argv
    assert rank_argv(argv, 0, 1) == argv
    quiet = rank_argv(argv, 1, 2)
    assert quiet[:2] == ["train.py", "experiment=demo"]
    assert "hydra.run.dir=/tmp/x" not in quiet and "hydra/job_logging=default" not in quiet
    assert {"hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"} <= set(quiet)
    with pytest.raises(SystemExit, match="multirun"):
        rank_argv(["train.py", "-m", "seed=1,2"], 1, 2)


@pytest.mark.parametrize("overrides, match", [
    (["engine=single", "engine.mixed_precision=bf16", "model.dtype=bfloat16"], "set model.dtype=float32"),
    (["engine=fsdp2", "engine.mixed_precision=fp16"], "dynamic loss scaling"),
    (["engine=deepspeed_zero3", "engine.gather_for_generation=false"], "gather_for_generation=false is not supported"),
])
def test_build_engine_rejects_unsupported_settings(overrides, match):
    from selfdistill.engine import build_engine

    with pytest.raises(ValueError, match=match):
        build_engine(compose_config(overrides))


def test_single_engine_under_torchrun_is_refused(monkeypatch):
    from selfdistill.engine import build_engine

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="engine=ddp"):
        build_engine(compose_config(["engine=single"]))


def test_seeded_rollouts_do_not_depend_on_the_batch():
    """Per-row seeds: a row samples the same completion alone, in a batch, or in another order
    (what makes 1-rank and 2-rank GRPO comparable, and a resumed run exact)."""
    from selfdistill.models import load_model_and_tokenizer
    from selfdistill.rollout import MetaMode, build_rollout_backend

    cfg = compose_config(["model.tiny.hidden_size=32", "model.tiny.num_hidden_layers=1", "model.tiny.num_attention_heads=2",
                          "model.tiny.num_key_value_heads=1", "model.tiny.head_dim=16", "model.tiny.intermediate_size=64"])
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(cfg.model)
    backend = build_rollout_backend("hf", model, tok)
    prompts = [tok("Q: 1+2\nA: ")["input_ids"], tok("Q: 17*3\nA: ")["input_ids"], tok("Q: 5\nA: ")["input_ids"]]
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    batch = backend.generate(prompts, [MetaMode.ALLOW] * 3, seeds=[11, 22, 33], **kw)
    torch.manual_seed(123)  # the global RNG plays no part
    alone = [backend.generate([p], [MetaMode.ALLOW], seeds=[s], **kw) for p, s in zip(prompts, (11, 22, 33))]
    reordered = backend.generate(prompts[::-1], [MetaMode.ALLOW] * 3, seeds=[33, 22, 11], **kw)
    for i in range(3):
        assert batch.texts[i] == alone[i].texts[0] == reordered.texts[2 - i]
    assert len(set(backend.generate([prompts[0]] * 4, [MetaMode.ALLOW] * 4, seeds=[1, 2, 3, 4], **kw).texts)) > 1
