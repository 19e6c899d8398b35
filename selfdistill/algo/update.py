"""The optimizer update shared by the RL and distillation stages: epochs x minibatches x micro-batches.

A stage describes its loss as a weighted sum of *loss terms* (GRPO: the clipped policy loss of SPEC
section 5; SDPO/SDFT: plus a distillation loss, SPEC section 6). Each term is a mean over its own
denominator: rows (grpo, gspo, dr_grpo, distillation) or loss-mask tokens (dapo). `run_update`
splits every minibatch into micro-batches of `micro_batch_size` rows, computes the student's
log-probs for them (one forward and one backward per micro-batch, gradients accumulated), and scales
each micro-batch's term by its share of the term's global denominator:

    loss_micro = sum_terms coef * term(micro) * denominator(micro) * world_size / denominator(global minibatch)

so the accumulated gradient is exactly the gradient of the whole minibatch's loss on one process,
whatever the micro-batch size and however rows are spread over ranks (zero-std filtering leaves
ranks with unequal rows). Ranks agree on the number of forwards (and backwards) per phase, because
FSDP2 / ZeRO-3 forwards are collectives: a rank with fewer micro-batches runs zero-weight passes on
one filler row. Gradient synchronisation (DDP all-reduce, FSDP2 reduce-scatter) runs once, on the
last micro-batch of a minibatch (`engine.accumulation(last)`).

A term with coefficient 0 is still evaluated for its metrics (e.g. SDPO's pure distillation logs
the policy loss and entropy it does not train on) but adds nothing to the loss. Each term's value
is reported as `loss/<name>`, weighted across micro-batches and ranks like the loss itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from selfdistill.algo.logprobs import CompletionOutputs, completion_logprobs, completion_outputs, packing_scope
from selfdistill.rollout.base import RolloutBatch


@dataclass
class StudentOutputs:
    """The student's per-token outputs on a micro-batch of rows (all [r, T], fp32, 0 off the mask)."""

    logp: Tensor  # with gradient
    entropy: Optional[Tensor]  # with gradient
    old_logp: Tensor  # the behaviour policy's log-probs (detached logp when the update is on-policy)
    # Only when a term `needs_hidden`: the final hidden states [N, H] before the rows' completion
    # tokens (N = completion_mask.sum(), row-major) and the LM-head weight [V, H], with gradient.
    hidden: Optional[Tensor] = None
    lm_head: Optional[Tensor] = None


@dataclass
class LossTerm:
    """One summand of the update's loss.

    `fn(rows, out)` returns (the term's loss over `rows`: a mean by its own denominator, stats as
    token means over `rows`). `per_token`: the denominator counts loss-mask tokens (dapo), else rows.
    `needs_hidden`: the term reads `StudentOutputs.hidden` / `lm_head` (losses over the vocabulary).
    """

    name: str
    coef: float
    per_token: bool
    fn: Callable[[Tensor, StudentOutputs], tuple[Tensor, dict[str, Tensor]]]
    needs_hidden: bool = False


def row_chunks(n_rows: int, size: Optional[int]) -> list[Tensor]:
    """Consecutive index chunks of at most `size` rows (all rows in one chunk for size None/0)."""
    idx = torch.arange(n_rows)
    if not n_rows:
        return []
    if not size or size >= n_rows:
        return [idx]
    return list(idx.split(size))


def agreed_chunks(engine, rows: Tensor, size: Optional[int]) -> list[Tensor]:
    """`rows` cut into micro-batches, padded with empty chunks to the largest count on any rank
    (at least one), so every rank runs the same number of forwards."""
    chunks = [rows[c] for c in row_chunks(rows.numel(), size)]
    count = len(chunks)
    if engine.world_size > 1:
        count = int(engine.reduce_max({"n": count})["n"])
    count = max(count, 1)
    return chunks + [rows.new_empty(0)] * (count - len(chunks))


def term_denominator(term: LossTerm, loss_mask: Tensor, rows: Tensor) -> float:
    if term.per_token:
        return float((loss_mask[rows] != 0).sum())
    return float(rows.numel())


def run_update(engine, batch: RolloutBatch, terms: list[LossTerm], *, pad_id: int, temperature: float,
               ppo_epochs: int, num_minibatches: int, micro_batch_size: Optional[int], step: int,
               filler: Optional[RolloutBatch] = None,
               on_applied_step: Optional[Callable[[], None]] = None) -> tuple[int, dict[str, float]]:
    """Epochs x minibatches of `terms`, one optimizer step per minibatch. Returns (optimizer steps
    applied, metrics averaged over the minibatches that ran: `loss` = the weighted sum of the terms,
    then each term's stats).

    The behaviour log-probs (`StudentOutputs.old_logp`) are the model's before the first step, computed
    once without gradients when the update takes more than one step; with a single step they are the
    detached current log-probs (ratio exactly 1). `filler`: one row for a rank without rows of its own.
    `on_applied_step`: called on every rank after each optimizer step that was applied (the EMA teacher).
    """
    R = len(batch)
    filler = batch if R else filler
    if filler is None:
        raise ValueError("run_update: this rank has no rows; pass `filler` (one row) so it can join the step")
    device = engine.device
    loss_mask = batch.loss_mask.to(device)
    with_hidden = any(t.needs_hidden for t in terms)

    def forward(rows: Tensor, grad: bool) -> CompletionOutputs:
        r = rows.tolist()
        with torch.set_grad_enabled(grad):
            return completion_outputs(engine.model, [batch.prompt_ids[i] for i in r], batch.completion_ids[rows],
                                      batch.completion_mask[rows], pad_id, temperature, with_entropy=grad,
                                      with_hidden=grad and with_hidden)

    old_logp = None
    if ppo_epochs > 1 or num_minibatches > 1:
        old_logp = _behaviour_logprobs(engine, batch, forward, filler, pad_id, temperature, micro_batch_size)

    applied, sums, count = 0, {}, 0
    for _ in range(ppo_epochs):
        for rows in torch.arange(R).tensor_split(num_minibatches):
            local = {t.name: term_denominator(t, loss_mask, rows) for t in terms}
            totals = engine.reduce_sum(local) if engine.world_size > 1 else dict(local)
            if not any(totals.values()):  # nothing on any rank: every rank skips alike
                continue
            chunks = agreed_chunks(engine, rows, micro_batch_size)
            mb_tokens = float((loss_mask[rows] != 0).sum())
            loss_value, stats = 0.0, {}
            for j, micro in enumerate(chunks):
                # packing_scope: the rows are packed (selfdistill.algo.packing) also when the backward
                # recomputes the forward (activation checkpointing)
                with engine.accumulation(last=j == len(chunks) - 1), packing_scope(engine.model):
                    if micro.numel() == 0:
                        _zero_weight_pass(engine, filler, pad_id, temperature)
                        continue
                    co = forward(micro, grad=True)
                    old = old_logp[micro] if old_logp is not None else co.logp.detach()
                    out = StudentOutputs(logp=co.logp, entropy=co.entropy, old_logp=old, hidden=co.hidden, lm_head=co.lm_head)
                    loss = co.logp.new_zeros(())
                    token_share = float((loss_mask[micro] != 0).sum()) / max(mb_tokens, 1.0)
                    for t in terms:
                        if not totals[t.name]:
                            continue
                        value, term_stats = t.fn(micro, out)
                        share = term_denominator(t, loss_mask, micro) * engine.world_size / totals[t.name]
                        if t.coef:
                            loss = loss + (t.coef * share) * value
                        stats[f"loss/{t.name}"] = stats.get(f"loss/{t.name}", 0.0) + float(value.detach()) * share
                        for k, v in term_stats.items():
                            stats[k] = stats.get(k, 0.0) + float(v) * token_share
                    engine.backward(loss)
                    loss_value += float(loss.detach())
            ok, grad_norm = engine.step(loss_value, step + applied)
            applied += int(ok)
            if ok and on_applied_step is not None:
                on_applied_step()
            if rows.numel():
                count += 1
                for k, v in {"loss": loss_value, **stats, "grad_norm": grad_norm}.items():
                    sums[k] = sums.get(k, 0.0) + v
    return applied, {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def _behaviour_logprobs(engine, batch: RolloutBatch, forward, filler: RolloutBatch, pad_id: int, temperature: float,
                        micro_batch_size: Optional[int]) -> Optional[Tensor]:
    """The model's log-probs of every row before the update, in agreed micro-batches."""
    out = None
    chunks = agreed_chunks(engine, torch.arange(len(batch)), micro_batch_size)
    for micro in chunks:
        if micro.numel() == 0:
            completion_logprobs(engine.model, filler.prompt_ids[:1], filler.completion_ids[:1], filler.completion_mask[:1],
                                pad_id, temperature)  # joins the sharded forward's collectives
            continue
        logp = forward(micro, grad=False).logp
        if out is None:
            out = torch.zeros(batch.completion_ids.shape, dtype=logp.dtype, device=logp.device)
        out[micro.to(logp.device)] = logp
    return out


def _zero_weight_pass(engine, filler: RolloutBatch, pad_id: int, temperature: float) -> None:
    """Forward and backward one row with weight 0: gradients of zero, but the rank takes part in the
    sharded forward (FSDP2 / ZeRO-3 gathers) and the gradient reduction like its peers."""
    logp, _ = completion_logprobs(engine.model, filler.prompt_ids[:1], filler.completion_ids[:1], filler.completion_mask[:1],
                                  pad_id, temperature)
    engine.backward(logp.sum() * 0.0)  # logp is 0 off the completion mask
