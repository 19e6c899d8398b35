"""Rollout generation behind a small interface (our decode loop over HF models now; vLLM/SGLang can plug in)."""

from selfdistill.rollout.base import MetaMode, RolloutBackend, RolloutBatch, build_rollout_backend

__all__ = ["MetaMode", "RolloutBackend", "RolloutBatch", "build_rollout_backend"]
