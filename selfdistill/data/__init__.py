"""Datasets: verl-schema parquet/JSONL files or the synthetic arithmetic task, with decoys."""

from __future__ import annotations

from selfdistill.config import DataConfig
from selfdistill.data.example import Example


def load_splits(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """(train, held_out). Every example carries its decoy, built at load (SPEC section 3)."""
    from selfdistill.data.decoys import make_decoy
    from selfdistill.data.loading import load_examples

    if cfg.source == "synthetic":
        from selfdistill.data.synthetic import generate_splits

        s = cfg.synthetic
        train, held_out = generate_splits(s.num_train, s.num_eval, list(s.levels), list(s.eval_levels), s.meta_fraction, s.seed)
        for ex in train + held_out:
            ex.decoy = make_decoy(ex.gold, cfg.decoy_seed)
        return train, held_out
    train = load_examples(cfg.train_path, decoy_seed=cfg.decoy_seed)
    held_out = load_examples(cfg.eval_path, decoy_seed=cfg.decoy_seed) if cfg.eval_path else []
    return train, held_out


def chat_prompt_text(tokenizer, messages: list[dict], system_prompt: str | None = None) -> str:
    """The chat-templated text of `messages` (the system prompt added unless they have one),
    ending in the assistant's generation prompt."""
    messages = list(messages)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, example: Example, system_prompt: str | None = None) -> list[int]:
    """Chat-templated prompt token ids, exactly as the policy sees them (SPEC section 1)."""
    text = chat_prompt_text(tokenizer, example.prompt, system_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


__all__ = ["Example", "chat_prompt_text", "encode_prompt", "load_splits"]
