// One decode step of a Qwen3 / Qwen2 / Llama decoder on the CPU, the whole model in one call: the
// C++ twin of selfdistill/rollout/direct_step.py's `DirectDecoder.__call__` (the same math, op for
// op, on the same weight tensors and row KV cache), so a step costs its matmuls and a few fused
// passes instead of ~150 Python-dispatched ops. The matmuls and the softmax are ATen's; RMSNorm and
// the rotary embedding are fused_layers.cpp; attention is two loops over the row's cached columns
// (grouped_scores, grouped_values: the query heads of a KV head read each key / value row once,
// the mask applied inline) around ATen's softmax.
//
//   x = embed[ids]; per layer: h = rmsnorm(x); q, k, v = h Wq, h Wk, h Wv (+ biases);
//   q, k = rmsnorm(q), rmsnorm(k) (Qwen3's q/k norms); q, k = rope(q), rope(k) at the row's position;
//   the row cache's column `column` <- k, v; attention of the H/Hkv query heads of each KV head over
//   columns [0, column] (-inf where attention_mask is 0; scores in the model dtype, softmax in fp32);
//   x += out Wo; x += down(silu(h Wg) * h Wu), h = rmsnorm(x); logits = rmsnorm(x) W_lm (+ bias).
//
// Layer weights come flattened, kLayerTensors per layer in the order of `direct_step._Layer`; a
// missing bias or q/k norm is an empty tensor.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "fused_layers.h"

namespace {

// Scores of one query token per row against the row's cached keys, the H / Hkv query heads of a KV
// head together (each key row read once for its group): scores [B * Hkv, group, L] in fp32 =
// scaling * (q . k_j), -inf where attention_mask[b, j] == 0 (HF's eager attention adds the mask).
at::Tensor grouped_scores(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& mask, int64_t L, double scaling) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = keys.size(1), group = H / Hkv;
  at::Tensor scores = at::empty({B * Hkv, group, L}, q.options().dtype(at::kFloat));
  const at::Tensor m = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "grouped_scores", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const int64_t* mp = m.data_ptr<int64_t>();
    float* sp = scores.data_ptr<float>();
    const int64_t s0 = keys.stride(0), s1 = keys.stride(1), s2 = keys.stride(2);
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / Hkv, h = n % Hkv;
        const scalar_t* kb = kp + b * s0 + h * s1;
        const scalar_t* qb = qp + (b * H + h * group) * D;
        float* out = sp + n * group * L;
        for (int64_t j = 0; j < L; ++j) {
          const bool real = mp[b * L + j] != 0;
          for (int64_t g = 0; g < group; ++g) {
            // scores in the model dtype (HF: q k^T * scaling, then the mask), softmax in fp32 below
            const scalar_t s = static_cast<scalar_t>(dot_lanes<acc_t>(qb + g * D, kb + j * s2, D) * static_cast<acc_t>(scaling));
            out[g * L + j] = real ? static_cast<float>(s) : -std::numeric_limits<float>::infinity();
          }
        }
      }
    });
  });
  return scores;
}

// out [B, H * D] = probs [B * Hkv, group, L] (model dtype) times the rows' cached values.
at::Tensor grouped_values(const at::Tensor& probs, const at::Tensor& values, int64_t H) {
  const int64_t BH = probs.size(0), group = probs.size(1), L = probs.size(2), Hkv = values.size(1), D = values.size(3);
  const int64_t B = BH / Hkv;
  at::Tensor out = at::empty({B, H * D}, values.options());
  const at::Tensor p = probs.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "grouped_values", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t s0 = values.stride(0), s1 = values.stride(1), s2 = values.stride(2);
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(group * D);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / Hkv, h = n % Hkv;
        const scalar_t* vb = vp + b * s0 + h * s1;
        const scalar_t* pb = pp + n * group * L;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < L; ++j) {
          const scalar_t* vj = vb + j * s2;
          for (int64_t g = 0; g < group; ++g) {
            const acc_t w = static_cast<acc_t>(pb[g * L + j]);
            acc_t* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<acc_t>(vj[d]);
          }
        }
        scalar_t* ob = op + (b * H + h * group) * D;  // query head h * group + g of row b
        for (int64_t i = 0; i < group * D; ++i) ob[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

constexpr int64_t kLayerTensors = 18;
enum LayerTensor {
  kInputNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kQNorm, kKNorm, kO, kOBias, kPostNorm,
  kGate, kGateBias, kUp, kUpBias, kDown, kDownBias
};

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() && t.numel() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor rms(const at::Tensor& x, const at::Tensor& w, double eps) { return std::get<0>(rms_norm_forward(x, w, eps)); }

}  // namespace

at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& attention_mask,
                       const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& embed,
                       const at::Tensor& final_norm, const at::Tensor& lm_head, const at::Tensor& lm_head_bias,
                       const std::vector<at::Tensor>& layers, const std::vector<at::Tensor>& keys,
                       const std::vector<at::Tensor>& values, int64_t column, int64_t heads, int64_t kv_heads,
                       double eps, double scaling) {
  const int64_t n_layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layers * kLayerTensors && values.size() == keys.size(),
              "decode_step: ", layers.size(), " layer tensors for ", n_layers, " cache layers (", kLayerTensors,
              " per layer expected)");
  TORCH_CHECK(ids.dim() == 1 && positions.sizes() == ids.sizes(), "decode_step: ids and positions must be [B]");
  TORCH_CHECK(embed.device().is_cpu(), "decode_step: the C++ decode step runs on CPU tensors");
  const int64_t B = ids.size(0), L = column + 1;
  TORCH_CHECK(attention_mask.dim() == 2 && attention_mask.size(0) == B && attention_mask.size(1) == L,
              "decode_step: attention_mask must be [", B, ", ", L, "], got ", attention_mask.sizes());
  TORCH_CHECK(heads % kv_heads == 0, "decode_step: ", heads, " query heads are not a multiple of ", kv_heads,
              " KV heads");
  const int64_t group = heads / kv_heads;
  at::Tensor x = at::embedding(embed, ids);  // [B, hidden]
  const int64_t D = cos_table.size(1);
  const at::Tensor cos = cos_table.index_select(0, positions).view({B, 1, D});
  const at::Tensor sin = sin_table.index_select(0, positions).view({B, 1, D});
  const at::Tensor mask = attention_mask.to(at::kLong);
  for (int64_t i = 0; i < n_layers; ++i) {
    const at::Tensor* w = layers.data() + i * kLayerTensors;
    const at::Tensor& kc = keys[i];
    const at::Tensor& vc = values[i];
    TORCH_CHECK(kc.dim() == 4 && kc.size(0) == B && kc.size(1) == kv_heads && kc.size(3) == D && column < kc.size(2),
                "decode_step: layer ", i, " key cache ", kc.sizes(), " does not hold column ", column, " of ", B,
                " rows x ", kv_heads, " heads x ", D);
    at::Tensor h = rms(x, w[kInputNorm], eps);
    at::Tensor q = at::linear(h, w[kQ], maybe(w[kQBias])).view({B, heads, D});
    at::Tensor k = at::linear(h, w[kK], maybe(w[kKBias])).view({B, kv_heads, D});
    at::Tensor v = at::linear(h, w[kV], maybe(w[kVBias])).view({B, kv_heads, D});
    if (w[kQNorm].numel()) {
      q = rms(q, w[kQNorm], eps);
      k = rms(k, w[kKNorm], eps);
    }
    q = rope_apply(q.view({B, heads, 1, D}), cos, sin, false);
    k = rope_apply(k.view({B, kv_heads, 1, D}), cos, sin, false);
    kc.select(2, column).copy_(k.view({B, kv_heads, D}));
    vc.select(2, column).copy_(v);
    const at::Tensor scores = grouped_scores(q.reshape({B, heads, D}).contiguous(), kc, mask, L, scaling);
    const at::Tensor probs = at::_softmax(scores, -1, false).to(x.scalar_type());
    const at::Tensor out = grouped_values(probs, vc, heads);
    x.add_(at::linear(out, w[kO], maybe(w[kOBias])));
    h = rms(x, w[kPostNorm], eps);
    const at::Tensor act = at::silu(at::linear(h, w[kGate], maybe(w[kGateBias]))).mul_(at::linear(h, w[kUp], maybe(w[kUpBias])));
    x.add_(at::linear(act, w[kDown], maybe(w[kDownBias])));
  }
  return at::linear(rms(x, final_norm, eps), lm_head, maybe(lm_head_bias));
}
