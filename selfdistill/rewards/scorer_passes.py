"""The scorer's teacher-forced passes and the LM-head work on their hidden states (SPEC sections 1, 8).

`TeacherForcedPasses` holds every teacher-forced sequence of a scoring step and the reads to take
from them (`(t, target)`: the final hidden state at t - 1, which predicts token t); it drops exact
duplicates, sorts by length and runs them in as few right-padded forwards as a token budget allows,
under `torch.no_grad()`. Only the hidden states at read positions leave a forward: a reader takes
them chunk by chunk.

- `HiddenStates` keeps them (the answer reads of the belief heads: a few per context) for
  `answer_inputs_fused`, which arranges them as the gold and decoy passes' [R, K, H] and calls
  `ops.dispatched_gold_decoy_contrast`: the first divergent position of a row is one dot product with
  W[gold] - W[decoy] (no vocabulary pass, no logits), later ones the fused-linear log-probs of both
  passes (SPEC section 1).
- `TokenLogprobs` turns them into fused-linear token log-probs (`ops.sequence_token_logprobs`, a
  logits tile per chunk, never [N, V]): the continuation reads of PMI on the fused path (fp32 on the
  scorer's device), and every read of the reference path (float64 on the CPU), which reads the
  first divergent position's decoy token from the gold pass's row with a full vocabulary pass, as
  the scorer did before the contrast kernels (`answer_inputs_reference`).

The scorer is evaluated at temperature 1.0; its LM head's weight (and bias, if any) are read from
`get_output_embeddings()`.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.rewards.common import belief

SCORER_TEMPERATURE = 1.0  # SPEC section 1: the scorer is evaluated at temperature 1.0
MAX_BATCH_TOKENS = 32768  # padded tokens per scorer forward
MAX_BATCH_SIZE = 256  # sequences per scorer forward


def check_scorer(model):
    """The scorer is a plain HF causal LM: the trainer passes the gathered frozen reference or
    `engine.unwrapped()`, never an engine wrapper (whose `.module` this package does not open:
    engine handling belongs to the trainer side)."""
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"the scorer must be a plain HF causal LM (the gathered reference, or engine.unwrapped()); "
                        f"got {type(model).__name__}")
    return model


@contextlib.contextmanager
def eval_mode(model):
    hf = check_scorer(model)
    was_training = hf.training
    hf.eval()
    try:
        yield
    finally:
        hf.train(was_training)


def lm_head(model) -> tuple[Tensor, Tensor | None]:
    """(weight [V, H], bias [V] or None) of the scorer's LM head."""
    head = check_scorer(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class TeacherForcedPasses:
    """Teacher-forced sequences and the reads to take from them, run in few batched forwards.

    `add(seq, reads)` registers reads `(t, target)`: the state predicting seq[t] (t >= 1), whose
    log-prob of `target` (usually seq[t]; the reference path's first-divergent-position shortcut also
    reads the decoy token from the gold sequence's row) a reader may form. Returns the reads' indices.
    """

    def __init__(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}
        self.seqs: list[tuple[int, ...]] = []
        self.reads: list[tuple[int, int, int]] = []  # (sequence, t, target)

    def add(self, seq: Sequence[int], reads: Sequence[tuple[int, int]]) -> list[int]:
        if not reads:
            return []
        last = max(t for t, _ in reads)
        if min(t for t, _ in reads) < 1 or last > len(seq):
            raise ValueError(f"TeacherForcedPasses.add: read positions must lie in [1, {len(seq)}]; got {[t for t, _ in reads]}")
        key = tuple(seq[:last])  # the state predicting position `last` sees seq[:last] only
        s = self._index.setdefault(key, len(self.seqs))
        if s == len(self.seqs):
            self.seqs.append(key)
        start = len(self.reads)
        self.reads.extend((s, t, int(target)) for t, target in reads)
        return list(range(start, len(self.reads)))

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    def chunks(self, max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
        """Sequence indices grouped into forwards: longest first, padded size within the budget."""
        order = sorted(range(len(self.seqs)), key=lambda s: -len(self.seqs[s]))
        out: list[list[int]] = []
        for s in order:
            if out and len(out[-1]) < max_batch_size and (len(out[-1]) + 1) * len(self.seqs[out[-1][0]]) <= max_batch_tokens:
                out[-1].append(s)
            else:
                out.append([s])
        return out

    @torch.no_grad()
    def run(self, model, pad_id: int, reader, max_batch_tokens: int = MAX_BATCH_TOKENS, max_batch_size: int = MAX_BATCH_SIZE):
        """Hand every read's hidden state to `reader.take(hidden [n, H], read indices [n], targets [n])`,
        forward by forward; returns `reader`. `model`: a plain HF causal LM (`check_scorer`)."""
        if not self.reads:
            return reader
        decoder = check_scorer(model).get_decoder()
        device = next(model.parameters()).device
        reads_of: dict[int, list[int]] = {}
        for r, (s, _, _) in enumerate(self.reads):
            reads_of.setdefault(s, []).append(r)
        for chunk in self.chunks(max_batch_tokens, max_batch_size):
            L = len(self.seqs[chunk[0]])
            # Right padding: a causal model's real positions never attend to the pads after them,
            # and position ids 0..len-1 are those the sequence had during generation.
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), L), dtype=torch.long)
            rows, cols, targets, dest = [], [], [], []
            for b, s in enumerate(chunk):
                seq = self.seqs[s]
                ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attn[b, : len(seq)] = 1
                for r in reads_of[s]:
                    _, t, target = self.reads[r]
                    rows.append(b)
                    cols.append(t - 1)  # the state at t - 1 predicts token t
                    targets.append(target)
                    dest.append(r)
            pos = torch.arange(L).unsqueeze(0).expand(len(chunk), L)
            hidden = decoder(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device)).last_hidden_state
            h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            reader.take(h, torch.tensor(dest, device=device), torch.tensor(targets, device=device))
        return reader


class HiddenStates:
    """Reader keeping every read's final hidden state: `hidden` [reads, H] in the model's dtype."""

    def __init__(self, n_reads: int) -> None:
        self.n_reads, self.hidden = n_reads, None

    def take(self, h: Tensor, dest: Tensor, targets: Tensor) -> None:
        if self.hidden is None:
            self.hidden = h.new_zeros(self.n_reads, h.shape[-1])
        self.hidden[dest] = h


class TokenLogprobs:
    """Reader of each read's log p(target) by the fused-linear log-probs of the LM head: `out` [reads],
    fp32 on the model's device (`fused`) or float64 on the CPU (the reference path)."""

    def __init__(self, n_reads: int, weight: Tensor, bias: Tensor | None, *, fused: bool) -> None:
        self.weight, self.bias = weight, bias
        self.out = (torch.full((n_reads,), float("nan"), dtype=torch.float32, device=weight.device) if fused
                    else torch.full((n_reads,), float("nan"), dtype=torch.float64))

    def take(self, h: Tensor, dest: Tensor, targets: Tensor) -> None:
        lp, _ = ops.sequence_token_logprobs(h, self.weight, targets, SCORER_TEMPERATURE, bias=self.bias)
        self.out[dest.to(self.out.device)] = lp.to(self.out)


# ----------------------------------------------------------------------------- reads -> inputs

def continuation_inputs(names: list[str], lp: Tensor, plans: dict[int, dict], R: int) -> dict[str, Tensor]:
    """`logp_<name>` [R, K] per context (C's tokens, position by position, in lp's dtype and device)
    and `cont_mask` [R, K]."""
    K = max([len(plan[names[0]]) for plan in plans.values()] or [0])
    rows, cols = [], []
    for i, plan in plans.items():
        rows += [i] * len(plan[names[0]])
        cols += list(range(len(plan[names[0]])))
    mask = torch.zeros(R, K, dtype=torch.bool)
    mask[rows, cols] = True
    inputs: dict[str, Tensor] = {"cont_mask": mask}
    for name in names:
        x = lp.new_zeros(R, K)
        src = [r for i in plans for r in plans[i][name]]
        x[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = lp[torch.tensor(src, dtype=torch.long, device=lp.device)]
        inputs[f"logp_{name}"] = x
    return inputs


def _divergent_mask(plans: dict[int, dict], row_pairs: list) -> tuple[Tensor, int]:
    """divergent_mask [R, K] (rows without a plan all False) and K, the longest answer."""
    R = len(row_pairs)
    K = max([len(p.gold) for p in row_pairs] or [0])
    div = torch.zeros(R, K, dtype=torch.bool)
    for i in plans:
        div[i, row_pairs[i].divergent] = True
    return div, K


def answer_inputs_reference(names: list[str], lp: Tensor, plans: dict[int, dict], row_pairs: list) -> dict[str, Tensor]:
    """The reference inputs of a belief head from float64 read log-probs: `gold_logp_<name>`,
    `decoy_logp_<name>` [R, K] at the divergent positions, `belief_<name>` [R] per context, and
    `divergent_mask` [R, K]."""
    div, K = _divergent_mask(plans, row_pairs)
    R = len(row_pairs)
    inputs: dict[str, Tensor] = {"divergent_mask": div}
    for name in names:
        g = torch.zeros(R, K, dtype=torch.float64)
        d = torch.zeros(R, K, dtype=torch.float64)
        for i, plan in plans.items():
            ks = row_pairs[i].divergent
            g[i, ks], d[i, ks] = lp[plan[name][0]], lp[plan[name][1]]
        inputs[f"gold_logp_{name}"], inputs[f"decoy_logp_{name}"] = g, d
        inputs[f"belief_{name}"] = belief(g, d, div)
    return inputs


def answer_inputs_fused(names: list[str], hidden: Tensor | None, plans: dict[int, dict], row_pairs: list, weight: Tensor,
                        bias: Tensor | None) -> dict[str, Tensor]:
    """The fused inputs of a belief head: `contrast_<name>` fp32 [R, K] and `belief_<name>` float64
    [R] per context from one `ops.dispatched_gold_decoy_contrast` call over every (context, rollout)
    row, and `divergent_mask` [R, K]; on the scorer's device.

    `hidden` [reads, H]: the reads' hidden states; a plan's gold reads lie at every divergent
    position of the gold pass, its decoy reads (the first one unused here: it shares the gold row)
    at the later ones of the decoy pass."""
    div, K = _divergent_mask(plans, row_pairs)
    R, C, device = len(row_pairs), len(names), weight.device
    if not plans:
        nan = torch.full((R,), float("nan"), dtype=torch.float64, device=device)
        zeros = torch.zeros(R, K, dtype=torch.float32, device=device)
        return {"divergent_mask": div.to(device), **{f"contrast_{n}": zeros for n in names}, **{f"belief_{n}": nan for n in names}}
    gold_ids = torch.zeros(C * R, K, dtype=torch.long)
    decoy_ids = torch.zeros(C * R, K, dtype=torch.long)
    gold_at, decoy_at = ([], [], []), ([], [], [])  # (row, position, read index) into the [C R, K, H] passes
    for i, plan in plans.items():
        pair = row_pairs[i]
        ks = pair.divergent
        for c, name in enumerate(names):
            rc = c * R + i
            gold_ids[rc, : len(pair.gold)] = torch.tensor(pair.gold)
            decoy_ids[rc, : len(pair.decoy)] = torch.tensor(pair.decoy)
            gold_reads, decoy_reads = plan[name]
            for at, positions, reads in ((gold_at, ks, gold_reads), (decoy_at, ks[1:], decoy_reads[1:])):
                at[0].extend([rc] * len(positions))
                at[1].extend(positions)
                at[2].extend(reads)

    def pass_states(at) -> Tensor | None:
        if not at[0]:
            return None
        states = hidden.new_zeros(C * R, K, hidden.shape[-1])
        states[torch.tensor(at[0]), torch.tensor(at[1])] = hidden[torch.tensor(at[2], device=hidden.device)]
        return states

    divergent = div.repeat(C, 1)
    contrast, beliefs = ops.dispatched_gold_decoy_contrast(pass_states(gold_at), pass_states(decoy_at), weight, bias,
                                                           gold_ids.to(device), decoy_ids.to(device), divergent.to(device),
                                                           SCORER_TEMPERATURE)
    inputs: dict[str, Tensor] = {"divergent_mask": div.to(device)}
    for c, name in enumerate(names):
        inputs[f"contrast_{name}"] = contrast[c * R:(c + 1) * R]
        inputs[f"belief_{name}"] = beliefs[c * R:(c + 1) * R]
    return inputs


__all__ = ["HiddenStates", "TeacherForcedPasses", "TokenLogprobs", "answer_inputs_fused", "answer_inputs_reference",
           "check_scorer", "continuation_inputs", "eval_mode", "lm_head"]
