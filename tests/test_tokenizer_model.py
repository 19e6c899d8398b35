"""Tokenizer round trip with meta tokens; tiny model save/load; meta tokens added to a real tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.config import ModelConfig, TinyModelConfig
from selfdistill.models import META_CLOSE, META_OPEN, build_char_tokenizer, load_model_and_tokenizer, meta_token_ids
from selfdistill.models.loading import add_meta_tokens
from tests.chatml_helpers import tiny_chatml_checkpoint


def test_char_tokenizer_round_trip_with_meta_tokens(tmp_path):
    tok = build_char_tokenizer()
    text = f"7-3*(2-5)\n{META_OPEN}wait: 7-(-9)=16{META_CLOSE} So \\boxed{{16}}  end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    open_id, close_id = meta_token_ids(tok)
    assert ids.count(open_id) == 1 and ids.count(close_id) == 1
    # one id per character outside the two special tokens
    assert len(ids) == len(text) - len(META_OPEN) - len(META_CLOSE) + 2
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text
    assert again.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=False) == "<|bos|>Q: 1+2\nA: "


def _tiny_cfg():
    return ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64))


def test_tiny_model_save_load_identical_logits(tmp_path):
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(_tiny_cfg())
    model.eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(5, len(tok), (3, 17))
    assert torch.equal(model(x).logits, again(x).logits)
    loaded, tok2 = load_model_and_tokenizer(ModelConfig(path=str(tmp_path), dtype="float32"))
    assert torch.equal(loaded.eval()(x).logits, model(x).logits)
    assert meta_token_ids(tok2) == meta_token_ids(tok)


def test_meta_tokens_added_to_tokenizer_without_them(tmp_path):
    # A "real" checkpoint whose tokenizer lacks the meta tokens: strip them from the char vocab.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3, "<": 4, "|": 5, ">": 6, "m": 7, "e": 8, "t": 9, "/": 10, "?": 11}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    t.pre_tokenizer = pre_tokenizers.FixedLength(length=1)
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="?")
    model, _ = load_model_and_tokenizer(_tiny_cfg())
    model.resize_token_embeddings(len(vocab))
    emb = model.get_input_embeddings().weight.detach().clone()
    added = add_meta_tokens(model, tok)
    assert added == 2
    open_id, close_id = meta_token_ids(tok)
    assert {open_id, close_id} == {12, 13}
    new = model.get_input_embeddings().weight.detach()
    assert new.shape[0] == 14
    assert torch.equal(new[:12], emb)
    # each new row starts at the mean of the old rows
    for row in new[12:]:
        torch.testing.assert_close(row, emb.double().mean(0).float(), rtol=0, atol=1e-6)
    assert tok(f"ab{META_OPEN}a{META_CLOSE}", add_special_tokens=False)["input_ids"] == [2, 3, open_id, 2, close_id]


# ----------------------------------------------------------------------------- a real-looking checkpoint

def _raw_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("tied", [True, False])
def test_meta_rows_on_a_spare_row_vocabulary_equal_the_mean_of_the_trained_rows(tmp_path_factory, tied):
    path = tiny_chatml_checkpoint(tmp_path_factory, spare_rows=64, tied=tied)
    raw = _raw_weights(path)
    original = AutoTokenizer.from_pretrained(path)
    trained = len(original)
    assert META_OPEN not in original.get_vocab() and raw["model.embed_tokens.weight"].shape[0] == trained + 64
    model, tok = load_model_and_tokenizer(ModelConfig(path=path, dtype="float32"))
    ids = list(meta_token_ids(tok))
    assert ids == [trained, trained + 1]  # the first two spare rows: no resize
    keys = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    matrices = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    assert tied == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    for key, w in zip(keys, matrices):
        before = raw[key]
        assert w.shape == before.shape
        mean = before[:trained].double().mean(0)  # the spare rows (untrained) are not in the mean
        assert not torch.allclose(mean, before[trained:].double().mean(0), atol=1e-3)
        for i in ids:
            torch.testing.assert_close(w[i].detach().double(), mean, rtol=0, atol=1e-6)
        rest = [i for i in range(before.shape[0]) if i not in ids]
        assert torch.equal(w.detach()[rest], before[rest])  # every other row untouched
    assert model.training  # the policy trains: HF checkpointing only acts in training mode


def test_meta_rows_without_spare_rows_resize_the_embedding(tmp_path_factory):
    path = tiny_chatml_checkpoint(tmp_path_factory, spare_rows=0, tied=False)
    raw = _raw_weights(path)
    model, tok = load_model_and_tokenizer(ModelConfig(path=path, dtype="float32"))
    trained = raw["model.embed_tokens.weight"].shape[0]
    assert len(tok) == trained + 2 == model.config.vocab_size
    for key, w in (("model.embed_tokens.weight", model.get_input_embeddings().weight),
                   ("lm_head.weight", model.get_output_embeddings().weight)):
        assert w.shape[0] == trained + 2 and torch.equal(w.detach()[:trained], raw[key])
        for i in meta_token_ids(tok):
            torch.testing.assert_close(w[i].detach().double(), raw[key].double().mean(0), rtol=0, atol=1e-6)


def test_chatml_checkpoint_looks_like_a_qwen3_one(tmp_path_factory):
    import json

    from selfdistill.models.chatml import ENDOFTEXT, IM_END, IM_START

    path = tiny_chatml_checkpoint(tmp_path_factory)
    config = json.load(open(os.path.join(path, "config.json")))
    gen = json.load(open(os.path.join(path, "generation_config.json")))
    tok = AutoTokenizer.from_pretrained(path)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["vocab_size"] == len(tok) + 64
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    assert tok.apply_chat_template([{"role": "user", "content": "2+2"}], add_generation_prompt=True, tokenize=False) == (
        f"{IM_START}user\n2+2{IM_END}\n{IM_START}assistant\n")
    # byte-level BPE with Qwen's digit split: a multi-digit answer is one token per digit, and words
    # and punctuation runs merge, so gold/decoy pairs can differ in length (16 vs 6) and position
    ids = tok("\\boxed{16}", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids][-3:] == ["1", "6", "}"] and len(ids) < len("\\boxed{16}")
    assert len(tok("\\boxed{6}", add_special_tokens=False)["input_ids"]) == len(ids) - 1
    assert tok.decode(tok("héllo 7-3*(2-5)\n", add_special_tokens=False)["input_ids"]) == "héllo 7-3*(2-5)\n"
    base = AutoTokenizer.from_pretrained(tiny_chatml_checkpoint(tmp_path_factory, eos="endoftext"))
    assert base.eos_token == ENDOFTEXT  # Qwen3-Base style: only generation_config names <|im_end|>
