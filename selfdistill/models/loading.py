"""Build or load the policy: the tiny from-scratch Qwen3 model, or any HF checkpoint by path.

No downloads: `model.path` must be a local directory. `trust_remote_code` stays off unless the
config sets it. A loaded tokenizer without the meta tokens gets them as special tokens, and the
embedding (and an untied LM head) grows by two rows initialised to the mean embedding, so the new
tokens start as an "average" token rather than noise.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from selfdistill.config import ModelConfig
from selfdistill.models.tokenizer import META_CLOSE, META_OPEN, build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not valid; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen3ForCausalLM:
    t = cfg.tiny
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        tie_word_embeddings=t.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    config._attn_implementation = cfg.attn_implementation
    model = Qwen3ForCausalLM(config)
    return model.to(_dtype(cfg.dtype))


def add_meta_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<|meta|>`/`<|/meta|>` when missing; new embedding rows = mean of the old ones."""
    missing = [t for t in (META_OPEN, META_CLOSE) if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    old = model.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if new > old:
        model.resize_token_embeddings(new, mean_resizing=True)
    return len(missing)


def meta_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    ids = tokenizer.convert_tokens_to_ids([META_OPEN, META_CLOSE])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks the meta tokens {META_OPEN} {META_CLOSE}; load it with load_model_and_tokenizer")
    return ids[0], ids[1]


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if cfg.path is None:
        tokenizer = build_char_tokenizer()
        return build_tiny_model(cfg, tokenizer), tokenizer
    if not os.path.isdir(cfg.path):
        raise FileNotFoundError(
            f"model.path={cfg.path!r} is not a local directory; selfdistill never downloads. "
            "Point it at an HF checkpoint directory (config.json + safetensors + tokenizer)."
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.path,
        dtype=_dtype(cfg.dtype),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,  # weights only from safetensors (no pickle)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_meta_tokens(model, tokenizer)
    return model, tokenizer
