"""Tiny Qwen3/BPE/ChatML checkpoints (selfdistill.models.chatml) for tests, built once per session
and shape."""

from __future__ import annotations

import os

from selfdistill.config import TinyModelConfig
from selfdistill.models.chatml import ChatMLCheckpointConfig, build_chatml_checkpoint

TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  intermediate_size=128, max_position_embeddings=512)


def tiny_chatml_checkpoint(tmp_path_factory, *, spare_rows: int = 64, tied: bool = True, eos: str = "im_end") -> str:
    """The directory of a tiny checkpoint (vocabulary 400 trained on 1000 synthetic rows)."""
    root = tmp_path_factory.getbasetemp() / "chatml"
    path = root / f"spare{spare_rows}-{'tied' if tied else 'untied'}-{eos}"
    if not (path / "config.json").exists():
        cfg = ChatMLCheckpointConfig(vocab_size=400, spare_rows=spare_rows, eos=eos, corpus_rows=1000,
                                     model=TinyModelConfig(**TINY_SHAPE, tie_word_embeddings=tied))
        build_chatml_checkpoint(str(path), cfg)
    return os.fspath(path)
