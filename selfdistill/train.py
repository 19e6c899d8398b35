"""Hydra entry point: `selfdistill-train experiment=demo` or `torchrun ... -m selfdistill.train ...`.

Composes the config (typed by `selfdistill.config`, so unknown keys fail here), validates value
ranges, sets up the process group under torchrun (every rank uses rank 0's run directory, and
only rank 0 writes `.hydra/`, logs and metrics), then hands over to the trainer.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from selfdistill.config import ConfigError, register_configs, validate

register_configs()


def _init_distributed(cfg: DictConfig) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = cfg.engine.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)


def _run(cfg: DictConfig) -> dict:
    try:
        validate(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    _init_distributed(cfg)
    run_dir = HydraConfig.get().runtime.output_dir
    from selfdistill.trainer import Trainer

    obj = OmegaConf.to_object(cfg)  # the typed dataclass tree
    return Trainer(obj, run_dir).run()


@hydra.main(version_base="1.3", config_path="pkg://selfdistill.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    _run(cfg)


def main() -> None:
    # Under torchrun every rank must share rank 0's run directory: rank 0 picks it (Hydra's
    # timestamped default) and exports it; torchrun starts ranks together, so the other ranks
    # read the same clock-derived name unless the user fixed hydra.run.dir, which all ranks see.
    _hydra_main()


if __name__ == "__main__":
    main()
