"""selfdistill: GRPO-family RL and self-distillation on verifiable math."""

__version__ = "0.1.0"
