"""Training stages, one module each, over one shared `StageContext` (selfdistill.stages.context).

`trainer.stages` lists them in order; `STAGES` maps each name to its `run(ctx)`. A stage loop owns
its optimizer (one per stage), its progress bar and its per-step records; the trainer owns the
lifecycle around them (build, resume, run in order, save).
"""

from __future__ import annotations

from selfdistill.stages import eval as eval_stage
from selfdistill.stages import grpo, sdft, sdpo, sft
from selfdistill.stages.context import StageContext, TrainState

STAGES = {"sft": sft.run, "grpo": grpo.run, "sdpo": sdpo.run, "sdft": sdft.run, "eval": eval_stage.run}

__all__ = ["STAGES", "StageContext", "TrainState"]
