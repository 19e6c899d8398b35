"""Prompts as the policy sees them (selfdistill.data.encode_prompt): the chat template and its
kwargs, raw prompts, `data.max_prompt_tokens` filtering at load, and every stage using the run's
data config."""

from __future__ import annotations

import logging

import pytest

from selfdistill.config import ConfigError, DataConfig, SyntheticDataConfig
from selfdistill.data import DataError, drop_long_prompts, encode_prompt, load_splits
from selfdistill.data.example import Example
from selfdistill.models import build_char_tokenizer
from selfdistill.models.chatml import synthetic_corpus, train_bpe_tokenizer
from tests.conftest import TINY_RUN, compose_config


@pytest.fixture(scope="module")
def chatml_tok():
    return train_bpe_tokenizer(synthetic_corpus(300, seed=0), vocab_size=400)


def _ex(q: str, system: str | None = None) -> Example:
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    return Example(id=q, prompt=prompt, gold="1")


def test_chat_template_kwargs_reach_the_template(chatml_tok):
    ex = _ex("7-3*(2-5)")
    plain = chatml_tok.decode(encode_prompt(chatml_tok, ex))
    assert plain == "<|im_start|>user\n7-3*(2-5)<|im_end|>\n<|im_start|>assistant\n"
    off = chatml_tok.decode(encode_prompt(chatml_tok, ex, DataConfig(chat_template_kwargs={"enable_thinking": False})))
    assert off == plain + "<think>\n\n</think>\n\n"  # Qwen3's enable_thinking=false
    on = encode_prompt(chatml_tok, ex, DataConfig(chat_template_kwargs={"enable_thinking": True}))
    assert chatml_tok.decode(on) == plain
    # the key composes from the command line
    cfg = compose_config(["+data.chat_template_kwargs.enable_thinking=false"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert chatml_tok.decode(encode_prompt(chatml_tok, ex, cfg.data)) == off


def test_raw_prompts_skip_the_template(chatml_tok):
    ex = _ex("What is 1+2?", system="Be brief.")
    raw = DataConfig(chat_template=False)
    assert encode_prompt(chatml_tok, ex, raw) == chatml_tok("Be brief.\n\nWhat is 1+2?")["input_ids"]
    with_system = DataConfig(chat_template=False, system_prompt="Think.")
    assert chatml_tok.decode(encode_prompt(chatml_tok, _ex("1+2"), with_system)) == "Think.\n\n1+2"
    with pytest.raises(ConfigError, match="no template to reach"):
        compose_config(["data.chat_template=false", "+data.chat_template_kwargs.enable_thinking=false"])


def test_encode_prompt_wants_the_data_config():
    tok = build_char_tokenizer()
    for bad in (None, "You are a helper."):  # what the earlier signature took in this place
        with pytest.raises(TypeError, match=r"cfg\.data"):
            encode_prompt(tok, _ex("1+2"), bad)


def _char_prompt_len(q: str) -> int:
    """Tokens of the char model's template `<|bos|>Q: {q}\\nA: `: one per character, bos one token."""
    return 1 + len("Q: ") + len(q) + len("\nA: ")


def test_max_prompt_tokens_drops_long_rows_and_counts_them(caplog):
    tok = build_char_tokenizer()
    cfg = DataConfig(synthetic=SyntheticDataConfig(num_train=300, num_eval=60, levels=[1, 2, 3, 4], eval_levels=[1, 4]))
    train, held_out = load_splits(cfg, tok)
    limit = 13  # keeps questions of up to 5 characters: levels 1 and 2 (3 and 5), not 3 / 4 (5-7, 9)
    assert all(_char_prompt_len(ex.prompt[0]["content"]) == len(encode_prompt(tok, ex)) for ex in train[:20])
    expected = [ex.id for ex in train if _char_prompt_len(ex.prompt[0]["content"]) <= limit]
    expected_eval = [ex.id for ex in held_out if _char_prompt_len(ex.prompt[0]["content"]) <= limit]
    assert 0 < len(expected) < len(train) and 0 < len(expected_eval) < len(held_out)
    cfg.max_prompt_tokens = limit
    with caplog.at_level(logging.WARNING, logger="selfdistill.data"):
        kept, kept_eval = load_splits(cfg, tok)
    assert [ex.id for ex in kept] == expected and [ex.id for ex in kept_eval] == expected_eval
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"dropped {len(train) - len(expected)} of {len(train)} train rows" in m for m in messages), messages
    assert any(f"dropped {len(held_out) - len(expected_eval)} of {len(held_out)} held-out rows" in m for m in messages)
    # a limit every row fits logs nothing; a limit no row fits is an error naming the limit and the lengths
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfdistill.data"):
        assert drop_long_prompts(train, tok, DataConfig(max_prompt_tokens=100), "train") == train
    assert not caplog.records
    with pytest.raises(DataError, match=r"data.max_prompt_tokens=9 drops every train row \(300 rows; prompts have 11-17"):
        drop_long_prompts(train, tok, DataConfig(max_prompt_tokens=9), "train")
    with pytest.raises(ValueError, match="pass the tokenizer"):
        load_splits(cfg)
    with pytest.raises(ConfigError, match="max_prompt_tokens=0"):
        compose_config(["data.max_prompt_tokens=0"])


def test_every_stage_encodes_prompts_with_the_run_data_config(tmp_path, monkeypatch):
    """sft, grpo and eval all see the raw prompts of `data.chat_template=false` (no `<|bos|>Q: `)."""
    from selfdistill.rollout.hf import HFRolloutBackend
    from selfdistill.stages import sft as sft_stage
    from selfdistill.trainer import Trainer

    seen: dict[str, list[list[int]]] = {"sft": [], "generate": []}
    real_loss, real_generate = sft_stage.sft_loss, HFRolloutBackend.generate

    def loss_spy(model, prompts, *a, **k):
        seen["sft"].extend(prompts)
        return real_loss(model, prompts, *a, **k)

    def generate_spy(self, prompt_ids, *a, **k):
        seen["generate"].extend(prompt_ids)
        return real_generate(self, prompt_ids, *a, **k)

    monkeypatch.setattr(sft_stage, "sft_loss", loss_spy)
    monkeypatch.setattr(HFRolloutBackend, "generate", generate_spy)
    cfg = compose_config(["experiment=demo", *TINY_RUN, "sft.steps=1", "grpo.steps=1", "eval.num_prompts=4",
                          "data.chat_template=false", "trainer.stages=[sft,grpo,eval]"])
    trainer = Trainer(cfg, str(tmp_path))
    raw = {tuple(trainer.ctx.tokenizer(ex.prompt[0]["content"])["input_ids"]) for ex in trainer.ctx.train_set + trainer.ctx.held_out}
    trainer.run()
    assert len(seen["sft"]) == cfg.sft.batch_size and len(seen["generate"]) == cfg.grpo.batch_size * cfg.rollout.n + 4
    assert all(tuple(p) in raw for p in seen["sft"] + seen["generate"])


def test_teacher_prompts_follow_the_same_data_config(chatml_tok):
    """SDPO/SDFT teacher prompts go through the same encoder: template kwargs and raw mode reach them."""
    from selfdistill.algo.teacher_context import teacher_prompt_ids
    from selfdistill.config import SDPO_TEMPLATE

    ex, demo = _ex("7-3*(2-5)"), chatml_tok("7--9=16. \\boxed{16}", add_special_tokens=False)["input_ids"]
    off = DataConfig(chat_template_kwargs={"enable_thinking": False})
    text = chatml_tok.decode(teacher_prompt_ids(chatml_tok, ex, SDPO_TEMPLATE, demo, data=off))
    assert text.startswith("<|im_start|>user\n7-3*(2-5)\n\nCorrect solution:\n\n7--9=16. \\boxed{16}")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    raw = chatml_tok.decode(teacher_prompt_ids(chatml_tok, ex, SDPO_TEMPLATE, demo, data=DataConfig(chat_template=False)))
    assert raw == SDPO_TEMPLATE.format(prompt="7-3*(2-5)", demonstration="7--9=16. \\boxed{16}")


def test_max_prompt_tokens_filters_a_held_in_file_too(tmp_path):
    from selfdistill.data.loading import save_examples
    from selfdistill.trainer import Trainer

    short, long = _ex("xyz"), _ex("xyzxyzxyzxyz")  # 11 and 20 prompt tokens in the char template (not in train)
    for ex in (short, long):
        ex.data_source = "val"
    save_examples([short, long], tmp_path / "val.jsonl")
    cfg = compose_config(["experiment=demo", *TINY_RUN, f"data.val_path={tmp_path / 'val.jsonl'}", "data.max_prompt_tokens=19"])
    trainer = Trainer(cfg, str(tmp_path / "run"))
    assert [ex.id for ex in trainer.ctx.held_in] == [short.id]
