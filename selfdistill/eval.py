"""Held-in / held-out evaluation: accuracy overall, per domain (data_source) and per difficulty band."""

from __future__ import annotations

from collections import defaultdict

from tqdm.auto import tqdm

from selfdistill.config import DataConfig
from selfdistill.data import Example, encode_prompt
from selfdistill.models import meta_token_ids
from selfdistill.rewards.regions import content_regions, meta_emitted, rollout_outside_meta_texts
from selfdistill.rollout.base import MetaMode


def evaluate(backend, tokenizer, examples: list[Example], grader, *, max_new_tokens: int, batch_size: int,
             greedy: bool = True, temperature: float = 1.0, data: DataConfig | None = None,
             prefix: str = "eval", progress: bool = True) -> dict[str, float]:
    """Generate one completion per example (greedy by default), grade, and aggregate. `data`: the run's data
    config, which says how prompts are encoded (`encode_prompt`)."""
    if not examples:
        raise ValueError("evaluation split is empty: set data.eval_path or data.synthetic.num_eval")
    meta_ids = meta_token_ids(tokenizer)
    correct: list[int] = []
    emitted: list[bool] = []
    bar = tqdm(total=len(examples), desc=prefix, disable=not progress, leave=False)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, ex, data or DataConfig()) for ex in chunk]
        batch = backend.generate(prompts, [MetaMode.ALLOW] * len(chunk), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=1.0, greedy=greedy)
        grades = grader.grade(rollout_outside_meta_texts(batch, tokenizer, meta_ids), [ex.gold for ex in chunk])
        correct.extend(int(g == 1) for g in grades)
        _, regions = content_regions(batch, tokenizer.eos_token_id, meta_ids)
        emitted.extend(meta_emitted(regions, batch.with_arm.cpu()).tolist())
        bar.update(len(chunk))
    bar.close()
    out = {f"{prefix}/accuracy": sum(correct) / len(correct), f"{prefix}/meta_emission_rate": sum(emitted) / len(emitted),
           f"{prefix}/n": float(len(correct))}
    for key, attr in (("domain", "domain"), ("band", "difficulty")):
        groups: dict[str, list[int]] = defaultdict(list)
        for ex, c in zip(examples, correct):
            groups[str(getattr(ex, attr))].append(c)
        for name, cs in sorted(groups.items()):
            out[f"{prefix}/{key}/{name}/accuracy"] = sum(cs) / len(cs)
            out[f"{prefix}/{key}/{name}/n"] = float(len(cs))
    return out


def merge_rank_results(parts: list[dict[str, float]]) -> dict[str, float]:
    """One result from the per-rank `evaluate` results of a data-parallel evaluation.

    Ranks evaluate disjoint slices, so a rank may have no example of some domain or band: counts
    (`.../n`) add up, and every rate is the mean of the ranks' rates weighted by the count beside
    it (`<prefix>/accuracy` by `<prefix>/n`, `<prefix>/domain/<d>/accuracy` by `.../domain/<d>/n`)."""
    out: dict[str, float] = {}
    keys = sorted({k for p in parts for k in p})
    for key in keys:
        if key.endswith("/n"):
            out[key] = sum(p.get(key, 0.0) for p in parts)
    for key in keys:
        if key.endswith("/n"):
            continue
        n_key = key.rsplit("/", 1)[0] + "/n"
        weighted = [(p[key], p[n_key]) for p in parts if key in p]
        total = sum(n for _, n in weighted)
        out[key] = sum(v * n for v, n in weighted) / total if total else float("nan")
    return out
