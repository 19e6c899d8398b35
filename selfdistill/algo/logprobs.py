"""Per-token log-probs (and entropy) of completion tokens under a causal LM.

The rows are packed (`selfdistill.algo.packing`): one sequence of the real tokens, each distinct
prompt once, every token at the position it has in its own row, attention per row. Where packing
does not apply (a model whose attention does not go through HF's attention interface, flash or
flex attention, sliding-window layers, a completion mask with holes, an empty prompt, or activation
checkpointing with a backward outside `grouped_prefix_attention_on`), rows are laid out as
[left-padded prompt | right-padded completion] with position ids following the attention mask, so
a left-padded row is positioned exactly as it was during generation. Either way only the hidden
states of real completion positions go through the LM head, via the fused-linear op
(`selfdistill.ops`), so [tokens, vocab] logits are never built for padding, and with the Triton
backend never built at all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from selfdistill import ops
from selfdistill.algo.packing import (GROUPED_PREFIX, NO_MASK, grouped_prefix_attention_on, pack_rows, packable,
                                      supports_grouped_prefix)
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


def final_hidden_states(model, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Tensor, **kwargs) -> Tensor:
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
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1, use_cache=False,
              **kwargs)
    finally:
        handle.remove()
    return captured[-1]


def uses_packing(hf_model, prompt_ids: list[list[int]], completion_mask: Tensor) -> bool:
    """Whether `completion_outputs` packs these rows (see the module docstring). Under activation
    checkpointing a forward with gradients packs only inside `grouped_prefix_attention_on`: the
    backward recomputes each layer and must find the packed attention switched on again."""
    if not supports_grouped_prefix(hf_model) or not packable(prompt_ids, completion_mask.cpu()):
        return False
    recomputed = torch.is_grad_enabled() and activation_checkpointing(hf_model)
    return not recomputed or hf_model.config._attn_implementation == GROUPED_PREFIX


def activation_checkpointing(hf_model) -> bool:
    """HF activation checkpointing is on (`model.gradient_checkpointing`, selfdistill.engine.memory)."""
    flag = "is_activation_checkpointing" if hasattr(type(hf_model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(hf_model, flag, False))


def packing_scope(model):
    """A context over a forward and its backward in which packed forwards stay valid under activation
    checkpointing (the packed attention stays switched on for the recomputation); a no-op for a
    model that does not pack."""
    hf = unwrap(model)
    return grouped_prefix_attention_on(hf) if supports_grouped_prefix(hf) else contextlib.nullcontext()


def _packed_predictor_states(model, hf, prompt_ids, completion_ids: Tensor, completion_mask: Tensor, device) -> Tensor:
    """The final hidden state before each completion token [M, H] (row-major over the mask), from a
    forward of the packed rows."""
    packed = pack_rows(prompt_ids, completion_ids.cpu(), completion_mask.cpu(), device)
    with grouped_prefix_attention_on(hf):
        hidden = final_hidden_states(model, packed.input_ids, NO_MASK.to(device), packed.position_ids,
                                     grouped_layout=packed.layout)
    if packed.layout.calls == 0:
        raise RuntimeError(f"{type(hf).__name__} did not call its attention through HF's attention interface, so the "
                           "packed rows were attended as one sequence; selfdistill.algo.packing.supports_grouped_prefix "
                           "must return False for it")
    return hidden[0].index_select(0, packed.predictors)


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
    hf = unwrap(model)
    mask = completion_mask.to(device)
    if uses_packing(hf, prompt_ids, completion_mask):
        h = _packed_predictor_states(model, hf, prompt_ids, completion_ids, completion_mask, device)
    else:
        input_ids, attn, pos, P = build_sequences(prompt_ids, completion_ids, completion_mask, pad_id)
        hidden = final_hidden_states(model, input_ids.to(device), attn.to(device), pos.to(device))
        T = completion_ids.shape[1]
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
