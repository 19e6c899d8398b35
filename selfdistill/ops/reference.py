"""Pure-torch reference implementations of the fused ops (SPEC sections 5, 7, 8); the contrast
family (gold-vs-decoy contrast and the rewards' region reductions) is `contrast_reference`.

These are the formulas; the Triton kernels in `selfdistill.kernels` have the same signatures and
are tested against these (and against fp64). They accumulate in fp32 and, where a vocabulary pass
is needed, chunk over the rows so fp32 [N, V] logits never exist at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

RAMP_W0, RAMP_W1 = 0.5, 1.5  # progressive token weighting endpoints (SPEC section 7)
TAIL_LSE_MAX = -1e-7  # top-K tail: lse_K clamped to <= -1e-7 before log(-expm1(lse_K)) (SPEC section 6)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """Log-prob of `targets` and entropy per row of `logits` [N, V] at `temperature`.

    Returns fp32 `(logp [N], entropy [N])`, differentiable w.r.t. `logits`. Rows are processed in
    chunks so the fp32 upcast exists for `chunk_rows` rows at a time.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs expects logits [N, V] and targets [N]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    logps, ents = [], []
    for start in range(0, logits.shape[0], chunk_rows):
        log_p = torch.log_softmax(logits[start:start + chunk_rows].float() / temperature, dim=-1)
        t = targets[start:start + chunk_rows].long()
        logps.append(log_p.gather(-1, t.unsqueeze(-1)).squeeze(-1))
        # H = -sum p log p. Not logZ - sum p z: that cancels two numbers of the size of the logits.
        # A -inf logit (a banned token) has p log p = 0, not 0 * -inf.
        ents.append(-(log_p.exp() * torch.where(torch.isfinite(log_p), log_p, 0.0)).sum(-1))
    if not logps:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


def fused_linear_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, chunk_rows: int = 1024, *,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, targets)` computed chunk by chunk over rows.

    hidden [N, H], weight [V, H] (the LM head), optional bias [V], targets [N]. Differentiable
    w.r.t. hidden, weight and bias. Under autograd every chunk's fp32 log-softmax stays saved until
    the backward, so the reference holds O(N V) fp32 when it trains; the Triton and csrc variants
    keep a few floats per row and recompute the logits tile by tile in their backward
    (`selfdistill.ops.logprob_host`).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_token_logprobs expects hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")

    def logits(h: Tensor) -> Tensor:
        return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())

    parts = [token_logprobs(logits(hidden[s:s + chunk_rows]), targets[s:s + chunk_rows], temperature)
             for s in range(0, hidden.shape[0], chunk_rows)]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def progressive_token_weights(lengths: Tensor, loss_mask: Tensor, mode: str = "ramp") -> Tensor:
    """Per-token weights [B, T] of SPEC section 7.

    `lengths[b]` = L, the completion's tokens up to and including EOS (forced tokens included,
    padding excluded); token t < L gets `w0 + (w1 - w0) * t / max(L - 1, 1)`, then the row is divided
    by its mean over `loss_mask` so that mean is exactly 1 (no masked-in token -> all 0).
    `mode="uniform"` gives 1 on every masked-in token.
    """
    B, T = loss_mask.shape
    mask = (loss_mask != 0).to(torch.float32)
    if mode == "uniform":
        return mask
    if mode != "ramp":
        raise ValueError(f"token weighting {mode!r} is not valid; choose uniform or ramp")
    t = torch.arange(T, device=loss_mask.device, dtype=torch.float32).unsqueeze(0)
    L = lengths.to(torch.float32).unsqueeze(1)
    w = RAMP_W0 + (RAMP_W1 - RAMP_W0) * t / torch.clamp(L - 1, min=1.0)
    w = w * mask * (t < L)
    n = (mask * (t < L)).sum(1, keepdim=True)
    mean = w.sum(1, keepdim=True) / n.clamp(min=1.0)
    return torch.where(n > 0, w / mean.clamp(min=1e-12), torch.zeros_like(w))


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi || ref) estimate on sampled tokens (Schulman's k1/k2/k3)."""
    log_ratio = logp - ref_logp  # log pi/ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        # ref/pi - log(ref/pi) - 1 >= 0, unbiased, low variance
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"kl estimator {estimator!r} is not valid; choose k1, k2 or k3")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    lengths: Tensor,
    *,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    loss_type: str = "grpo",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.001,
    token_weighting: str = "uniform",
    max_len_norm: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio policy loss over a [B, T] batch of completions (SPEC sections 5 and 7).

    logp/old_logp/ref_logp/entropy/advantages: [B, T] per completion token (advantages already
    routed per region, SPEC section 4). loss_mask: nonzero for policy-sampled tokens in the loss
    (forced and padding tokens 0); what the other tensors hold off the mask (0, NaN, -inf) never
    reaches the loss or its gradient. lengths: [B] completion lengths for the progressive weights.

    Per token: r = exp(logp - old_logp); l = -min(r A, clip(r, 1-clip_low, 1+clip_high) A), with
    dual clip l = min(l, -dual_clip * A) for A < 0; plus kl_coef * KL - entropy_coef * H; times the
    token weight. Aggregation: grpo = mean over each sequence's tokens, then over sequences; dapo =
    mean over all tokens of the batch; dr_grpo = sum / (B * max_len_norm); gspo = sequence ratio
    s = exp(mean_t(logp - old_logp)) with a per-token straight-through so each token keeps its own
    advantage, clipped and aggregated like grpo.
    Returns (loss, stats) where stats hold detached clip fractions, kl and entropy means.
    """
    m = loss_mask != 0
    mask = m.to(torch.float32)
    w = progressive_token_weights(lengths, loss_mask, token_weighting)
    ntok_seq = mask.sum(1).clamp(min=1.0)
    # Off-mask values are replaced before any arithmetic: multiplying by the mask afterwards would
    # turn an inf there into NaN (inf * 0), in the loss or in its gradient.
    logp = torch.where(m, logp, 0.0)
    log_ratio = logp - torch.where(m, old_logp, 0.0)
    advantages = torch.where(m, advantages, 0.0)
    if loss_type == "gspo":
        seq_log_ratio = log_ratio.sum(1, keepdim=True) / ntok_seq.unsqueeze(1)
        # value = s_i at every token, gradient = s_i * d logp_t per token (GSPO-token); the
        # parentheses keep the value exactly s_i (x - x is exactly 0, s + x - x is not)
        log_ratio = seq_log_ratio.detach() + (logp - logp.detach())
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = -torch.minimum(ratio * advantages, clipped * advantages)
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -dual_clip * advantages), pg)
    per_token = pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(m, ref_logp, 0.0), kl_estimator)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    if entropy is not None:
        entropy = torch.where(m, entropy, 0.0)
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
    per_token = per_token * w
    B = logp.shape[0]
    if loss_type in ("grpo", "gspo"):
        loss = ((per_token * mask).sum(1) / ntok_seq).mean() if B else per_token.sum()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if not max_len_norm:
            raise ValueError("loss_type=dr_grpo needs max_len_norm (the fixed generation length)")
        loss = (per_token * mask).sum() / (max(B, 1) * max_len_norm)
    else:
        raise ValueError(f"loss_type {loss_type!r} is not valid; choose grpo, dapo, dr_grpo or gspo")
    with torch.no_grad():
        denom = mask.sum().clamp(min=1.0)
        stats = {
            "clip_ratio/low_mean": (((ratio < 1 - clip_low) & (advantages < 0)).float() * mask).sum() / denom,
            "clip_ratio/high_mean": (((ratio > 1 + clip_high) & (advantages > 0)).float() * mask).sum() / denom,
            "ratio_mean": (ratio * mask).sum() / denom,
        }
        if kl is not None:
            stats["kl"] = (kl * mask).sum() / denom
        if entropy is not None:
            stats["entropy"] = (entropy * mask).sum() / denom
    return loss, stats


def check_topk_distill_args(op: str, vocab: int, k: int, temperature: float, alpha: float, chunk_rows: int) -> None:
    """The scalar arguments of `topk_distill` / `fused_linear_topk_distill`, named in the error."""
    if not 1 <= k <= vocab:
        raise ValueError(f"{op}: k={k} must be in [1, V={vocab}] (algo.distill.topk: how many of the student's "
                         "top logits form the distillation categories)")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{op}: alpha={alpha!r} must be in [0, 1] (algo.distill.alpha: 0 = KL(T||S), "
                         "1 = KL(S||T), in between the generalised JSD)")
    if chunk_rows < 1:
        raise ValueError(f"{op}: chunk_rows must be >= 1, got {chunk_rows}")


def check_topk_logits(op: str, logits: Tensor, teacher_logits: Tensor) -> None:
    if logits.dim() != 2 or teacher_logits.shape != logits.shape:
        raise ValueError(f"{op} expects student and teacher logits [N, V] of one shape; got "
                         f"{tuple(logits.shape)} and {tuple(teacher_logits.shape)}")


def check_fused_linear_topk(op: str, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor) -> None:
    """Student hidden [N, H] and LM head [V, H]; teacher hidden [N, H_T] and LM head [V, H_T]
    (the vocabulary is shared, the width may differ); each side's matmul in one dtype."""
    for side, h, w in (("", hidden, weight), ("teacher_", teacher_hidden, teacher_weight)):
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(f"{op} expects {side}hidden [N, H] and {side}weight [V, H]; got {tuple(h.shape)}, {tuple(w.shape)}")
        if h.dtype != w.dtype:
            raise ValueError(f"{op}: {side}hidden is {h.dtype} but {side}weight is {w.dtype}; cast one so the matmul has one dtype")
    if teacher_hidden.shape[0] != hidden.shape[0] or teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: the teacher must score the same N={hidden.shape[0]} positions over the same V={weight.shape[0]} "
                         f"tokens; got teacher_hidden {tuple(teacher_hidden.shape)}, teacher_weight {tuple(teacher_weight.shape)}")


def _tail_logprob(logp: Tensor) -> Tensor:
    """log(1 - sum_K p) of the categories outside the top-K, as log(-expm1(lse_K)) with lse_K
    clamped to <= -1e-7 (SPEC section 6; the clamp also stops the gradient when it engages)."""
    lse = torch.logsumexp(logp, -1, keepdim=True).clamp(max=TAIL_LSE_MAX)
    return torch.log(-torch.expm1(lse))


def _weighted_log_ratio(w: Tensor, log_x: Tensor, log_y: Tensor) -> Tensor:
    """sum_c w_c (log_x_c - log_y_c) with a category of w_c = 0 contributing exactly 0 (0 log 0 = 0),
    in the value and in the gradient (no inf * 0 from a banned token's -inf log-prob)."""
    live = w > 0
    ratio = torch.where(live, log_x, 0.0) - torch.where(live, log_y, 0.0)
    return torch.where(live, w * ratio, 0.0).sum(-1)


def topk_divergence(logp_s: Tensor, logp_t: Tensor, tail: bool = True, alpha: float = 0.5) -> Tensor:
    """The top-K divergence of SPEC section 6 per row, from full-vocabulary log-probs at the K indices.

    logp_s, logp_t [..., K]: student / teacher log p at the student's top-K indices. With `tail`
    one more category log(1 - sum_K p) per side, else both renormalised over the K. Over those
    categories (a = student, b = teacher log-probs): alpha=0 -> KL(T||S) = sum q (b - a), alpha=1
    -> KL(S||T) = sum p (a - b), otherwise the generalised JSD (1-alpha) KL(S||M) + alpha KL(T||M)
    with M = (1-alpha) p + alpha q, log M formed as a logaddexp. Returns fp32 [...].
    """
    if tail:
        a = torch.cat([logp_s, _tail_logprob(logp_s)], -1)
        b = torch.cat([logp_t, _tail_logprob(logp_t)], -1)
    else:
        a, b = torch.log_softmax(logp_s, -1), torch.log_softmax(logp_t, -1)
    p, q = a.exp(), b.exp()
    if alpha == 0.0:
        return _weighted_log_ratio(q, b, a)
    if alpha == 1.0:
        return _weighted_log_ratio(p, a, b)
    # a category neither side gives mass has log M = -inf: keep logaddexp(-inf, -inf) (NaN gradient) out
    either = (p > 0) | (q > 0)
    log_m = torch.logaddexp(torch.where(either, a, 0.0) + math.log1p(-alpha), torch.where(either, b, 0.0) + math.log(alpha))
    return (1.0 - alpha) * _weighted_log_ratio(p, a, log_m) + alpha * _weighted_log_ratio(q, b, log_m)


def _topk_distill_rows(logits: Tensor, teacher_logits: Tensor, temperature: float, k: int, tail: bool, alpha: float) -> Tensor:
    """`topk_divergence` for a block of rows of student / teacher logits (any float dtype)."""
    idx = logits.detach().topk(k, dim=-1, sorted=False).indices  # the choice of indices is a constant

    def logp_at_topk(x: Tensor) -> Tensor:
        z = x.float() / temperature
        return z.gather(-1, idx) - torch.logsumexp(z, -1, keepdim=True)

    return topk_divergence(logp_at_topk(logits), logp_at_topk(teacher_logits.detach()), tail, alpha)


def topk_distill(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, k: int = 100, tail: bool = True,
                 alpha: float = 0.5, chunk_rows: int = 1024) -> Tensor:
    """Top-K distillation loss per position (SPEC section 6) from student and teacher logits [N, V].

    The K indices are the student's top-K logits (ties broken by `torch.topk`); both sides' log-probs
    there are logit / T minus that side's full-vocabulary log-sum-exp; then `topk_divergence`.
    Returns fp32 [N]; differentiable w.r.t. `logits` (the teacher never gets a gradient). Rows go in
    chunks under activation checkpointing: fp32 copies exist for `chunk_rows` rows at a time, in the
    forward and again when the backward recomputes that chunk.
    """
    check_topk_logits("topk_distill", logits, teacher_logits)
    check_topk_distill_args("topk_distill", logits.shape[1], k, temperature, alpha, chunk_rows)
    parts = [checkpoint(_topk_distill_rows, logits[s:s + chunk_rows], teacher_logits[s:s + chunk_rows], temperature, k,
                        tail, alpha, use_reentrant=False)
             for s in range(0, logits.shape[0], chunk_rows)]
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def _fused_linear_topk_distill_rows(hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                                    temperature: float, k: int, tail: bool, alpha: float) -> Tensor:
    return _topk_distill_rows(hidden @ weight.t(), teacher_hidden @ teacher_weight.t(), temperature, k, tail, alpha)


def fused_linear_topk_distill(
    hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, temperature: float = 1.0, k: int = 100,
    tail: bool = True, alpha: float = 0.5, chunk_rows: int = 1024,
) -> Tensor:
    """`topk_distill(hidden @ weight.T, teacher_hidden @ teacher_weight.T, ...)` chunk by chunk over rows.

    hidden [N, H], weight [V, H] (the student's LM head; both get gradients), teacher_hidden [N, H_T],
    teacher_weight [V, H_T] (no gradient; may be the student's own weight). Each chunk's logits are
    recomputed in the backward (activation checkpointing), so no [N, V] tensor is ever kept.
    """
    check_fused_linear_topk("fused_linear_topk_distill", hidden, weight, teacher_hidden, teacher_weight)
    check_topk_distill_args("fused_linear_topk_distill", weight.shape[0], k, temperature, alpha, chunk_rows)
    t_weight = teacher_weight.detach()
    parts = [checkpoint(_fused_linear_topk_distill_rows, hidden[s:s + chunk_rows], weight, teacher_hidden[s:s + chunk_rows].detach(),
                        t_weight, temperature, k, tail, alpha, use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk_rows)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
