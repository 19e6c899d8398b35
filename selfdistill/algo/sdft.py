"""SDFT's pieces (SPEC sections 6-7): demonstrations, the curriculum order, teacher generations and
the score.

- Every row needs a demonstration (`Example.teacher_demonstration`: a `demonstration` field, else
  `extra_info.solution`; the synthetic task's worked solutions); a row without one stops the run
  with an error naming it.
- Curriculum (`sdft.curriculum=demo_length`): rows ranked by their demonstration's token count,
  shortest (easiest) first; `sdft.batching=three_pass` cycles sorted / shuffled / sorted passes
  (selfdistill.data.sampler).
- Offline mode: the frozen teacher samples one completion per row from the teacher prompt, at the
  rollout temperature, seeded by (seed, row): the same completion whenever the row comes back (the
  3 passes) and after a resume, so each is generated once and kept (`TeacherSamples`).
- Score = 1 / (1 + eval token loss): the student's mean token cross-entropy (temperature 1) on the
  frozen teacher's greedy completions of the first `sdft.eval_prompts` held-out rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from selfdistill.algo.logprobs import completion_logprobs
from selfdistill.algo.sft import pad_completions
from selfdistill.algo.update import row_chunks
from selfdistill.data.example import Example
from selfdistill.rollout.base import MetaMode, RolloutBatch, rollout_seed

SAMPLE_STREAM = 5_321  # separates the teacher-sample seeds from the rollout seeds (seed, step, position)


def demonstrations(examples: list[Example], where: str) -> list[str]:
    """Each row's demonstration; a row without one raises, naming it."""
    out = []
    for i, ex in enumerate(examples):
        demo = ex.teacher_demonstration
        if not demo or not demo.strip():
            raise ValueError(f"SDFT needs a demonstration for every row, but {where} row {i} (id {ex.id!r}) has none: "
                             "give it a `demonstration` field or extra_info.solution (verl schema), or use algo=grpo / sdpo")
        out.append(demo)
    return out


def sampler_order(curriculum: str, batching: str) -> str:
    """The prompt sampler's order for `sdft.curriculum` x `sdft.batching`."""
    if batching == "three_pass":
        return "three_pass"
    return "sorted" if curriculum == "demo_length" else "shuffled"


def completion_batch(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int) -> RolloutBatch:
    """A batch that trains `completions` (teacher samples, EOS kept) after the student's prompts."""
    ids, mask = pad_completions(completions, pad_id)
    R = len(completions)
    return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], completion_ids=ids, completion_mask=mask,
                        forced_mask=torch.zeros_like(mask), group_ids=torch.arange(R),
                        with_arm=torch.ones(R, dtype=torch.bool))


def generate(backend, teacher_prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
             seeds: Optional[list[int]]) -> list[list[int]]:
    """One completion per teacher prompt (greedy when `seeds` is None), unpadded, EOS kept."""
    batch = backend.generate(teacher_prompts, [MetaMode.ALLOW] * len(teacher_prompts), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, greedy=seeds is None, seeds=seeds)
    return [row[: int(n)] for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist())]


class TeacherSamples:
    """The frozen teacher's sampled completion of each training row, generated on first use."""

    def __init__(self, seed: int):
        self.seed = seed
        self.completions: dict[int, list[int]] = {}

    def missing(self, rows: list[int]) -> list[int]:
        return [r for r in dict.fromkeys(rows) if r not in self.completions]

    def seeds(self, rows: list[int]) -> list[int]:
        return [rollout_seed(self.seed, SAMPLE_STREAM, r) for r in rows]

    def add(self, rows: list[int], completions: list[list[int]]) -> None:
        self.completions.update(zip(rows, completions))

    def get(self, rows: list[int]) -> list[list[int]]:
        return [self.completions[r] for r in rows]


@torch.no_grad()
def token_nll(model, prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int,
              micro_batch_size: Optional[int]) -> tuple[float, int]:
    """(summed token cross-entropy, token count) of `completions` after `prompt_ids` under `model`."""
    total, count = 0.0, 0
    for rows in row_chunks(len(completions), micro_batch_size):
        r = rows.tolist()
        ids, mask = pad_completions([completions[i] for i in r], pad_id)
        logp, _ = completion_logprobs(model, [prompt_ids[i] for i in r], ids, mask, pad_id)
        total += float(-logp.sum())
        count += int(mask.sum())
    return total, count


def score(eval_token_loss: float) -> float:
    """The SDFT score of the seed report: 1 / (1 + eval token loss)."""
    return 1.0 / (1.0 + eval_token_loss)
