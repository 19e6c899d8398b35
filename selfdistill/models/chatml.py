"""A built-in checkpoint that looks like a real one: Qwen3 architecture, byte-level BPE, ChatML.

    python -m selfdistill.models.chatml OUT_DIR            # or: selfdistill-make-chatml OUT_DIR
    selfdistill-train model=hf model.path=OUT_DIR model.dtype=float32 experiment=demo

writes an HF checkpoint directory (config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json with the chat template) that exercises every path a user's
Qwen3 checkpoint takes, on a CPU and without downloads:

- a byte-level BPE tokenizer trained with `tokenizers` on the synthetic corpus
  (selfdistill.data.synthetic, rendered as ChatML conversations), with Qwen2/Qwen3's pre-tokenizer
  (digits split one by one, so multi-digit answers are multi-token and a gold/decoy pair such as
  `16` / `6` or `12` / `-12` tokenizes to different lengths: SPEC section 1's unscorable pairs);
- the ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`), honouring Qwen3's
  `enable_thinking=false` (an empty `<think>` block after the generation prompt);
- `<|im_end|>` as end of turn: the tokenizer's EOS (as in Qwen3-1.7B) and listed with
  `<|endoftext|>` in the generation config's `eos_token_id`; `eos="endoftext"` builds the
  base-model variant instead (tokenizer EOS `<|endoftext|>`, the generation config still lists
  both), where only the generation config says that `<|im_end|>` ends a turn;
- spare vocabulary rows: the embedding has `spare_rows` rows beyond the tokenizer's length
  (Qwen3-0.6B: 151936 rows for 151669 tokens);
- no meta tokens: `load_model_and_tokenizer` adds `<|meta|>` / `<|/meta|>`, on spare rows when
  there are any (mean of the trained rows), else by resizing the embedding.

The weights are a random init (seeded), like the tiny model's: the demo recipe SFTs it first.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from selfdistill.config import TinyModelConfig

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# Qwen2/Qwen3's pre-tokenization regex (their tokenizer.json): contractions, letter runs, single
# digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen3 writes it (without tools): each message framed by <|im_start|>role ... <|im_end|>;
# the generation prompt opens the assistant turn, and `enable_thinking=false` pre-fills an empty
# thinking block, which is what Qwen3's own template does.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@dataclass
class ChatMLCheckpointConfig:
    """What `build_chatml_checkpoint` writes. `model` is the architecture's shape (Qwen3)."""

    vocab_size: int = 512  # BPE vocabulary incl. the special tokens (256 bytes + merges + specials)
    spare_rows: int = 64  # embedding rows beyond the tokenizer's length
    eos: str = "im_end"  # im_end (Qwen3 post-trained) | endoftext (Qwen3-Base)
    corpus_rows: int = 4000  # synthetic examples the tokenizer is trained on
    seed: int = 0
    model: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(max_position_embeddings=512))


def _chatml_text(messages: list[dict]) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def synthetic_corpus(rows: int, seed: int) -> list[str]:
    """The tokenizer's training text: synthetic problems and their worked solutions as ChatML
    conversations (both difficulty splits' levels, a quarter with meta blocks as in the demo)."""
    from selfdistill.data.synthetic import generate_splits

    train, _ = generate_splits(rows, 0, [1, 2, 3, 4], [1], 0.25, seed)
    return [_chatml_text([*ex.prompt, {"role": "assistant", "content": ex.solution}]) for ex in train]


def train_bpe_tokenizer(corpus: list[str], vocab_size: int, eos: str = "im_end") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen2/Qwen3's normaliser, pre-tokenizer and decoder, trained
    on `corpus`; ChatML chat template; pad `<|endoftext|>`; EOS per `eos`."""
    if eos not in ("im_end", "endoftext"):
        raise ValueError(f"eos={eos!r} is not valid; choose im_end (Qwen3) or endoftext (Qwen3-Base)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(alphabet)} byte tokens + "
                         f"{len(SPECIAL_TOKENS)} special tokens ({floor}) to leave room for merges")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END if eos == "im_end" else ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.add_tokens([THINK_OPEN, THINK_CLOSE])  # ordinary added tokens, as in Qwen3's vocabulary
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_chatml_checkpoint(out_dir: str, cfg: ChatMLCheckpointConfig | None = None) -> str:
    """Train the tokenizer, initialise the model, write the checkpoint directory; returns it."""
    cfg = cfg or ChatMLCheckpointConfig()
    if cfg.spare_rows < 0:
        raise ValueError(f"spare_rows={cfg.spare_rows} must be >= 0")
    tokenizer = train_bpe_tokenizer(synthetic_corpus(cfg.corpus_rows, cfg.seed), cfg.vocab_size, cfg.eos)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    m = cfg.model
    config = Qwen3Config(
        vocab_size=len(tokenizer) + cfg.spare_rows,
        hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=ids[ENDOFTEXT], eos_token_id=tokenizer.eos_token_id, pad_token_id=ids[ENDOFTEXT],
    )
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT], pad_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    d = ChatMLCheckpointConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary incl. special tokens")
    p.add_argument("--spare-rows", type=int, default=d.spare_rows, help="embedding rows beyond the tokenizer")
    p.add_argument("--eos", choices=("im_end", "endoftext"), default=d.eos,
                   help="tokenizer EOS: im_end (Qwen3) or endoftext (Qwen3-Base; <|im_end|> only in generation_config)")
    p.add_argument("--corpus-rows", type=int, default=d.corpus_rows)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--hidden-size", type=int, default=d.model.hidden_size)
    p.add_argument("--num-hidden-layers", type=int, default=d.model.num_hidden_layers)
    p.add_argument("--num-attention-heads", type=int, default=d.model.num_attention_heads)
    p.add_argument("--num-key-value-heads", type=int, default=d.model.num_key_value_heads)
    p.add_argument("--head-dim", type=int, default=d.model.head_dim)
    p.add_argument("--intermediate-size", type=int, default=d.model.intermediate_size)
    p.add_argument("--untied", action="store_true", help="a separate LM-head matrix (Qwen3-4B and larger)")
    a = p.parse_args(argv)
    shape = TinyModelConfig(hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
                            num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
                            head_dim=a.head_dim, intermediate_size=a.intermediate_size,
                            max_position_embeddings=d.model.max_position_embeddings, tie_word_embeddings=not a.untied)
    out = build_chatml_checkpoint(a.out_dir, ChatMLCheckpointConfig(
        vocab_size=a.vocab_size, spare_rows=a.spare_rows, eos=a.eos, corpus_rows=a.corpus_rows, seed=a.seed,
        model=shape))
    print(f"[selfdistill] wrote a Qwen3/BPE/ChatML checkpoint to {out}; train it with "
          f"selfdistill-train model=hf model.path={out} model.dtype=float32 experiment=demo")


if __name__ == "__main__":
    main()
