"""Character-level tokenizer with meta tokens, as a real `PreTrainedTokenizerFast`.

One token per printable ASCII character plus newline, and five special tokens (DESIGN.md):
`<|pad|> <|bos|> <|eos|> <|meta|> <|/meta|>`. The meta tags are single special tokens so a meta
block can be cut and spliced at token level (SPEC section 1). It saves and loads with
`save_pretrained` / `AutoTokenizer.from_pretrained` like any HF tokenizer, chat template included.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
META_OPEN, META_CLOSE = "<|meta|>", "<|/meta|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, META_OPEN, META_CLOSE]
UNK = "\x00"  # never produced by the task; keeps out-of-alphabet characters visible as one id

# A minimal chat format for the tiny model: "<|bos|>Q: ...\nA: " then the completion.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def char_vocab() -> dict[str, int]:
    chars = [UNK, "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    return vocab


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer from scratch (no files, no downloads)."""
    tok = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.FixedLength(length=1)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[META_OPEN, META_CLOSE],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAR_CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left
    return fast
