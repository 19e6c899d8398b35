"""Datasets: verl-schema parquet/JSONL files or the synthetic arithmetic task, with decoys; the
prompt as the policy sees it (`encode_prompt`)."""

from __future__ import annotations

import logging

from selfdistill.config import DataConfig
from selfdistill.data.example import DataError, Example

log = logging.getLogger(__name__)


def load_splits(cfg: DataConfig, tokenizer=None) -> tuple[list[Example], list[Example]]:
    """(train, held_out). Every example builds its decoy (SPEC section 3) from (gold,
    `data.decoy_seed`) when first read. With `data.max_prompt_tokens`, rows whose encoded prompt is
    longer are dropped (`drop_long_prompts`; needs `tokenizer`)."""
    from selfdistill.data.loading import load_examples

    if cfg.source == "synthetic":
        from selfdistill.data.synthetic import generate_splits

        s = cfg.synthetic
        train, held_out = generate_splits(s.num_train, s.num_eval, list(s.levels), list(s.eval_levels), s.meta_fraction, s.seed)
        for ex in train + held_out:
            ex.decoy_seed = cfg.decoy_seed
    else:
        train = load_examples(cfg.train_path, decoy_seed=cfg.decoy_seed)
        held_out = load_examples(cfg.eval_path, decoy_seed=cfg.decoy_seed) if cfg.eval_path else []
    if cfg.max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("load_splits: data.max_prompt_tokens is set, so the prompts must be tokenized; pass the tokenizer")
        train = drop_long_prompts(train, tokenizer, cfg, "train")
        held_out = drop_long_prompts(held_out, tokenizer, cfg, "held-out") if held_out else held_out
    return train, held_out


def drop_long_prompts(examples: list[Example], tokenizer, cfg: DataConfig, split: str) -> list[Example]:
    """The rows whose encoded prompt (`encode_prompt`, as the policy sees it) has at most
    `data.max_prompt_tokens` tokens. The dropped rows are counted and logged; a split left empty is
    an error naming the limit and the range of prompt lengths."""
    limit = cfg.max_prompt_tokens
    lengths = [len(encode_prompt(tokenizer, ex, cfg)) for ex in examples]
    kept = [ex for ex, n in zip(examples, lengths) if n <= limit]
    dropped = len(examples) - len(kept)
    if not kept:
        raise DataError(f"data.max_prompt_tokens={limit} drops every {split} row ({len(examples)} rows; prompts have "
                        f"{min(lengths)}-{max(lengths)} tokens as the policy sees them); raise the limit or set it to null")
    if dropped:
        log.warning("data.max_prompt_tokens=%d: dropped %d of %d %s rows (%.2f%%; the longest prompt has %d tokens)",
                    limit, dropped, len(examples), split, 100.0 * dropped / len(examples), max(lengths))
    return kept


_DEFAULT_DATA = DataConfig()


def chat_prompt_text(tokenizer, messages: list[dict], data: DataConfig = _DEFAULT_DATA) -> str:
    """The prompt text of `messages` as the policy sees it, per the data config: `data.system_prompt`
    prepended when they have no system message; with `data.chat_template` (default) the tokenizer's
    chat template, ending in the assistant's generation prompt, with `data.chat_template_kwargs`;
    without it the raw prompt, the messages' contents joined by a blank line. Without `data` the
    defaults apply (tests, tools); a run passes its `cfg.data`."""
    if data is None or isinstance(data, str):  # the earlier signature took the system prompt here
        raise TypeError(f"the prompt encoders take the run's data config (cfg.data), got {type(data).__name__} "
                        f"{data!r}; the system prompt is cfg.data.system_prompt")
    messages = list(messages)
    if data.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": data.system_prompt}] + messages
    if not data.chat_template:
        return "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **dict(data.chat_template_kwargs))


def encode_prompt(tokenizer, example: Example, data: DataConfig = _DEFAULT_DATA) -> list[int]:
    """Prompt token ids exactly as the policy sees them (SPEC section 1): `chat_prompt_text`
    tokenized; a raw prompt with the special tokens the tokenizer adds (e.g. a BOS), a templated
    one as the template wrote it."""
    text = chat_prompt_text(tokenizer, example.prompt, data)
    return tokenizer(text, add_special_tokens=not data.chat_template)["input_ids"]


__all__ = ["DataError", "Example", "chat_prompt_text", "drop_long_prompts", "encode_prompt", "load_splits"]
