"""Algorithms: advantages, per-token log-probs of completions, SFT, the GRPO update."""
