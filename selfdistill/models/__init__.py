"""Models: the tiny Qwen3-architecture LM and char tokenizer for CPU runs; any HF checkpoint by path."""

from selfdistill.models.loading import build_tiny_model, load_model_and_tokenizer, meta_token_ids
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN, build_char_tokenizer

__all__ = [
    "META_CLOSE", "META_OPEN", "build_char_tokenizer", "build_tiny_model",
    "load_model_and_tokenizer", "meta_token_ids",
]
