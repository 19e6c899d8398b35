"""Hydra entry point: `selfdistill-train experiment=demo` or `torchrun ... -m selfdistill.train ...`.

Composes the config (typed by `selfdistill.config`, so unknown keys fail here), validates value
ranges, sets up the process group under torchrun, then hands over to the trainer.

Under torchrun every rank composes the same config, but only rank 0 is a Hydra "run": it picks the
run directory (Hydra's timestamped default or the user's `hydra.run.dir`) and writes `.hydra/` and
the log file there. The other ranks run Hydra with the current directory as a throw-away run
directory, no `.hydra/` output and logging disabled, and receive rank 0's directory over the process
group before the trainer starts; every rank then writes its checkpoint shards into that one place.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from selfdistill.config import ConfigError, register_configs, validate

register_configs()

# Overrides that silence Hydra on ranks other than 0: nothing written, no log handlers.
_QUIET_RANK = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")
_OWNED_KEYS = ("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=", "hydra/hydra_logging=")


def rank_argv(argv: list[str], rank: int, world_size: int) -> list[str]:
    """The command line rank `rank` hands to Hydra (argv[0] included).

    Rank 0 keeps it as it is. Other ranks drop their own run-dir / output / logging choices and get
    `_QUIET_RANK`: their Hydra run directory is the current one (already exists, nothing is
    written), and the real run directory arrives from rank 0 (`shared_run_dir`)."""
    if world_size <= 1:
        return list(argv)
    if any(a in ("-m", "--multirun") or a.startswith("hydra.mode=MULTIRUN") for a in argv[1:]):
        raise SystemExit("selfdistill: multirun (-m) under torchrun is not supported; launch sweeps outside torchrun "
                         "(each job may start its own torchrun) or run one configuration per torchrun")
    if rank == 0:
        return list(argv)
    kept = [a for a in argv[1:] if not a.lstrip("+~").startswith(_OWNED_KEYS)]
    return [argv[0], *kept, *_QUIET_RANK]


def _agent_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of process `pid` from /proc; None where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime in clock ticks
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def elastic_run_dir_arg(argv: list[str], env: dict[str, str]) -> str | None:
    """The `hydra.run.dir=...` rank 0 adds under torchrun so that a restarted job (`--max-restarts`)
    lands in the same directory and `trainer.resume=auto` picks up its checkpoints.

    Hydra's default name holds the current time, which changes on every restart. Under torchrun the
    name is built from what survives a restart instead: the elastic agent's start time (the workers'
    parent process) and the rendezvous id (`--rdzv-id`, a fresh uuid with `--standalone`; the agent's
    pid when it is the default "none"). None when not under torchrun or when the user chose
    `hydra.run.dir` themselves."""
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id is None or any(a.lstrip("+~").startswith("hydra.run.dir=") for a in argv[1:]):
        return None
    import time

    agent = os.getppid()
    started = _agent_start_time(agent) or time.time()
    tag = run_id if run_id and run_id != "none" else f"pid{agent}"
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started))
    return f"hydra.run.dir=outputs/{stamp}-${{experiment_name}}-{tag}"


def shared_run_dir(own_run_dir: str) -> str:
    """Rank 0's run directory on every rank (after the process group is up)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return own_run_dir
    box = [os.path.abspath(own_run_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run(cfg: DictConfig) -> dict:
    try:
        validate(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    from selfdistill.engine.base import init_process_group

    init_process_group(cfg)
    run_dir = shared_run_dir(HydraConfig.get().runtime.output_dir)
    from selfdistill.trainer import Trainer

    obj = OmegaConf.to_object(cfg)  # the typed dataclass tree
    try:
        return Trainer(obj, run_dir).run()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="pkg://selfdistill.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    _run(cfg)


def main() -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    argv = list(sys.argv)
    elastic_dir = elastic_run_dir_arg(argv, dict(os.environ))
    if elastic_dir is not None and not any(a in ("-m", "--multirun") for a in argv[1:]):
        argv.append(elastic_dir)
    sys.argv = rank_argv(argv, int(os.environ.get("RANK", "0")), world_size)
    _hydra_main()


if __name__ == "__main__":
    main()
