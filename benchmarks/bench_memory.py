"""Peak memory of one GRPO update step: micro-batch size x activation checkpointing x precision.

A Qwen3-0.6B-shaped policy (vocabulary 151936, hidden 1024, 16 query / 8 KV heads of 128,
intermediate 3072, tied embeddings; `--layers` decoder layers, 28 in the real model, 2 by default
on CPU) takes one step of the trainer's own update path (`selfdistill.algo.grpo.policy_update`:
micro-batches with exact loss weights, the fused LM-head log-prob op, the guarded AdamW step) on
`--rows` rollouts of `--prompt-len` + `--completion-len` random tokens, for every combination of

    grpo.micro_batch_size    64 / 16 / 4  (`--micro-batches`)
    model.gradient_checkpointing   off / on
    engine.mixed_precision   no (fp32) / bf16  (fp32 master weights and AdamW state either way)

Each combination runs in a fresh process (engine=single). The LM-head log-prob op runs as in
training on a GPU: `ops.backend=auto` (Triton) on CUDA; on CPU `ops.backend=cuda`, whose C++ CPU
path (csrc/, built on first use) keeps O(N) floats per micro-batch as the Triton kernel does. (The
torch reference, `--ops-backend torch`, saves each micro-batch's fp32 [N, 151936] log-softmax for
backward, which then dominates every row.) Columns:
- `peak_mb`: the process's peak (CPU: peak resident set, VmHWM; CUDA: max_memory_allocated);
- `step_peak_mb`: the peak above the memory held just before the step (the model, on CPU the
  Python runtime too): the step's gradients, its activations and temporaries, and, unless
  `--warmup 1`, the AdamW moments created by the first step (2 x parameters in fp32, the same
  in every row);
- `activations_mb`: `step_peak_mb` less the fp32 gradients (4 bytes per parameter) and, without
  warm-up, the AdamW moments (8 bytes per parameter): the activations and temporaries, which is
  what micro-batching, checkpointing and bf16 act on;
- `step_s`: the step's wall time.
On CPU the child runs with MALLOC_MMAP_THRESHOLD_=65536, so freed tensors return to the OS and
the resident set follows what is allocated. A combination that does not fit reports `error`.

    python benchmarks/bench_memory.py --json memory_cpu.json                 # the README's CPU table
    python benchmarks/bench_memory.py --device cuda --layers 28 --completion-len 1024 --warmup 1 --json memory_gpu.json
    python benchmarks/bench_memory.py --preset tiny                          # smoke (seconds)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The Qwen3-0.6B shape (its config.json), layers set per run.
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, tie_word_embeddings=True)
PRESETS = {
    "qwen3_0_6b": dict(shape=QWEN3_0_6B, rows=64, micro_batches=(64, 16, 4), prompt_len=64, completion_len=96),
    "tiny": dict(shape=TINY, rows=8, micro_batches=(8, 2), prompt_len=8, completion_len=16),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3_0_6b")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 2 on CPU, 28 on CUDA)")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--micro-batches", default=None, help="comma list of grpo.micro_batch_size values")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--completion-len", type=int, default=None)
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--precisions", default="no,bf16", help="engine.mixed_precision values")
    p.add_argument("--ops-backend", default=None, choices=("auto", "torch", "triton", "cuda"),
                   help="ops.backend (default: auto on CUDA, cuda on CPU: the csrc extension's C++ path)")
    p.add_argument("--warmup", type=int, default=0, choices=(0, 1), help="steps before the measured one")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.shape = dict(preset["shape"], num_hidden_layers=a.layers or (28 if a.device == "cuda" else 2))
    a.rows = a.rows or preset["rows"]
    a.micro_batches = [int(x) for x in a.micro_batches.split(",")] if a.micro_batches else list(preset["micro_batches"])
    a.prompt_len = a.prompt_len or preset["prompt_len"]
    a.completion_len = a.completion_len or preset["completion_len"]
    a.checkpointing = [x == "on" for x in a.checkpointing.split(",")]
    a.ops_backend = a.ops_backend or ("auto" if a.device == "cuda" else "cuda")
    a.precisions = a.precisions.split(",")
    return a


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                values[key[:-1]] = int(kb) / 1024
    return values["VmRSS"], values["VmHWM"]


def run_one(spec: dict) -> dict:
    """One combination, in this (fresh) process."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bench_step import compose  # the script's directory is on sys.path when it runs

    from selfdistill import ops
    from selfdistill.algo import grpo
    from selfdistill.engine import build_engine
    from selfdistill.rollout.base import RolloutBatch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = compose([
        "engine=single", f"engine.mixed_precision={spec['precision']}", f"trainer.device={spec['device']}",
        f"model.gradient_checkpointing={str(spec['checkpointing']).lower()}", f"grpo.micro_batch_size={spec['micro_batch']}",
        "grpo.lr=1e-6", "grpo.warmup_steps=0", f"rollout.max_new_tokens={spec['completion_len']}",
        "algo.entropy_coef=0.001", f"ops.backend={spec['ops_backend']}",
    ])
    ops.set_backend(cfg.ops.backend)
    torch.manual_seed(0)
    shape = spec["shape"]
    model = Qwen3ForCausalLM(Qwen3Config(**shape, max_position_embeddings=spec["prompt_len"] + spec["completion_len"],
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    engine = build_engine(cfg)
    engine.wrap(model)
    engine.setup_optimizer(cfg.grpo)
    R, P, T = spec["rows"], spec["prompt_len"], spec["completion_len"]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, shape["vocab_size"], (R, P), generator=g).tolist()
    comps = torch.randint(10, shape["vocab_size"], (R, T), generator=g)
    mask = torch.ones(R, T, dtype=torch.bool)
    batch = RolloutBatch(prompts, comps, mask, torch.zeros_like(mask), torch.arange(R) // 8, torch.ones(R, dtype=torch.bool))
    advantages = torch.randn(R, 1, generator=g).expand(R, T).contiguous()
    cuda = spec["device"] == "cuda"

    def step(s: int) -> None:
        grpo.policy_update(engine, batch, advantages, 0, cfg, s)

    # the op's first call (JIT build / load of the csrc extension, Triton compilation) stays out of the step
    device = engine.device
    ops.sequence_token_logprobs(torch.zeros(2, shape["hidden_size"], device=device),
                                torch.zeros(4, shape["hidden_size"], device=device), torch.zeros(2, dtype=torch.long, device=device))
    for s in range(spec["warmup"]):
        step(s)
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = _rss_mb()[0]
    t0 = time.perf_counter()
    step(spec["warmup"])
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()[1]
    params = sum(p.numel() for p in model.parameters())
    # fp32 gradients, plus the two fp32 AdamW moments when this step created them
    state_mb = (4 + (8 if spec["warmup"] == 0 else 0)) * params / 2**20
    return {"peak_mb": peak, "step_peak_mb": peak - before, "activations_mb": peak - before - state_mb,
            "before_mb": before, "step_s": step_s, "params": params}


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(run_one(json.loads(a.child))))
        return
    env = dict(os.environ)
    if a.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = []
    t_start = time.perf_counter()
    for precision, ckpt, mb in itertools.product(a.precisions, a.checkpointing, a.micro_batches):
        spec = {"precision": precision, "checkpointing": ckpt, "micro_batch": mb, "device": a.device, "shape": a.shape,
                "rows": a.rows, "prompt_len": a.prompt_len, "completion_len": a.completion_len, "warmup": a.warmup,
                "threads": a.threads, "ops_backend": a.ops_backend}
        row = {"precision": "bf16" if precision == "bf16" else "fp32", "checkpointing": ckpt, "micro_batch": mb}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--device", a.device],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and found:
            row.update(json.loads(found[-1][len("RESULT "):]))
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            row["error"] = tail[-1][:300] if tail else f"exit code {proc.returncode}"
        rows.append(row)
        cells = [f"{row['precision']:>5}", f"ckpt={'on ' if ckpt else 'off'}", f"micro={mb:>3}"]
        cells += ([f"peak {row['peak_mb']:9.1f} MB", f"step peak {row['step_peak_mb']:9.1f} MB",
                   f"activations {row['activations_mb']:9.1f} MB", f"{row['step_s']:7.2f} s"]
                  if "error" not in row else [f"error: {row['error']}"])
        print(" | ".join(cells), flush=True)
    total_s = time.perf_counter() - t_start
    print(f"# {len(rows)} combinations in {total_s:.0f} s on {a.device}; shape {a.shape}, {a.rows} rows x "
          f"({a.prompt_len} + {a.completion_len}) tokens")
    if a.json:
        import torch

        doc = {"benchmark": "grpo_step_memory", "device": a.device,
               "device_name": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "preset": a.preset, "shape": a.shape, "rows": a.rows,
               "prompt_len": a.prompt_len, "completion_len": a.completion_len, "warmup": a.warmup,
               "ops_backend": a.ops_backend, "total_s": total_s,
               "results": rows}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
