"""Host side of the fused policy loss, shared by the Triton kernel and the csrc extension.

A fused implementation supplies one *row pass*: per completion row it computes the per-token loss
terms (clipped / dual-clipped surrogate, KL, entropy bonus, times the progressive weight formed from
the row's length) and returns

    coef [B, T]      w_t * d l_t / d logp_t  (0 off the mask)
    coef_ent [B, T]  -entropy_coef * w_t     (or None when not needed)
    rows [B, 7]      per row: sum of w_t l_t, tokens, clipped low, clipped high, sum ratio, sum kl, sum entropy

Everything after that is here: the aggregation of the chosen loss type (one scale per row), the
stats, and an autograd Function whose backward is the elementwise coef * row scale * grad.
Only logp and entropy get gradients; old_logp, ref_logp and the advantages are constants of the step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from selfdistill.ops.calls import backend_of, record

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo")
KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
TOKEN_WEIGHTINGS = ("uniform", "ramp")
N_ROW_STATS = 7  # per row: loss, tokens, clipped low, clipped high, ratio, kl, entropy

RowPass = Callable[..., tuple[Tensor, "Tensor | None", Tensor]]


def check_policy_loss_inputs(logp, old_logp, advantages, loss_mask, lengths, ref_logp, entropy, loss_type, kl_estimator,
                             token_weighting, max_len_norm) -> None:
    if logp.dim() != 2:
        raise ValueError(f"policy_loss expects logp [B, T]; got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("loss_mask", loss_mask), ("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"policy_loss: {name} must be [B, T] = {tuple(logp.shape)} like logp, got {tuple(t.shape)}")
    if lengths.shape != logp.shape[:1]:
        raise ValueError(f"policy_loss: lengths must be [B={logp.shape[0]}], got {tuple(lengths.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not valid; choose grpo, dapo, dr_grpo or gspo")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {kl_estimator!r} is not valid; choose k1, k2 or k3")
    if token_weighting not in TOKEN_WEIGHTINGS:
        raise ValueError(f"token weighting {token_weighting!r} is not valid; choose uniform or ramp")
    if loss_type == "dr_grpo" and not max_len_norm:
        raise ValueError("loss_type=dr_grpo needs max_len_norm (the fixed generation length)")


def aggregate(rows: Tensor, loss_type: str, max_len_norm: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stats [5] = clip low, clip high, ratio, kl, entropy means over tokens, row_scale [B])."""
    B = rows.shape[0]
    row_loss, tokens = rows[:, 0], rows[:, 1]
    if loss_type in ("grpo", "gspo"):
        row_scale = 1.0 / (max(B, 1) * tokens.clamp(min=1.0))
    elif loss_type == "dapo":
        row_scale = (1.0 / tokens.sum().clamp(min=1.0)).expand(B)
    else:
        row_scale = torch.full((B,), 1.0 / (max(B, 1) * max_len_norm), dtype=torch.float32, device=rows.device)
    loss = (row_loss * row_scale).sum()
    totals = rows[:, 1:7].sum(0)
    return loss, totals[1:] / totals[0].clamp(min=1.0), row_scale


class RowPassPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old_logp, advantages, loss_mask, lengths, ref_logp, row_pass: RowPass, options: dict):
        need_ent_grad = entropy is not None and ctx.needs_input_grad[1]
        coef, coef_ent, rows = row_pass(logp, old_logp, advantages, loss_mask, lengths, ref_logp, entropy,
                                        need_entropy_grad=need_ent_grad, **options)
        loss, stats, row_scale = aggregate(rows, options["loss_type"], options["max_len_norm"])
        ctx.save_for_backward(coef, coef_ent, row_scale)
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, dloss, _dstats):
        coef, coef_ent, row_scale = ctx.saved_tensors
        scale = (row_scale * dloss).unsqueeze(1)
        dlogp = (coef * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dent = (coef_ent * scale).to(ctx.dtypes[1]) if coef_ent is not None and ctx.needs_input_grad[1] else None
        return dlogp, dent, None, None, None, None, None, None, None


def fused_policy_loss(
    row_pass: RowPass, logp: Tensor, old_logp: Tensor, advantages: Tensor, loss_mask: Tensor, lengths: Tensor, *,
    ref_logp: Tensor | None, entropy: Tensor | None, loss_type: str, clip_low: float, clip_high: float,
    dual_clip: float | None, kl_coef: float, kl_estimator: str, entropy_coef: float, token_weighting: str,
    max_len_norm: int | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`selfdistill.ops.reference.policy_loss` semantics on top of a fused `row_pass`."""
    check_policy_loss_inputs(logp, old_logp, advantages, loss_mask, lengths, ref_logp, entropy, loss_type, kl_estimator,
                             token_weighting, max_len_norm)
    options = dict(
        loss_type=loss_type, clip_low=float(clip_low), clip_high=float(clip_high), dual_clip=dual_clip, kl_coef=float(kl_coef),
        kl_estimator=kl_estimator, entropy_coef=float(entropy_coef), token_weighting=token_weighting, max_len_norm=max_len_norm,
    )
    record("policy_loss", backend_of(row_pass))
    loss, stats = RowPassPolicyLoss.apply(logp, entropy, old_logp, advantages, loss_mask, lengths, ref_logp, row_pass, options)
    out = {"clip_ratio/low_mean": stats[0], "clip_ratio/high_mean": stats[1], "ratio_mean": stats[2]}
    if ref_logp is not None:
        out["kl"] = stats[3]
    if entropy is not None:
        out["entropy"] = stats[4]
    return loss, out
