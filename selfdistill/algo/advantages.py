"""Group advantages per head and their routing onto completion tokens (SPEC section 4).

Each head (correctness, plus the arm's meta head) is centred on its own group mean over its
members, without dividing by the std (Dr.GRPO style). A member is a rollout whose raw head value
is finite; non-members (NaN, SPEC section 2) get 0 and are left out of the mean, so they never move
a sibling's advantage. A group with a single member gets 0 for that head: the belief heads reward
*better* meta among the rollouts that wrote meta, not writing meta as such.

Routing: correctness -> non-meta tokens (body + answer); pmi, gm, pmi_shift -> meta tokens; cf and
asym_cf -> answer tokens of with-arm rollouts. Advantages routed to the same token add. Meta heads
are scaled by w(s) = 0.8 * min(1, s / 80), s = optimizer steps applied before the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

from selfdistill.rewards.common import as_bool, as_float64, group_index
from selfdistill.rewards.registry import CORRECTNESS_HEAD, META_ROUTES, ROUTE_ANSWER_WITH_ARM, ROUTE_META

META_WEIGHT = 0.8
META_WARMUP_STEPS = 80


def group_centered(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Centre one head on its group means over members: (advantages float64 [R], member bool [R]).

    values: [R] raw head values, NaN (or +-inf) for non-members. group_ids: integer [R].
    adv_i = v_i - mean over the finite members of i's group; 0 for non-members and for every
    rollout of a group with fewer than two members.
    """
    v = as_float64(values, "values")
    if v.dim() != 1:
        raise ValueError(f"group_centered: values must be [R]; got {tuple(v.shape)}")
    uniq, inv = group_index(group_ids, "group_centered")
    if inv.shape != v.shape:
        raise ValueError(f"group_centered: group_ids has shape {tuple(inv.shape)}, expected {tuple(v.shape)}")
    member = torch.isfinite(v)
    zeros = torch.zeros(uniq.numel(), dtype=torch.float64, device=v.device)
    sums = zeros.index_add(0, inv, torch.where(member, v, torch.zeros_like(v)))  # NaN never summed
    counts = zeros.index_add(0, inv, member.to(torch.float64))
    mean = sums / counts.clamp(min=1.0)
    scored = member & (counts[inv] > 1)
    adv = torch.where(scored, v - mean[inv], torch.zeros_like(v))
    return adv, member


def meta_weight(steps_applied: int, weight: float = META_WEIGHT, warmup: int = META_WARMUP_STEPS) -> float:
    """w(s) = weight * min(1, s / warmup) (SPEC section 4); warmup 0 -> full weight from step 0.

    steps_applied: optimizer steps applied before this rollout batch (skipped non-finite steps do
    not count; resume continues it), so the first batch has weight 0.
    """
    if steps_applied < 0:
        raise ValueError(f"meta_weight: steps_applied={steps_applied} must be >= 0")
    if warmup < 0:
        raise ValueError(f"meta_weight: warmup={warmup} must be >= 0 (config reward.meta_warmup_steps)")
    if weight < 0:
        raise ValueError(f"meta_weight: weight={weight} must be >= 0 (config reward.meta_weight)")
    if warmup == 0:
        return float(weight)
    return float(weight) * min(1.0, steps_applied / warmup)


def route_advantages(
    correctness_adv: Tensor,
    meta_adv: Optional[Tensor],
    meta_route: Optional[str],
    *,
    meta_mask: Tensor,
    answer_mask: Tensor,
    valid_mask: Tensor,
    with_arm: Optional[Tensor] = None,
    meta_w: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-token advantages [R, T] from per-rollout head advantages (SPEC section 4).

    correctness_adv: [R], goes to non-meta tokens (valid & ~meta). meta_adv: [R] centred meta head,
    or None for `base`; it is multiplied by meta_w (= `meta_weight(s)`, required with it) and goes
    to meta tokens (meta_route "meta") or to answer tokens of with-arm rollouts ("answer_with_arm",
    needs with_arm bool [R]). Region masks: bool [R, T] from `MetaRegions`. Advantages routed to
    one token add. Non-finite advantages raise: NaN must be settled by `group_centered` first.
    """
    ca = as_float64(correctness_adv, "correctness_adv")
    meta = as_bool(meta_mask, "meta_mask")
    answer = as_bool(answer_mask, "answer_mask")
    valid = as_bool(valid_mask, "valid_mask")
    if ca.dim() != 1 or meta.dim() != 2 or meta.shape[0] != ca.shape[0]:
        raise ValueError(f"route_advantages: correctness_adv must be [R] and meta_mask [R, T]; got {tuple(ca.shape)}, {tuple(meta.shape)}")
    if answer.shape != meta.shape or valid.shape != meta.shape:
        raise ValueError(
            f"route_advantages: meta_mask {tuple(meta.shape)}, answer_mask {tuple(answer.shape)} and valid_mask "
            f"{tuple(valid.shape)} must share one [R, T] shape"
        )
    if not torch.isfinite(ca).all():
        raise ValueError("route_advantages: correctness_adv has non-finite values; centre heads with group_centered first")
    out = torch.where(valid & ~meta, ca.unsqueeze(1), torch.zeros((), dtype=torch.float64))

    if meta_adv is None:
        if meta_route is not None:
            raise ValueError(f"route_advantages: meta_route={meta_route!r} given without meta_adv")
        return out.to(dtype)
    if meta_route not in META_ROUTES:
        raise ValueError(f"route_advantages: meta_route={meta_route!r} is not valid; choose one of {', '.join(META_ROUTES)}")
    if meta_w is None:
        raise ValueError("route_advantages: meta_adv needs meta_w (= meta_weight(steps_applied, ...)); there is no default weight")
    ma = as_float64(meta_adv, "meta_adv")
    if ma.shape != ca.shape:
        raise ValueError(f"route_advantages: meta_adv has shape {tuple(ma.shape)}, expected {tuple(ca.shape)}")
    if not torch.isfinite(ma).all():
        raise ValueError("route_advantages: meta_adv has non-finite values; centre heads with group_centered first")
    if meta_route == ROUTE_META:
        region = meta & valid
    else:
        assert meta_route == ROUTE_ANSWER_WITH_ARM
        if with_arm is None:
            raise ValueError("route_advantages: meta_route='answer_with_arm' needs with_arm (bool [R])")
        arm = as_bool(with_arm, "with_arm")
        if arm.shape != ca.shape:
            raise ValueError(f"route_advantages: with_arm has shape {tuple(arm.shape)}, expected {tuple(ca.shape)}")
        region = answer & valid & arm.unsqueeze(1)
    out = out + torch.where(region, (float(meta_w) * ma).unsqueeze(1), torch.zeros((), dtype=torch.float64))
    return out.to(dtype)


@dataclass(frozen=True)
class ZeroStdStats:
    """Zero-variance bookkeeping of one rollout batch (SPEC section 4).

    groups: unique group ids [G]. constant: head -> bool [G] (raw member values exactly equal, or
    0/1 member). keep_group: bool [G], False where every head is constant (what
    `algo.filter_zero_std=true` drops). keep: bool [R], keep_group per rollout.
    """

    groups: Tensor
    constant: dict[str, Tensor]
    keep_group: Tensor
    keep: Tensor
    correctness_head: str

    @property
    def frac_reward_zero_std(self) -> float:
        """Share of groups whose correctness head is constant."""
        return _share(self.constant[self.correctness_head])

    def frac_zero_std(self, head: str) -> float:
        return _share(self.constant[head])


def _share(mask: Tensor) -> float:
    return float(mask.to(torch.float64).mean()) if mask.numel() else 0.0


def zero_std_stats(heads: Mapping[str, Tensor], group_ids: Tensor, correctness_head: str = CORRECTNESS_HEAD) -> ZeroStdStats:
    """Which heads are constant in which groups, from raw head values (before the weight w).

    heads: head name -> raw values [R] (NaN for non-members); must include `correctness_head`.
    """
    if correctness_head not in heads:
        raise ValueError(f"zero_std_stats: heads {sorted(heads)} lack the correctness head {correctness_head!r}")
    uniq, inv = group_index(group_ids, "zero_std_stats")
    G = uniq.numel()
    constant: dict[str, Tensor] = {}
    for name, values in heads.items():
        v = as_float64(values, f"heads[{name!r}]")
        if v.shape != inv.shape:
            raise ValueError(f"zero_std_stats: heads[{name!r}] has shape {tuple(v.shape)}, expected {tuple(inv.shape)}")
        member = torch.isfinite(v)
        counts = torch.zeros(G, dtype=torch.long, device=v.device).index_add(0, inv, member.long())
        # Non-members enter as +inf to the min and -inf to the max, so they never break a tie.
        inf = torch.full((G,), float("inf"), dtype=torch.float64, device=v.device)
        lo = inf.scatter_reduce(0, inv, torch.where(member, v, torch.full_like(v, float("inf"))), "amin")
        hi = (-inf).scatter_reduce(0, inv, torch.where(member, v, torch.full_like(v, -float("inf"))), "amax")
        constant[name] = (counts <= 1) | (lo == hi)
    all_constant = torch.stack(list(constant.values())).all(dim=0)
    keep_group = ~all_constant
    return ZeroStdStats(uniq, constant, keep_group, keep_group[inv], correctness_head)


def reward_metrics(heads: Mapping[str, Tensor], group_ids: Tensor, correctness_head: str = CORRECTNESS_HEAD) -> dict[str, float]:
    """Logged reward statistics: `frac_reward_zero_std`, and per head `reward/<head>/frac_zero_std`,
    and `reward/<head>/nan_frac` (share of rollouts that are non-members)."""
    stats = zero_std_stats(heads, group_ids, correctness_head)
    out = {"frac_reward_zero_std": stats.frac_reward_zero_std}
    for name, values in heads.items():
        v = as_float64(values, f"heads[{name!r}]")
        member = torch.isfinite(v)
        out[f"reward/{name}/frac_zero_std"] = stats.frac_zero_std(name)
        out[f"reward/{name}/nan_frac"] = _share(~member)
    return out
