"""The self-teacher of SPEC section 6: whose weights score, and the scoring pass.

Weights (`algo.distill.teacher`):
  frozen  the weights the stage started from: the stage's pinned reference (tau = 0; the SDPO notes
          found a frozen teacher necessary against teacher collapse).
  ema     a copy of its own, initialised to the stage-start weights and moved after every applied
          optimizer step: theta_T <- (1 - tau) theta_T + tau theta_S (tau = `algo.distill.ema_tau`).
          Checkpoints carry it (`teacher/model.safetensors`), so a resumed run continues it exactly.
  live    the current student, on full parameters (no copy).
The frozen and EMA copies are plain models, replicated on every rank or sharded across ranks like the
reference (`engine.shard_reference`, selfdistill.engine.reference).

The scoring pass (`teacher_outputs`): the teacher reads its teacher prompt
(selfdistill.algo.teacher_context) followed by the student's own completion token ids, without
gradients, at the rollout temperature, and returns the log-probs of the student's tokens and, for
top-K distillation, its final hidden states at those positions and its LM-head weight. It runs
before the update, so every optimizer step of one update distils towards the same teacher outputs;
for `live` these are the student's weights when the update starts (the rollout policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from selfdistill.algo.logprobs import completion_outputs
from selfdistill.algo.update import agreed_chunks, row_chunks
from selfdistill.engine.reference import ReplicatedReference
from selfdistill.rollout.base import RolloutBatch


class SelfTeacher:
    """The teacher's weights for one stage.

    `weights`: a reference-like object (`.gathered()` yields the plain model; `.ema_update_`), the
    stage's reference for `frozen`, an own copy for `ema`. `live`: a callable returning a context
    that yields the student on full parameters. `full_parameters`: the student's full parameters by
    name (`engine.full_parameters`), for the EMA blend."""

    def __init__(self, mode: str, *, weights=None, live: Optional[Callable] = None, tau: float = 0.0,
                 full_parameters: Optional[Callable[[], dict]] = None):
        if mode not in ("frozen", "ema", "live"):
            raise ValueError(f"algo.distill.teacher={mode!r} is not valid; choose frozen, ema or live")
        if (mode == "live") != (live is not None) or (mode != "live") != (weights is not None):
            raise ValueError(f"teacher={mode}: pass `live` for the live teacher and `weights` otherwise")
        if mode == "ema" and (full_parameters is None or not 0 < tau <= 1):
            raise ValueError(f"teacher=ema needs the student's full_parameters and 0 < tau <= 1 (got tau={tau})")
        self.mode, self.weights, self.live, self.tau, self.full_parameters = mode, weights, live, tau, full_parameters

    def scoring_model(self):
        """A context yielding the plain teacher model (every rank enters it together)."""
        return self.live() if self.mode == "live" else self.weights.gathered()

    @property
    def passes_are_collective(self) -> bool:
        """The student's forwards may be collectives (FSDP2 without the generation gather): the
        live teacher's passes then run in equal numbers on every rank."""
        return self.mode == "live"

    @property
    def lm_head_outlives_pass(self) -> bool:
        """The LM-head weight seen in the scoring pass stays valid and unchanged through the update
        (a replicated frozen copy); otherwise the pass keeps a copy of it (top-K distillation)."""
        return self.mode == "frozen" and isinstance(self.weights, ReplicatedReference)

    def after_optimizer_step(self) -> None:
        """The EMA blend after an applied optimizer step (every rank calls it; a collective under
        sharded engines, which gather the student's parameters)."""
        if self.mode == "ema":
            self.weights.ema_update_(self.full_parameters(), self.tau)

    def checkpoint_weights(self, keep: bool) -> Optional[dict[str, Tensor]]:
        """The EMA teacher's weights for a checkpoint (None for frozen / live, which a resumed run
        rebuilds). Every rank calls it (a sharded copy is gathered); ranks with `keep=False` get {}."""
        if self.mode != "ema":
            return None
        with self.weights.gathered() as model:
            return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()} if keep else {}


@torch.no_grad()
def load_teacher_weights(model, state: dict[str, Tensor]) -> None:
    """Copy `checkpoint_weights` back into a plain model of the same architecture, exactly."""
    names = {n for n, _ in model.named_parameters()}
    if names != set(state):
        raise RuntimeError(f"teacher weights do not match the model: missing {sorted(names - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - names)[:5]}")
    for n, p in model.named_parameters():
        p.copy_(state[n])


@dataclass
class TeacherOutputs:
    """The teacher's outputs on the student's completion tokens of a batch of R rows."""

    has_teacher: Tensor  # [R] bool: the teacher mask (rows with a teacher context)
    logp: Tensor  # [R, T] fp32: log p_T(y_t); 0 off the completion mask and on rows without a teacher
    hidden: Optional[Tensor] = None  # [N_T, H]: final hidden states at the teacher rows' completion positions, row-major
    offsets: Optional[Tensor] = None  # [R + 1] long: row r's states are hidden[offsets[r]:offsets[r + 1]]
    lm_head: Optional[Tensor] = None  # [V, H]: the teacher's LM-head weight

    def hidden_of(self, rows: Tensor) -> Tensor:
        """The states of `rows` (in that order; rows without a teacher contribute none)."""
        off = self.offsets.tolist()
        return torch.cat([self.hidden[off[r]: off[r + 1]] for r in rows.tolist()])


@torch.no_grad()
def teacher_outputs(teacher: SelfTeacher, model, teacher_prompts: list[Optional[list[int]]], batch: RolloutBatch,
                    pad_id: int, temperature: float, micro_batch_size: Optional[int], *, with_hidden: bool,
                    engine=None) -> TeacherOutputs:
    """Score the student's completions of `batch` under the teacher prompts (None = no teacher) with
    `model`, the teacher `teacher.scoring_model()` yields, in micro-batches of teacher rows.
    `engine`: agree the number of passes across ranks when they are collectives."""
    R, T = batch.completion_ids.shape
    has = torch.tensor([p is not None for p in teacher_prompts], dtype=torch.bool)
    rows = has.nonzero(as_tuple=True)[0]
    if engine is not None and teacher.passes_are_collective:
        chunks = agreed_chunks(engine, rows, micro_batch_size)
    else:
        chunks = [rows[c] for c in row_chunks(rows.numel(), micro_batch_size)]
    device = next(model.parameters()).device
    logp = torch.zeros((R, T), dtype=torch.float32, device=device)
    parts, lm_head = [], None
    for chunk in chunks:
        if chunk.numel() == 0:  # a rank with fewer teacher rows joins its peers' collective forwards
            completion_outputs(model, [[pad_id]], torch.full((1, 1), pad_id), torch.ones((1, 1), dtype=torch.bool), pad_id)
            continue
        r = chunk.tolist()
        out = completion_outputs(model, [teacher_prompts[i] for i in r], batch.completion_ids[chunk],
                                 batch.completion_mask[chunk], pad_id, temperature, with_hidden=with_hidden)
        logp[chunk.to(device)] = out.logp
        if with_hidden:
            parts.append(out.hidden)
            lm_head = out.lm_head
    result = TeacherOutputs(has_teacher=has, logp=logp)
    if with_hidden:
        counts = batch.completion_mask.sum(1).cpu() * has
        result.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        H = model.get_output_embeddings().weight.shape[1]
        result.hidden = torch.cat(parts) if parts else torch.zeros((0, H), device=device)
        if lm_head is not None:
            result.lm_head = lm_head.detach() if teacher.lm_head_outlives_pass else lm_head.detach().clone()
    return result
