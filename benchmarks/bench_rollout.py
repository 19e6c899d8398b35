"""Rollout throughput: generated tokens per second of the decode loop, per model shape and variant.

Shapes: `tiny` (issue 17's: a Qwen3 with hidden 256, 4 layers, 4 query / 2 KV heads, head_dim 64,
FFN 512, tied embeddings, the char vocabulary) and `qwen3-0.6b` (Qwen3-0.6B's widths: vocabulary
151936, hidden 1024, 16 query / 8 KV heads, head_dim 128, FFN 3072, tied; `--layers` of its 28
decoder layers, 2 by default on CPU). Both random-init, fp32 (bf16 on CUDA for the 0.6B shape).
Prompts are the synthetic task's, `--prompts` x `--n` rows (the n rows of a prompt share it),
sampled at T=1 with per-row seeds, at most `--max-new-tokens` tokens each.

Variants (one row each): `eager` (the default path: shared prefix prefill, finished rows leave the
batch; on CPU the csrc decode step of `ops.fused_layers`), `eager_python_step` (the same with the
Python decode step: `ops.fused_layers=off`), `eager_no_prefix_sharing`, `eager_no_compaction`, `compiled` (rollout.compile: static
cache + torch.compile; `compile_s` is the first call, compilation included) and
`compiled_no_prefix_sharing`, and `hf_generate`: HF `model.generate(do_sample=True)` on the same
rows, the path this repository used before (and TRL's default), as the reference point. Every
variant of ours reports whether its token ids equal the eager variant's (`tokens_equal_eager`):
none of them may change a row's tokens.

    python benchmarks/bench_rollout.py --json rollout.json
    python benchmarks/bench_rollout.py --shapes tiny --variants eager,hf_generate --reps 5
    python benchmarks/bench_rollout.py --shapes qwen3-0.6b --layers 28 --prompts 8 --n 8 --max-new-tokens 256  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_step import machine_description  # noqa: E402

SHAPES = ("tiny", "qwen3-0.6b")
VARIANTS = ("eager", "eager_python_step", "eager_no_prefix_sharing", "eager_no_compaction", "compiled",
            "compiled_no_prefix_sharing", "hf_generate")


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the 0.6B shape (default: 28 on cuda, 2 on cpu)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--small-prompts", type=int, default=2, help="prompts for the 0.6B shape on CPU")
    p.add_argument("--small-max-new-tokens", type=int, default=8, help="max new tokens for the 0.6B shape on CPU")
    p.add_argument("--reps", type=int, default=3, help="timed calls per variant after one warm-up call (median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    for name, chosen, valid in (("shapes", args.shapes, SHAPES), ("variants", args.variants, VARIANTS)):
        if set(chosen) - set(valid):
            p.error(f"unknown {name} {sorted(set(chosen) - set(valid))}; choose from {','.join(valid)}")
    if args.device == "cuda" and not cuda:
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.layers = args.layers or (28 if args.device == "cuda" else 2)
    return args


def build(shape: str, args):
    """(model, tokenizer) of a shape, random init, on the device, in eval mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from selfdistill.config import ModelConfig, TinyModelConfig
    from selfdistill.models import load_model_and_tokenizer
    from selfdistill.models.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    if shape == "tiny":
        model, tok = load_model_and_tokenizer(ModelConfig(tiny=TinyModelConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)))
    else:
        tok = build_char_tokenizer()  # prompts in char ids; the vocabulary is Qwen3's size
        config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=args.layers,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                             tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        config._attn_implementation = "sdpa"
        model = Qwen3ForCausalLM(config)
        if args.device == "cuda":
            model = model.to(torch.bfloat16)
    return model.to(args.device).eval(), tok


def workload(shape: str, tok, args) -> tuple[list[list[int]], list[int], int]:
    from selfdistill.config import DataConfig
    from selfdistill.data import encode_prompt, load_splits

    small = shape != "tiny" and args.device == "cpu"
    prompts_n = args.small_prompts if small else args.prompts
    max_new = args.small_max_new_tokens if small else args.max_new_tokens
    data = DataConfig()
    train, _ = load_splits(data)
    prompts = [encode_prompt(tok, ex, data) for ex in train[:prompts_n]]
    rows = [p for p in prompts for _ in range(args.n)]
    return rows, [1000 + i for i in range(len(rows))], max_new


def run_variant(variant: str, model, tok, rows, seeds, max_new: int):
    """A call of the variant -> completion ids [R, T] (pad after the stop token)."""
    from selfdistill.rollout import MetaMode
    from selfdistill.rollout.base import pad_left
    from selfdistill.rollout.hf import HFRolloutBackend

    if variant == "hf_generate":
        ids, attn = pad_left(rows, tok.pad_token_id)
        out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        return out[:, ids.shape[1]:].cpu()
    from selfdistill.ops import fused_layers

    backend = HFRolloutBackend(model, tok, share_prefix="no_prefix_sharing" not in variant, compact="no_compaction" not in variant)
    mode = fused_layers.get_mode()
    fused_layers.set_mode("off" if variant == "eager_python_step" else mode)  # the Python decode step, not csrc's
    try:
        batch = backend.generate(rows, [MetaMode.ALLOW] * len(rows), max_new_tokens=max_new, temperature=1.0, top_p=1.0,
                                 seeds=seeds, compile=variant.startswith("compiled"))
    finally:
        fused_layers.set_mode(mode)
    return batch.completion_ids


def completion_tokens(ids: torch.Tensor, tok) -> int:
    """Tokens up to and including the first EOS (what a trainer counts), over the rows."""
    is_eos = ids == tok.eos_token_id
    T = ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full((ids.shape[0],), T))
    return int(first.sum())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(shape: str, variant: str, model, tok, rows, seeds, max_new, args, eager_ids) -> dict:
    row = {"shape": shape, "variant": variant, "rows": len(rows), "max_new_tokens": max_new}
    try:
        sync(args.device)
        t0 = time.perf_counter()
        ids = run_variant(variant, model, tok, rows, seeds, max_new)
        sync(args.device)
        row["first_call_s"] = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            ids = run_variant(variant, model, tok, rows, seeds, max_new)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        row["s"] = statistics.median(times)
        row["tokens"] = completion_tokens(ids, tok)
        row["tokens_per_s"] = row["tokens"] / row["s"]
        if variant != "hf_generate" and eager_ids is not None:
            row["tokens_equal_eager"] = bool(ids.shape == eager_ids.shape and torch.equal(ids, eager_ids))
    except Exception as e:  # noqa: BLE001  (a variant that cannot run is reported, not fatal)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row, (ids if "error" not in row else None)


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rows_out = []
    cols = ("shape", "variant", "rows", "max_new_tokens", "s", "tokens", "tokens_per_s", "first_call_s", "tokens_equal_eager", "error")
    print(" | ".join(f"{c:>18}" for c in cols))
    for shape in args.shapes:
        model, tok = build(shape, args)
        rows, seeds, max_new = workload(shape, tok, args)
        eager_ids = None
        for variant in (["eager"] if "eager" in args.variants else []) + [v for v in args.variants if v != "eager"]:
            row, ids = measure(shape, variant, model, tok, rows, seeds, max_new, args, eager_ids)
            if variant == "eager":
                eager_ids = ids
            rows_out.append(row)
            print(" | ".join(f"{row[c]:>18.3f}" if isinstance(row.get(c), float) else f"{str(row.get(c, '')):>18}" for c in cols))
        del model
    if args.json:
        doc = {"benchmark": "bench_rollout", "machine": machine_description(torch.get_num_threads()),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows_out}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
