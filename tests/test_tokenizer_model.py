"""Tokenizer round trip with meta tokens; tiny model save/load; meta tokens added to a real tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.config import ModelConfig, TinyModelConfig
from selfdistill.models import META_CLOSE, META_OPEN, build_char_tokenizer, load_model_and_tokenizer, meta_token_ids
from selfdistill.models.loading import add_meta_tokens


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
    # each new row starts at the mean of the old rows (HF mean_resizing: N(mean, 1e-9 * cov))
    for row in new[12:]:
        assert torch.allclose(row, emb.mean(0), atol=1e-3)
    assert tok(f"ab{META_OPEN}a{META_CLOSE}", add_special_tokens=False)["input_ids"] == [2, 3, open_id, 2, close_id]
