"""Distillation losses of SPEC section 6, as terms of the shared update (selfdistill.algo.update).

Per completion token t in the loss mask of a row that has a teacher (teacher mask 1):

  sampled_token   l_t = -rho_t * A_t * log p_S(y_t),   A_t = sg(log p_T(y_t) - log p_S(y_t)),
                  rho_t = sg(min(exp(log p_S(y_t) - log p_old(y_t)), is_clip))   (1 on-policy).
                  Its gradient, -rho_t A_t grad log p_S(y_t), is the gradient of reverse KL(S || T)
                  on the sampled token: E_{y~S}[(log S(y) - log T(y)) grad log S(y)] = grad KL(S||T).
                  Runs on the fused token log-probs the update already computes.
  topk            the divergence over the student's top-K logits (+ the tail category) of
                  `ops.sequence_topk_distill`, from the student's and the teacher's final hidden
                  states and LM-head weights (never an fp32 [tokens, vocab] tensor).

Aggregation: a token mean per row over (loss mask x teacher mask), with the progressive weights of
SPEC section 7 under `algo.token_weighting=ramp` (mean 1 over the row's loss-mask tokens), then a mean
over all rows: rows without a teacher count as 0, and a batch without any teacher gives loss 0 with
a zero gradient (the optimizer step still runs and is counted). The term's denominator is rows.

SDFT offline trains on teacher samples with the token cross-entropy (`cross_entropy_term`): forward
KL on the teacher's samples, weighted likewise, averaged over the batch's tokens as SFT is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.algo.teacher import TeacherOutputs
from selfdistill.algo.update import LossTerm, StudentOutputs
from selfdistill.rollout.base import RolloutBatch


def sampled_token_loss(logp: Tensor, old_logp: Tensor, teacher_logp: Tensor, is_clip: float, mask: Tensor | None = None) -> Tensor:
    """Per-token sampled-token distillation loss [B, T] (see the module docstring); 0 off `mask`,
    where whatever the inputs hold (NaN included) reaches neither the loss nor its gradient."""
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    with torch.no_grad():
        advantage = torch.where(mask, teacher_logp - logp, 0.0)
        rho = torch.where(mask, torch.exp(logp - old_logp).clamp(max=is_clip), 0.0)
    return -(rho * advantage) * torch.where(mask, logp, 0.0)


def weighted_row_means(per_token: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """sum_t w_t l_t / n per row [B] over the tokens in `mask` (n of them); 0 for a row without
    any. Values off `mask` (NaN included) never reach the result or its gradient."""
    m = mask.to(per_token.dtype)
    total = torch.where(mask, per_token * weights, torch.zeros_like(per_token)).sum(1)
    return total / m.sum(1).clamp(min=1.0)


def topk_token_loss(out: StudentOutputs, teacher: TeacherOutputs, rows: Tensor, completion_mask: Tensor,
                    temperature: float, k: int, tail: bool, alpha: float) -> Tensor:
    """Per-token top-K(+tail) divergence [r, T] of `rows`, at every completion position of the rows
    with a teacher (0 elsewhere), through `ops.sequence_topk_distill`."""
    scored = completion_mask[rows] & teacher.has_teacher.to(completion_mask.device)[rows][:, None]
    if not bool(scored.any()):
        return out.logp * 0.0  # no teacher here: a zero that keeps the graph (zero gradient)
    student_rows = scored[completion_mask[rows]]  # out.hidden holds every completion position of `rows`
    hidden = out.hidden[student_rows.to(out.hidden.device)]
    teacher_hidden = teacher.hidden_of(rows).to(hidden.device)
    per_position = ops.sequence_topk_distill(hidden, out.lm_head, teacher_hidden, teacher.lm_head.to(hidden.device),
                                             temperature, k, tail, alpha)
    return torch.zeros_like(out.logp).masked_scatter(scored.to(out.logp.device), per_position.to(out.logp.dtype))


def distill_term(distill, teacher: TeacherOutputs, batch: RolloutBatch, device, *, coef: float, temperature: float,
                 token_weighting: str, report_entropy: bool = False) -> LossTerm:
    """The distillation loss of `algo.distill` (sampled_token or topk) as an update term over the
    rows of `batch`, whose teacher outputs are `teacher`. Stats: `self_distillation/teacher_student_kl`
    (the mean of log p_S - log p_T over the teacher's tokens: a k1 estimate of KL(S || T) on the
    student's samples) and, with `report_entropy`, the student's token-mean `entropy`."""
    loss_mask = batch.loss_mask.to(device)
    completion_mask = batch.completion_mask.to(device)
    lengths = batch.lengths.to(device)
    has = teacher.has_teacher.to(device)
    teacher_logp = teacher.logp.to(device)

    def fn(rows: Tensor, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        rows_d = rows.to(device)
        mask = loss_mask[rows_d] & has[rows_d][:, None]
        if distill.loss == "sampled_token":
            per_token = sampled_token_loss(out.logp, out.old_logp, teacher_logp[rows_d], distill.is_clip, mask)
        elif distill.loss == "topk":
            per_token = topk_token_loss(out, teacher, rows_d, completion_mask, temperature, distill.topk, distill.tail,
                                        distill.alpha)
        else:
            raise ValueError(f"algo.distill.loss={distill.loss!r} is not valid; choose sampled_token or topk")
        weights = ops.progressive_token_weights(lengths[rows_d], mask, token_weighting)
        loss = weighted_row_means(per_token, mask, weights).mean()
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            stats = {"self_distillation/teacher_student_kl":
                     torch.where(mask, out.logp - teacher_logp[rows_d], 0.0).sum() / n}
            if report_entropy and out.entropy is not None:
                m = loss_mask[rows_d]
                stats["entropy"] = torch.where(m, out.entropy, 0.0).sum() / m.sum().clamp(min=1)
        return loss, stats

    return LossTerm("distill", coef, per_token=False, fn=fn, needs_hidden=distill.loss == "topk")


def cross_entropy_term(batch: RolloutBatch, device, token_weighting: str) -> LossTerm:
    """Token cross-entropy on the completions of `batch` (SDFT offline: the teacher's samples),
    weighted per SPEC section 7, averaged over the loss-mask tokens of the batch."""
    loss_mask, lengths = batch.loss_mask.to(device), batch.lengths.to(device)

    def fn(rows: Tensor, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        rows_d = rows.to(device)
        mask = loss_mask[rows_d]
        weights = ops.progressive_token_weights(lengths[rows_d], mask, token_weighting)
        n = mask.sum().clamp(min=1)
        loss = -torch.where(mask, out.logp * weights, 0.0).sum() / n
        stats = {}
        if out.entropy is not None:
            stats["entropy"] = torch.where(mask, out.entropy, 0.0).sum().detach() / n
        return loss, stats

    return LossTerm("cross_entropy", 1.0, per_token=True, fn=fn)
