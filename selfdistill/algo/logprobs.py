"""Per-token log-probs (and entropy) of completion tokens under a causal LM.

Sequences are laid out as [left-padded prompt | right-padded completion]; position ids follow the
attention mask so a left-padded row is positioned exactly as it was during generation. Only the
hidden states of real completion positions go through the LM head, via the fused-linear op
(`selfdistill.ops`), so [tokens, vocab] logits are never built for padding, and with the Triton
backend never built at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.rollout.base import pad_left


def build_sequences(prompt_ids: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, pad_id: int):
    """(input_ids [R, P+T], attention_mask, position_ids, P) for prompt + completion."""
    p_ids, p_mask = pad_left(prompt_ids, pad_id)
    input_ids = torch.cat([p_ids, completion_ids.cpu()], dim=1)
    attn = torch.cat([p_mask, completion_mask.long().cpu()], dim=1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return input_ids, attn, pos, p_ids.shape[1]


def unwrap(model):
    """The underlying HF model of an engine-wrapped one (DDP/FSDP/DeepSpeed keep it in .module)."""
    return getattr(model, "module", model)


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """The decoder's last hidden states [R, L, H], from a forward of `model` itself.

    `model` is the engine's model (DDP / FSDP2 / DeepSpeed wrapper or plain HF model). Calling it,
    rather than its inner decoder, is what runs the wrapper's hooks: DDP's gradient all-reduce,
    FSDP2's root all-gather (which keeps the LM head gathered until backward), DeepSpeed's start of
    forward. The LM head runs on one position only (`logits_to_keep=1`); the states are read off
    the decoder with a forward hook, so no [tokens, vocab] logits are built.
    """
    captured = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


@dataclass
class CompletionOutputs:
    """A model's outputs on the completion tokens of a batch of rows."""

    logp: Tensor  # [R, T] fp32, 0 outside the completion mask
    entropy: Optional[Tensor]  # [R, T] fp32 or None
    hidden: Optional[Tensor]  # [N, H]: the final hidden state before each completion token (N = mask.sum(), row-major)
    lm_head: Optional[Tensor]  # [V, H]: the LM-head weight that turns `hidden` into logits


def completion_outputs(
    model, prompt_ids: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, pad_id: int,
    temperature: float = 1.0, with_entropy: bool = False, with_hidden: bool = False,
) -> CompletionOutputs:
    """Per-token log-probs (and entropy) of the completion tokens; with `with_hidden` also the hidden
    states and LM-head weight they come from, for losses over the vocabulary (top-K distillation,
    SPEC section 6) that must not rebuild the [N, V] logits."""
    device = next(model.parameters()).device
    input_ids, attn, pos, P = build_sequences(prompt_ids, completion_ids, completion_mask, pad_id)
    hf = unwrap(model)
    hidden = final_hidden_states(model, input_ids.to(device), attn.to(device), pos.to(device))
    T = completion_ids.shape[1]
    mask = completion_mask.to(device)
    h = hidden[:, P - 1: P - 1 + T][mask]  # the state before each completion token predicts it
    targets = completion_ids.to(device)[mask]
    weight = hf.get_output_embeddings().weight
    lp, ent = ops.sequence_token_logprobs(h, weight, targets, temperature)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(mask, lp)
    entropy = None
    if with_entropy:
        entropy = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_scatter(mask, ent)
    return CompletionOutputs(logp, entropy, h if with_hidden else None, weight if with_hidden else None)


def completion_logprobs(
    model, prompt_ids: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, pad_id: int,
    temperature: float = 1.0, with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """logp [R, T] (0 outside `completion_mask`) and optionally entropy [R, T], fp32."""
    out = completion_outputs(model, prompt_ids, completion_ids, completion_mask, pad_id, temperature, with_entropy)
    return out.logp, out.entropy
