"""Pure-torch reference implementations of the fused ops (SPEC sections 5, 7, 8).

These are the formulas; the Triton kernels in `selfdistill.kernels` have the same signatures and
are tested against these (and against fp64). They accumulate in fp32 and, where a vocabulary pass
is needed, chunk over the rows so fp32 [N, V] logits never exist at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

RAMP_W0, RAMP_W1 = 0.5, 1.5  # progressive token weighting endpoints (SPEC section 7)
REWARD_CLIP, MIN_WEIGHT = 2.0, 1.0  # gm / PMI mean_min: mean(clip(x, -2, 2)) + 1.0 * min(clip(x, -2, 2)) (SPEC section 2)


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
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, chunk_rows: int = 1024
) -> tuple[Tensor, Tensor]:
    """`token_logprobs(hidden @ weight.T, targets)` computed chunk by chunk over rows.

    hidden [N, H], weight [V, H] (the LM head), targets [N]. Differentiable w.r.t. hidden and
    weight. Under autograd every chunk's fp32 log-softmax stays saved until the backward, so the
    reference holds O(N V) fp32 when it trains; the Triton and csrc variants keep a few floats per
    row and recompute the logits tile by tile in their backward (`selfdistill.ops.logprob_host`).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_token_logprobs expects hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    parts = [token_logprobs(hidden[s:s + chunk_rows] @ weight.t(), targets[s:s + chunk_rows], temperature)
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


def contrast_position_kinds(divergent: Tensor, have_decoy_rows: bool) -> Tensor:
    """Classify the [R, K] answer positions for `gold_decoy_contrast`: 0 = not divergent,
    1 = first divergent position of its row (gold and decoy prefixes agree: one logit row, no
    vocabulary pass), 2 = a later divergent position (needs both passes, SPEC section 1)."""
    div = divergent.bool()
    first = div & (div.long().cumsum(-1) == 1)
    kinds = div.long() + (div & ~first).long()
    if not have_decoy_rows and bool((kinds == 2).any()):
        rows = torch.nonzero((kinds == 2).any(-1)).flatten().tolist()
        raise ValueError(
            f"gold_decoy_contrast: decoy_logits=None but rows {rows[:8]} have more than one divergent position; "
            "positions after the first need the decoy pass's logits"
        )
    return kinds


def masked_finite_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row sum of `values` [R, K] over `mask`; NaN (non-member, SPEC section 2) for a row with
    no masked position or with a NaN/inf among its masked values."""
    used = mask.bool()
    bad = (used & ~torch.isfinite(values)).any(-1) | ~used.any(-1)
    total = torch.where(used, values, 0.0).sum(-1)
    return torch.where(bad, torch.full_like(total, float("nan")), total)


def gold_decoy_contrast(
    gold_logits: Tensor, decoy_logits: Tensor | None, gold_ids: Tensor, decoy_ids: Tensor, divergent: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-position `logp(gold_i | c, gold_<i) - logp(decoy_i | c, decoy_<i)` and the belief B(c).

    gold_logits [R, K, V]: row (r, k) = the scorer's logits predicting answer token k after
    context r + gold_<k; decoy_logits [R, K, V] likewise for the decoy pass, or None when no row has
    a second divergent position. gold_ids, decoy_ids [R, K]: the answer tokens (equal length,
    rows padded to K). divergent [R, K]: positions where gold and decoy differ.
    At a row's first divergent position the prefixes agree, so the term is
    (z[gold] - z[decoy]) / T of the gold row (SPEC section 1); later ones use both passes.
    Returns fp32 (contrast [R, K], 0 off `divergent`; belief [R] = sum over `divergent`, NaN for a
    row with no divergent position or a non-finite term).
    """
    R, K = divergent.shape
    kinds = contrast_position_kinds(divergent, decoy_logits is not None)
    contrast = torch.zeros(R, K, dtype=torch.float32, device=gold_logits.device)
    first, later = kinds == 1, kinds == 2
    rows = gold_logits[first].float()
    z_gold = rows.gather(-1, gold_ids[first].long().unsqueeze(-1)).squeeze(-1)
    z_decoy = rows.gather(-1, decoy_ids[first].long().unsqueeze(-1)).squeeze(-1)
    contrast = contrast.index_put((first,), (z_gold - z_decoy) / temperature)
    if bool(later.any()):
        lp_gold, _ = token_logprobs(gold_logits[later], gold_ids[later], temperature)
        lp_decoy, _ = token_logprobs(decoy_logits[later], decoy_ids[later], temperature)
        contrast = contrast.index_put((later,), lp_gold - lp_decoy)
    return contrast, masked_finite_sum(contrast, divergent)


def clipped_mean_min(values: Tensor, mask: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT) -> Tensor:
    """Per row of [R, K]: mean(clip(x, -clip, clip)) + min_weight * min(clip(x, -clip, clip)) over
    `mask`. gm's x and PMI's `mean_min` aggregation (SPEC section 2). NaN for a row with no masked
    value or a NaN/inf among them (clipping must not turn an inf into a member)."""
    used = mask.bool()
    x = values.float()
    bad = (used & ~torch.isfinite(x)).any(-1) | ~used.any(-1)
    c = torch.where(used & torch.isfinite(x), x, 0.0).clamp(-clip, clip)
    mean = torch.where(used, c, 0.0).sum(-1) / used.sum(-1).clamp(min=1)
    low = torch.where(used, c, float("inf")).amin(-1)
    out = mean + min_weight * low
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def gold_decoy_did(
    contrast_meta: Tensor, contrast_placebo: Tensor, divergent: Tensor, clip: float = REWARD_CLIP, min_weight: float = MIN_WEIGHT
) -> Tensor:
    """gm's x (SPEC section 2) from the contrasts after X + M and after X + placebo:
    did_i = [g_i(M) - g_i(pl)] - [d_i(M) - d_i(pl)] = contrast_i(M) - contrast_i(pl)."""
    return clipped_mean_min(contrast_meta - contrast_placebo, divergent, clip, min_weight)
