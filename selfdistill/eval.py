"""Held-in validation and held-out evaluation (SPEC section 9): generate, grade, group.

What is evaluated (the seed's dev-vs-held-out distinction, `seeds/autonomous-post-training-paper.txt`)
  held-in   the training distribution, never trained on: `eval.val_size` rows carved out of the
            train split before training starts (`held_in_split`: the rows with the smallest md5 of
            their id, so the slice is fixed by the data alone, the same for every seed and arm), or
            the file `data.val_path`. Validated every `eval.every` steps of a training stage and at
            every `eval` stage: the curve the run is steered by.
  held-out  `data.eval_path` (synthetic: the held-out split of disjoint questions), evaluated at
            the `eval` stage only: the number a claim rests on. A held-in gain that does not
            survive on held-out is the drift `selfdistill-report` flags.

How
  k = `eval.samples_per_problem` completions per problem through the rollout backend: greedy for
  k = 1 by default, else sampled at `eval.temperature` (null = rollout.temperature) and
  `eval.top_p`. Sample j of problem i is seeded with `rollout_seed(seed, split stream, i, j)`:
  independent of the rank, the batch and the step, so every arm of a seed (and every step) draws
  the same noise for the same problem, which pairs the comparisons. Grading is the training
  grader on the outside-meta pieces cut from token ids, and meta emission is `meta_emitted` (one
  definition, selfdistill.rewards.regions). Under data parallelism rank r evaluates a contiguous
  share of the problems (sizes differ by at most one) and every rank gathers every row: no problem
  is dropped when the split does not divide by the world size, none is counted twice.

Output
  One row per sample (`SAMPLE_FIELDS`; the stage appends them to `eval_samples.jsonl` with split,
  step and stage) and the metrics `<split>/{accuracy, pass@k, meta_emission_rate, n, problems}`
  plus, per data_source, domain and difficulty band, `<split>/<group>/<value>/{accuracy, n,
  meta_emission_rate}`; per band also accuracy and n of the samples with and without a meta block
  (`.../with_meta/...`, `.../without_meta/...`), which stratifies the pooled meta-vs-no-meta gap.
  `n` counts samples (problems x k).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from selfdistill.config import DataConfig
from selfdistill.data import Example, encode_prompt
from selfdistill.models import meta_token_ids
from selfdistill.rewards.regions import content_regions, meta_emitted, rollout_outside_meta_texts
from selfdistill.rollout.base import MetaMode, rollout_seed

HELD_IN, HELD_OUT = "heldin", "heldout"
SPLIT_STREAMS = {HELD_IN: 1, HELD_OUT: 2}  # seed key per split, so their samples never share noise
SAMPLES_FILE = "eval_samples.jsonl"
SAMPLE_FIELDS = ("problem_index", "problem_id", "sample", "correct", "grade", "meta", "length", "truncated",
                 "data_source", "domain", "difficulty", "band")
GROUPS = ("data_source", "domain", "band")
UNKNOWN_BAND = "unknown"


@dataclass
class EvalResult:
    rows: list[dict]  # every sample of the split (all ranks'), sorted by (problem_index, sample)
    metrics: dict[str, float]


# -- what is evaluated -------------------------------------------------------------------------

def _prompt_key(ex: Example) -> str:
    return json.dumps(ex.prompt, sort_keys=True)


def held_in_split(train: list[Example], val_size: int, val_path: Optional[str] = None,
                  decoy_seed: int = 42) -> tuple[list[Example], list[Example]]:
    """(train rows left for training, held-in rows).

    `val_path`: the file is the held-in set and the train split is kept whole; a prompt the two
    share is an error (the held-in set must be unseen). Otherwise the `val_size` train rows with
    the smallest md5 of their id are carved out (0: no held-in set)."""
    if val_path:
        from selfdistill.data.loading import load_examples

        held_in = load_examples(val_path, decoy_seed=decoy_seed)
        seen = {_prompt_key(ex) for ex in train}
        shared = [ex.id for ex in held_in if _prompt_key(ex) in seen]
        if shared:
            raise ValueError(f"data.val_path={val_path!r}: {len(shared)} held-in rows (first id {shared[0]!r}) have a "
                             "prompt that is also in the train split; held-in rows must be unseen by training")
        return train, held_in
    if not val_size:
        return train, []
    if val_size >= len(train):
        raise ValueError(f"eval.val_size={val_size} leaves no training rows: the train split has {len(train)}; "
                         "lower eval.val_size")
    order = sorted(range(len(train)), key=lambda i: hashlib.md5(train[i].id.encode("utf-8")).hexdigest())
    chosen = set(order[:val_size])
    return [ex for i, ex in enumerate(train) if i not in chosen], [train[i] for i in sorted(chosen)]


def rank_share(num_items: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of `num_items`: the shares cover every item once and their
    sizes differ by at most one (the first ones are the smaller)."""
    return range(rank * num_items // world_size, (rank + 1) * num_items // world_size)


def difficulty_bands(difficulties: Sequence[Optional[str]], num_bands: int) -> list[str]:
    """One band label per problem.

    Numeric difficulty (every non-null value parses as a finite number) -> quantile bands
    `Q1`..`Q<num_bands>` over this split's problems: the cut points are numpy's (linear) i/num_bands
    quantiles and a value goes to 1 + the number of cut points strictly below it, so Q1 holds the
    lowest values and a value equal to a cut point stays in the lower band. Anything else -> the
    string as given. Null -> "unknown"."""
    present = [d for d in difficulties if d is not None]
    numeric = [_as_float(d) for d in present]
    if not present or any(v is None for v in numeric):
        return [UNKNOWN_BAND if d is None else str(d) for d in difficulties]
    cuts = np.quantile(np.array(numeric, dtype=np.float64), [i / num_bands for i in range(1, num_bands)])
    return [UNKNOWN_BAND if d is None else f"Q{int(np.searchsorted(cuts, _as_float(d), side='left')) + 1}"
            for d in difficulties]


def _as_float(value: str) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


_ORDINAL_WORDS = ("trivial", "very easy", "easy", "medium", "moderate", "intermediate", "hard", "very hard",
                  "expert", "extreme")


def band_sort_key(label: str) -> tuple:
    """Display order of band labels: Q1..Qb, then labels ending in a number ("Level 3", "2") by
    that number, then the usual difficulty words (easy < medium < hard ...), then the rest
    alphabetically, "unknown" last."""
    if label == UNKNOWN_BAND:
        return (4, 0.0, label)
    m = re.fullmatch(r"Q(\d+)", label)
    if m:
        return (0, float(m.group(1)), label)
    m = re.search(r"(-?\d+(?:\.\d+)?)\s*$", label)
    if m:
        return (1, float(m.group(1)), label)
    if label.lower() in _ORDINAL_WORDS:
        return (2, float(_ORDINAL_WORDS.index(label.lower())), label)
    return (3, 0.0, label)


# -- generation and grading --------------------------------------------------------------------

def sampling_settings(cfg) -> dict:
    """The `evaluate` keyword arguments a config asks for (eval.*, rollout.temperature as fallback)."""
    e = cfg.eval
    return {"max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size, "samples_per_problem": e.samples_per_problem,
            "greedy": e.greedy, "temperature": e.temperature if e.temperature is not None else cfg.rollout.temperature,
            "top_p": e.top_p, "num_bands": e.bands}


def evaluate(backend, tokenizer, examples: list[Example], grader, *, max_new_tokens: int, batch_size: int,
             samples_per_problem: int = 1, greedy: Optional[bool] = None, temperature: float = 1.0, top_p: float = 1.0,
             num_bands: int = 4, seed_keys: Sequence[int] = (0,), data: Optional[DataConfig] = None,
             prefix: str = "eval", rank: int = 0, world_size: int = 1,
             gather: Optional[Callable[[list], list[list]]] = None, progress: bool = False) -> EvalResult:
    """Evaluate `examples` (this rank generates its `rank_share`, `gather` collects every rank's
    rows: `engine.gather_objects`) and summarise them under `prefix`. `greedy=None`: greedy for
    k = 1, sampling otherwise. `data`: the run's data config, which says how prompts are encoded
    (`selfdistill.data.encode_prompt`)."""
    if not examples:
        raise ValueError(f"{prefix}: the evaluation split is empty; set data.eval_path (held-out), "
                         "eval.val_size or data.val_path (held-in), or data.synthetic.num_eval")
    k = samples_per_problem
    greedy = (k == 1) if greedy is None else greedy
    bands = difficulty_bands([ex.difficulty for ex in examples], num_bands)
    share = rank_share(len(examples), rank, world_size)
    # Every rank makes the same number of generate calls (the largest share's), padding with
    # discarded one-row calls: engines that gather parameters per forward need ranks in step.
    calls = math.ceil(math.ceil(len(examples) / world_size) * k / batch_size)
    rows = _generate_and_grade(backend, tokenizer, grader, examples, share, bands, k=k, greedy=greedy,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed_keys=seed_keys, data=data or DataConfig(), calls=calls,
                               progress=progress, desc=prefix)
    parts = gather(rows) if gather is not None else [rows]
    rows = sorted((r for part in parts for r in part), key=lambda r: (r["problem_index"], r["sample"]))
    return EvalResult(rows, summarize(rows, prefix, k))


def _generate_and_grade(backend, tokenizer, grader, examples, share, bands, *, k, greedy, temperature, top_p,
                        max_new_tokens, batch_size, seed_keys, data, calls, progress, desc) -> list[dict]:
    meta_ids = meta_token_ids(tokenizer)
    prompts = {i: encode_prompt(tokenizer, examples[i], data) for i in share}
    jobs = [(i, j) for i in share for j in range(k)]
    rows: list[dict] = []
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        seeds = None if greedy else [rollout_seed(*seed_keys, i, j) for i, j in chunk]
        batch = backend.generate([prompts[i] for i, _ in chunk], [MetaMode.ALLOW] * len(chunk),
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                                 seeds=seeds)
        grades = grader.grade(rollout_outside_meta_texts(batch, tokenizer, meta_ids), [examples[i].gold for i, _ in chunk])
        _, regions = content_regions(batch, tokenizer.eos_token_id, meta_ids)
        emitted = meta_emitted(regions, batch.with_arm.cpu()).tolist()  # every eval rollout may write meta
        lengths = batch.lengths.tolist()
        truncated = batch.truncated.tolist() if batch.truncated is not None else [False] * len(chunk)
        for r, (i, j) in enumerate(chunk):
            ex = examples[i]
            rows.append({"problem_index": i, "problem_id": ex.id, "sample": j, "correct": grades[r] == 1,
                         "grade": int(grades[r]), "meta": bool(emitted[r]), "length": int(lengths[r]),
                         "truncated": bool(truncated[r]), "data_source": ex.data_source, "domain": ex.domain,
                         "difficulty": ex.difficulty, "band": bands[i]})
        bar.update(len(chunk))
    bar.close()
    done = math.ceil(len(jobs) / batch_size)
    filler = [encode_prompt(tokenizer, examples[share.start if len(share) else 0], data)]
    for _ in range(calls - done):
        backend.generate(filler, [MetaMode.ALLOW], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         greedy=greedy, seeds=None if greedy else [rollout_seed(*seed_keys, 0, 0)])
    return rows


# -- summaries ---------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k); with n = k it is 1 when any sample is correct."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def cell_stats(rows: Sequence[dict]) -> dict:
    """n, accuracy and meta emission of a cell of samples, and accuracy / n of its samples with and
    without a meta block (accuracy None for an empty cell)."""
    def acc(rs):
        return sum(r["correct"] for r in rs) / len(rs) if rs else None

    with_meta = [r for r in rows if r["meta"]]
    without = [r for r in rows if not r["meta"]]
    return {"n": len(rows), "accuracy": acc(rows),
            "meta_emission_rate": len(with_meta) / len(rows) if rows else None,
            "with_meta": {"n": len(with_meta), "accuracy": acc(with_meta)},
            "without_meta": {"n": len(without), "accuracy": acc(without)}}


def group_rows(rows: Sequence[dict], key: str) -> dict[str, list[dict]]:
    """Rows by the value of `key` (bands in `band_sort_key` order, other groups sorted)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[str(r[key])].append(r)
    order = band_sort_key if key == "band" else (lambda s: s)
    return {v: out[v] for v in sorted(out, key=order)}


def problem_pass_at_k(rows: Sequence[dict], k: int) -> float:
    """Mean over problems of pass@k from each problem's samples."""
    per_problem: dict[int, list[bool]] = defaultdict(list)
    for r in rows:
        per_problem[r["problem_index"]].append(bool(r["correct"]))
    return sum(pass_at_k(len(cs), sum(cs), k) for cs in per_problem.values()) / len(per_problem)


def summarize(rows: Sequence[dict], prefix: str, k: int) -> dict[str, float]:
    """The flat metrics of one evaluation (see the module docstring); empty cells have no accuracy key."""
    def put(base: str, stats: dict, meta_split: bool) -> None:
        out[f"{base}/n"] = float(stats["n"])
        for name in ("accuracy", "meta_emission_rate"):
            if stats[name] is not None:
                out[f"{base}/{name}"] = stats[name]
        if meta_split:
            for side in ("with_meta", "without_meta"):
                out[f"{base}/{side}/n"] = float(stats[side]["n"])
                if stats[side]["accuracy"] is not None:
                    out[f"{base}/{side}/accuracy"] = stats[side]["accuracy"]

    out: dict[str, float] = {}
    put(prefix, cell_stats(rows), meta_split=True)
    out[f"{prefix}/problems"] = float(len({r["problem_index"] for r in rows}))
    out[f"{prefix}/pass@{k}"] = problem_pass_at_k(rows, k)
    out[f"{prefix}/mean_length"] = sum(r["length"] for r in rows) / len(rows)
    for key in GROUPS:
        for value, cell in group_rows(rows, key).items():
            put(f"{prefix}/{key}/{value}", cell_stats(cell), meta_split=key == "band")
    return out


def append_samples(path: str, rows: Sequence[dict], **context) -> None:
    """Append one JSON line per sample, each with the `context` fields (split, step, stage) first."""
    with open(path, "a") as f:
        f.writelines(json.dumps({**context, **r}) + "\n" for r in rows)
