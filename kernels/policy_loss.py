"""Fused clipped-ratio policy loss with in-kernel progressive token weights (SPEC sections 5, 7, 8).

One program per completion walks its T tokens in tiles:

1. (ramp weighting or gspo only) a pass over the row for what every token needs first:
   n = #{t in mask, t < L} and sum of those t give the ramp's mean, so the weight
   w_t = (w0 + (w1 - w0) t / max(L - 1, 1)) / mean is formed per token and never stored; gspo's
   sequence log-ratio mean_t(logp - old_logp) over the mask;
2. the loss pass: per token the clipped (dual-clipped) surrogate, KL and entropy terms, times w_t,
   summed per row together with the stats counters, and the per-token coefficient
   c_t = w_t d(l_t)/d(logp_t) (and -entropy_coef w_t for the entropy input) for the backward.

The rows' sums are reduced on the host (B floats, `selfdistill.ops.row_pass_loss`, shared with the
csrc extension) into the loss of the chosen aggregation, which fixes one scale per row; the backward is grad_logp = c * scale_row * grad_loss, an elementwise
product with no recomputation. Only logp and entropy get gradients; old_logp, ref_logp and the
advantages are constants of the step, as in every PPO-style trainer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from selfdistill.kernels.utils import as_kernel_mask, check_launchable, tile_sum
from selfdistill.ops.reference import RAMP_W0, RAMP_W1
from selfdistill.ops.row_pass_loss import KL_ESTIMATORS, N_ROW_STATS, fused_policy_loss


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, lengths_ptr, ref_ptr, ent_ptr,
    coef_ptr, coef_ent_ptr, row_stats_ptr,
    T, ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef, w0, w1,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, KL_IN_LOSS: tl.constexpr, ENT_IN_LOSS: tl.constexpr,
    KL_EST: tl.constexpr, RAMP: tl.constexpr, GSPO: tl.constexpr, PREPASS: tl.constexpr, DUAL: tl.constexpr,
    STORE_COEF_ENT: tl.constexpr, N_STATS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    base = b * T
    length = tl.load(lengths_ptr + b).to(tl.float32)
    ramp_denom = tl.maximum(length - 1.0, 1.0)

    # pass 1: the row statistics every token's loss depends on
    n_w = 0.0
    sum_t = 0.0
    sum_log_ratio = 0.0
    n_mask = 0.0
    if PREPASS:  # RAMP or GSPO
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            in_row = t < T
            m = (tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0) & in_row
            if RAMP:
                weighted = m & (t.to(tl.float32) < length)
                n_w += tile_sum(weighted.to(tl.float32))
                sum_t += tile_sum(tl.where(weighted, t.to(tl.float32), 0.0))
            if GSPO:
                lp = tl.load(logp_ptr + base + t, mask=m, other=0.0).to(tl.float32)
                old = tl.load(old_ptr + base + t, mask=m, other=0.0).to(tl.float32)
                sum_log_ratio += tile_sum(tl.where(m, lp - old, 0.0))
                n_mask += tile_sum(m.to(tl.float32))
    # mean of the raw ramp over its tokens: w0 + (w1 - w0) * mean(t) / max(L - 1, 1)
    ramp_mean = w0 + (w1 - w0) * (sum_t / tl.maximum(n_w, 1.0)) / ramp_denom
    inv_ramp_mean = tl.where(n_w > 0.0, 1.0 / ramp_mean, 0.0)
    seq_log_ratio = sum_log_ratio / tl.maximum(n_mask, 1.0)

    # pass 2: per-token loss, gradient coefficient and stats
    acc_loss = 0.0
    acc_tokens = 0.0
    acc_low = 0.0
    acc_high = 0.0
    acc_ratio = 0.0
    acc_kl = 0.0
    acc_ent = 0.0
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        in_row = t < T
        m = (tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0) & in_row
        lp = tl.load(logp_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        if GSPO:
            log_ratio = tl.full([BLOCK_T], 0.0, tl.float32) + seq_log_ratio
        else:
            log_ratio = lp - tl.load(old_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        ratio = tl.exp(log_ratio)
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        pg_free = -ratio * adv
        pg_clip = -clipped * adv
        pg = tl.maximum(pg_free, pg_clip)
        # d/dlogp: -r A where the unclipped branch is the max (ties included: both give -r A there)
        dloss = tl.where(pg_free >= pg_clip, pg_free, 0.0)
        if DUAL:
            cap = -dual_clip * adv
            capped = (adv < 0.0) & (pg > cap)
            pg = tl.where(capped, cap, pg)
            dloss = tl.where(capped, 0.0, dloss)
        loss = pg
        if HAS_REF:
            x = lp - tl.load(ref_ptr + base + t, mask=m, other=0.0).to(tl.float32)  # log pi/ref
            if KL_EST == 1:
                kl = x
                dkl = tl.full([BLOCK_T], 1.0, tl.float32)
            elif KL_EST == 2:
                kl = 0.5 * x * x
                dkl = x
            else:
                kl = tl.exp(-x) + x - 1.0
                dkl = 1.0 - tl.exp(-x)
            acc_kl += tile_sum(tl.where(m, kl, 0.0))
            if KL_IN_LOSS:
                loss = loss + kl_coef * kl
                dloss = dloss + kl_coef * dkl
        if HAS_ENT:
            ent = tl.load(ent_ptr + base + t, mask=m, other=0.0).to(tl.float32)
            acc_ent += tile_sum(tl.where(m, ent, 0.0))
            if ENT_IN_LOSS:
                loss = loss - entropy_coef * ent
        if RAMP:
            tf = t.to(tl.float32)
            w = tl.where(m & (tf < length), (w0 + (w1 - w0) * tf / ramp_denom) * inv_ramp_mean, 0.0)
        else:
            w = m.to(tl.float32)
        acc_loss += tile_sum(tl.where(m, loss * w, 0.0))
        tl.store(coef_ptr + base + t, tl.where(m, dloss * w, 0.0), mask=in_row)
        if STORE_COEF_ENT:
            tl.store(coef_ent_ptr + base + t, tl.where(m, -entropy_coef * w, 0.0), mask=in_row)
        acc_tokens += tile_sum(m.to(tl.float32))
        acc_low += tile_sum((m & (ratio < ratio_low) & (adv < 0.0)).to(tl.float32))
        acc_high += tile_sum((m & (ratio > ratio_high) & (adv > 0.0)).to(tl.float32))
        acc_ratio += tile_sum(tl.where(m, ratio, 0.0))

    out = row_stats_ptr + b * N_STATS
    tl.store(out + 0, acc_loss)
    tl.store(out + 1, acc_tokens)
    tl.store(out + 2, acc_low)
    tl.store(out + 3, acc_high)
    tl.store(out + 4, acc_ratio)
    tl.store(out + 5, acc_kl)
    tl.store(out + 6, acc_ent)


def row_pass(
    logp, old_logp, advantages, loss_mask, lengths, ref_logp, entropy, *, loss_type, clip_low, clip_high, dual_clip,
    kl_coef, kl_estimator, entropy_coef, token_weighting, max_len_norm, need_entropy_grad,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The Triton row pass of `selfdistill.ops.row_pass_loss`: (coef [B, T], coef_entropy or None, rows [B, 7])."""
    check_launchable("policy_loss", *(t for t in (logp, old_logp, advantages, loss_mask, lengths, ref_logp, entropy) if t is not None))
    B, T = logp.shape
    device = logp.device
    ent_in_loss = entropy is not None and entropy_coef != 0
    coef = torch.empty(B, T, dtype=torch.float32, device=device)  # the kernel writes every element
    coef_ent = torch.empty(B, T, dtype=torch.float32, device=device) if ent_in_loss and need_entropy_grad else None
    rows = torch.zeros(B, N_ROW_STATS, dtype=torch.float32, device=device)
    if B and T:
        block = max(16, min(1024, triton.next_power_of_2(T)))
        _policy_loss_fwd_kernel[(B,)](
            logp.contiguous(), old_logp.contiguous(), advantages.contiguous(), as_kernel_mask(loss_mask), lengths.contiguous(),
            (ref_logp if ref_logp is not None else logp).contiguous(), (entropy if entropy is not None else logp).contiguous(),
            coef, coef_ent if coef_ent is not None else coef, rows,
            T, 1.0 - clip_low, 1.0 + clip_high, float(dual_clip or 0.0), float(kl_coef), float(entropy_coef), RAMP_W0, RAMP_W1,
            HAS_REF=ref_logp is not None, HAS_ENT=entropy is not None, KL_IN_LOSS=ref_logp is not None and kl_coef != 0,
            ENT_IN_LOSS=ent_in_loss, KL_EST=KL_ESTIMATORS[kl_estimator], RAMP=token_weighting == "ramp",
            GSPO=loss_type == "gspo", PREPASS=token_weighting == "ramp" or loss_type == "gspo", DUAL=dual_clip is not None,
            STORE_COEF_ENT=coef_ent is not None, N_STATS=N_ROW_STATS, BLOCK_T=block, num_warps=4,
        )
    return coef, coef_ent, rows


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
    """Triton `policy_loss`; same signature and semantics as `selfdistill.ops.reference.policy_loss`.

    Gradients flow to `logp` and `entropy` only (old_logp, ref_logp, advantages are constants).
    """
    return fused_policy_loss(
        row_pass, logp, old_logp, advantages, loss_mask, lengths, ref_logp=ref_logp, entropy=entropy, loss_type=loss_type,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, token_weighting=token_weighting, max_len_norm=max_len_norm,
    )
