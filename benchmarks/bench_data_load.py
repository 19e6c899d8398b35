"""Load time of a large verl-schema parquet file (selfdistill.data.loading.load_examples).

Writes a `--rows`-row parquet file the way verl's preprocess scripts do (`extra_info.index`, no
`id`; mostly distinct ground truths: integers, decimals, fractions and roots as strings, or with
`--numeric` a float64 column, since a parquet column has one type), then times:

- `load_s`: `load_examples` on it (read, validate every row; decoys deferred), median of `--reps`;
- `decoy_s_per_row`: building the decoys of `--decoy-sample` rows with distinct golds (what loading
  did for every row before decoys became lazy), and `eager_decoys_s_estimate`, that cost times the
  file's distinct golds (the per-gold cache makes repeated golds free);
- `max_prompt_tokens_s`: `drop_long_prompts` with the char tokenizer (only runs when
  `data.max_prompt_tokens` is set).

    python benchmarks/bench_data_load.py --json data_load.json
    python benchmarks/bench_data_load.py --rows 2000 --decoy-sample 50      # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def verl_rows(n: int, numeric: bool = False, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = 1 if numeric else i % 4
        if kind == 0:
            answer = str(rng.randint(-10**6, 10**6))
        elif kind == 1:
            answer = round(rng.uniform(-1000, 1000), rng.randint(1, 3))
            answer = answer if numeric else str(answer)
        elif kind == 2:
            answer = f"\\frac{{{rng.randint(1, 999)}}}{{{rng.randint(2, 999)}}}"
        else:
            answer = f"{rng.randint(2, 99)}\\sqrt{{{rng.randint(2, 99)}}}"
        question = f"Problem {i}: compute the value of expression {rng.randint(0, 10**9)}."
        rows.append({
            "data_source": "bench/verl", "ability": "math",
            "prompt": [{"role": "system", "content": "Put the final answer in \\boxed{}."},
                       {"role": "user", "content": question}],
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": "train", "index": i, "question": question},
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--decoy-sample", type=int, default=500, help="rows whose decoys are built to time the eager cost")
    p.add_argument("--numeric", action="store_true", help="float64 ground truths instead of strings")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from selfdistill.config import DataConfig
    from selfdistill.data import drop_long_prompts
    from selfdistill.data.loading import load_examples
    from selfdistill.models import build_char_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.parquet")
        t = time.perf_counter()
        pq.write_table(pa.Table.from_pylist(verl_rows(args.rows, args.numeric)), path)
        write_s = time.perf_counter() - t
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            examples = load_examples(path)
            times.append(time.perf_counter() - t)
        size_mb = os.path.getsize(path) / 2**20

    distinct = {ex.gold: ex for ex in examples}
    sample = list(distinct.values())[: args.decoy_sample]
    t = time.perf_counter()
    for ex in sample:
        ex.decoy  # noqa: B018  (the lazy build is the work being timed)
    per_row = (time.perf_counter() - t) / max(len(sample), 1)

    tok = build_char_tokenizer()
    t = time.perf_counter()
    kept = drop_long_prompts(examples, tok, DataConfig(max_prompt_tokens=96), "train")
    filter_s = time.perf_counter() - t

    result = {
        "rows": args.rows, "numeric_golds": args.numeric, "file_mb": round(size_mb, 2), "write_s": write_s,
        "load_s": statistics.median(times), "load_s_all": times, "rows_per_s": args.rows / statistics.median(times),
        "distinct_golds": len(distinct), "decoy_sample": len(sample), "decoy_s_per_row": per_row,
        "eager_decoys_s_estimate": per_row * len(distinct),
        "max_prompt_tokens_s": filter_s, "max_prompt_tokens_kept": len(kept),
        "python": sys.version.split()[0], "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }
    for k, v in result.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
