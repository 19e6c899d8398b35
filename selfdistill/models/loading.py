"""Build or load the policy: the tiny from-scratch Qwen3 model, or any HF checkpoint by path.

No downloads: `model.path` must be a local directory. `trust_remote_code` stays off unless the
config sets it. A loaded tokenizer without the meta tokens gets them as special tokens
(`add_meta_tokens`). Their embedding rows (and the untied LM head's) start at the mean of the
*trained* rows, the ones the original tokenizer uses, so the new tokens start as an "average"
token rather than noise: on spare rows when the embedding already has rows beyond the tokenizer's
length (Qwen3 checkpoints do: 151936 rows for 151669 tokens; spare rows are untrained and are
left out of the mean), else on rows added by resizing the embedding.

A loaded model is put in training mode (from_pretrained returns it in eval mode), as the built tiny
model is: it is the policy, and HF activation checkpointing (`model.gradient_checkpointing`) only
acts on modules in training mode. Rollouts and scorer passes switch to eval mode for their passes.
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
    """Add `<|meta|>`/`<|/meta|>` when missing; their rows = the mean of the trained rows.

    The trained rows are the first `len(tokenizer)` rows before the tokens are added; rows beyond
    them are spare (untrained) and are neither averaged nor kept as the new tokens' values. The
    embedding is resized only when the new tokens do not fit in the existing rows."""
    missing = [t for t in (META_OPEN, META_CLOSE) if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    trained = len(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if trained > rows:
        raise ValueError(f"the tokenizer has {trained} tokens but the model's embedding only {rows} rows; "
                         "the checkpoint's tokenizer and weights do not belong together")
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
    new_ids = tokenizer.convert_tokens_to_ids(missing)
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:  # untied LM head
        matrices.append(head.weight)
    with torch.no_grad():
        for w in matrices:
            w[new_ids] = w[:trained].float().mean(0).to(w.dtype)
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
    return model.train(), tokenizer
