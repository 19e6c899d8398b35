"""The eager decode step computed directly from the HF model's weights (Qwen3, Qwen2, Llama).

Decoding a small model one token at a time, the HF forward's fixed cost per call (module calls,
mask construction, the cache object, output dataclasses, SDPA's setup for a one-token query)
is of the order of the step's matmuls. `DirectDecoder` runs the same decoder math on the same
weight tensors with none of that: per layer, RMSNorm -> q/k/v projections -> q/k RMSNorm (Qwen3)
-> rotary embedding -> append k, v to the row cache -> attention -> o projection -> residual ->
RMSNorm -> SwiGLU MLP -> residual; then the final norm and the LM head.

Numerics follow HF's modules op for op: RMSNorm in fp32 cast back to the input dtype before the
weight (`F.rms_norm` is bitwise the modules' formula on CPU), the model's own rotary module for
cos/sin (any rope type it implements), `rotate_half(q) * sin` written as `roll(q) * (sign * sin)`
(the same products, bitwise), and HF's eager attention math (scores in the model dtype, softmax
in fp32) on the query heads grouped onto their shared KV head, so the cache is never repeated.
Only the attention kernel differs from the HF forward's SDPA: float rounding, far below what
flips a sample (tests compare token ids with the HF-forward loop on fixed seeds).

With `ops.fused_layers` enabled for the model's device (`selfdistill.ops.fused_layers`: CPU models,
by default where the csrc extension builds) a step is one call of the C++ twin of `__call__`
(`csrc/decode_step.cpp`: the same math over the same weights and cache, RMSNorm / rotary as fused
passes, attention as loops over each row's cached columns, cos/sin read from a table of the model's
rotary module by position); else the Python step below.

`DirectDecoder.build(model)` returns None where the step does not apply (another architecture, a
sliding-window layer, another activation, sharded or not-gathered parameters, a wrapped
`forward` such as the bf16 autocast wrapper); the decode loop then uses the HF forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from selfdistill.ops import fused_layers
from selfdistill.ops.calls import record

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


@dataclass
class _Layer:
    input_norm: Tensor
    q: Tensor
    q_bias: Optional[Tensor]
    k: Tensor
    k_bias: Optional[Tensor]
    v: Tensor
    v_bias: Optional[Tensor]
    q_norm: Optional[Tensor]
    k_norm: Optional[Tensor]
    o: Tensor
    o_bias: Optional[Tensor]
    post_norm: Tensor
    gate: Tensor
    gate_bias: Optional[Tensor]
    up: Tensor
    up_bias: Optional[Tensor]
    down: Tensor
    down_bias: Optional[Tensor]


def unsupported_reason(model) -> Optional[str]:
    """Why `DirectDecoder` cannot decode `model` (None when it can)."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        return f"architecture {name} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False):
        return "a sliding-window layer"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act={getattr(config, 'hidden_act', None)!r} (supported: 'silu')"
    if getattr(model.forward, "__func__", None) is not type(model).forward:
        return "a wrapped forward (e.g. bf16 autocast): the HF forward keeps the wrapper's numerics"
    for p in model.parameters():
        if type(p.data) is not torch.Tensor or p.numel() == 0:
            return "sharded parameters (a DTensor or an empty ZeRO-3 placeholder): not gathered for generation"
    return None


class DirectDecoder:
    """Callable like `selfdistill.rollout.compiled.decode_step`: (model, input_ids [B, 1],
    position_ids [B, 1], attention_mask [B, L], cache) -> logits [B, V], the cache a
    `selfdistill.rollout.kv_cache.RowKVCache` of growing layers (one column appended per call)."""

    def __init__(self, model):
        decoder = model.model
        config = model.config
        self.rotary = decoder.rotary_emb
        self.embed = decoder.embed_tokens.weight
        self.norm, self.eps = decoder.norm.weight, config.rms_norm_eps
        self.lm_head, self.lm_head_bias = model.lm_head.weight, model.lm_head.bias
        first = decoder.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.layers = [self._layer(layer) for layer in decoder.layers[: config.num_hidden_layers]]
        half = self.head_dim // 2
        # rotate_half(x) = cat(-x2, x1) = roll(x, half) * sign, sign = (-1 on the first half, +1 after)
        self.sign = torch.cat([torch.full((half,), -1.0), torch.ones(self.head_dim - half)]).to(self.embed)
        self.native = fused_layers.enabled(self.embed.device)
        if self.native:
            empty = self.embed.new_empty(0)
            self._flat = [empty if t is None else t for layer in self.layers for t in vars(layer).values()]
            self._lm_head_bias = empty if self.lm_head_bias is None else self.lm_head_bias
            self._cos = self._sin = empty

    @staticmethod
    def _layer(layer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            q=attn.q_proj.weight, q_bias=attn.q_proj.bias, k=attn.k_proj.weight, k_bias=attn.k_proj.bias,
            v=attn.v_proj.weight, v_bias=attn.v_proj.bias,
            q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
            k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
            o=attn.o_proj.weight, o_bias=attn.o_proj.bias, post_norm=layer.post_attention_layernorm.weight,
            gate=mlp.gate_proj.weight, gate_bias=mlp.gate_proj.bias, up=mlp.up_proj.weight, up_bias=mlp.up_proj.bias,
            down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias)

    @classmethod
    def build(cls, model) -> Optional["DirectDecoder"]:
        return None if unsupported_reason(model) is not None else cls(model)

    def _rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """HF's RMSNorm: normalised in fp32, cast back, then scaled by the weight in the input dtype
        (fp32: one fused call, the same products)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps=self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _rotate(self, x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
        return x * cos + x.roll(self.head_dim // 2, -1) * sin_signed

    def _rotary_table(self, n: int) -> None:
        """cos/sin [n, head_dim] of positions 0..n-1 from the model's rotary module (a position's
        values do not depend on the batch it is computed in)."""
        positions = torch.arange(n, device=self.embed.device)[None]
        cos, sin = self.rotary(self.embed[:1], positions)
        self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()

    def _native_step(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache) -> Tensor:
        record("decode_step", "fused_layers")
        column = cache.layers[0].length  # the column this step writes, for every row and layer
        if self._cos.shape[0] < cache.capacity:
            self._rotary_table(cache.capacity)
        logits = fused_layers._ext().decode_step(
            input_ids[:, 0], position_ids[:, 0], attention_mask, self._cos, self._sin, self.embed, self.norm, self.lm_head,
            self._lm_head_bias, self._flat, [layer.keys for layer in cache.layers],
            [layer.values for layer in cache.layers], column, self.heads, self.kv_heads, self.eps, self.scaling)
        for layer in cache.layers:
            layer.length = column + 1
        return logits

    def __call__(self, model, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, cache) -> Tensor:
        if self.native:
            return self._native_step(input_ids, position_ids, attention_mask, cache)
        B = input_ids.shape[0]
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(input_ids[:, 0], self.embed)  # [B, hidden]
        cos, sin = self.rotary(x, position_ids)  # [B, 1, D]: broadcast over the heads of [B, heads, D]
        sin = sin * self.sign
        # [B * Hkv, H / Hkv, L]: 0 on the row's real columns, -inf on its prefix padding
        L, group = attention_mask.shape[1], H // Hkv
        bias = torch.zeros((B, 1, 1, L), dtype=x.dtype, device=x.device).masked_fill_(
            attention_mask[:, None, None, :] == 0, float("-inf")).expand(B, Hkv, group, L).reshape(B * Hkv, group, L)
        for i, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm)
            q = F.linear(h, layer.q, layer.q_bias).view(B, H, D)
            k = F.linear(h, layer.k, layer.k_bias).view(B, Hkv, D)
            v = F.linear(h, layer.v, layer.v_bias).view(B, Hkv, D)
            if layer.q_norm is not None:
                q, k = self._rms_norm(q, layer.q_norm), self._rms_norm(k, layer.k_norm)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            keys, values = cache.layers[i].update(k[:, :, None], v[:, :, None])  # [B, Hkv, L, D]
            # The H / Hkv query heads of a KV head ride on it: [B * Hkv, H/Hkv, D] against [B * Hkv, L, D];
            # scaling * (q k^T) + bias in one call.
            scores = torch.baddbmm(bias, q.view(B * Hkv, group, D), keys.reshape(B * Hkv, L, D).transpose(1, 2),
                                   alpha=self.scaling)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.bmm(probs, values.reshape(B * Hkv, L, D)).reshape(B, H * D)
            x = x + F.linear(out, layer.o, layer.o_bias)
            h = self._rms_norm(x, layer.post_norm)
            x = x + F.linear(F.silu(F.linear(h, layer.gate, layer.gate_bias)) * F.linear(h, layer.up, layer.up_bias),
                             layer.down, layer.down_bias)
        return F.linear(self._rms_norm(x, self.norm), self.lm_head, self.lm_head_bias)
