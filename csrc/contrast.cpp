// Gold-vs-decoy contrast per answer position and PMI / gm's clipped mean+min row reduction (SPEC
// sections 1, 2 and 8): the csrc twins of kernels/contrast.py, with the host side (input checks,
// position kinds, belief, autograd) shared in selfdistill/ops/contrast_host.py.
// Positions p = (r, k) of [R, K], by kind (int8):
//   0  not divergent: contrast 0, nothing read;
//   1  first divergent position of its row: the prefixes agree, so the contrast is
//      (z[gold] - z[decoy]) / T of the gold row -- two loads, no vocabulary pass;
//   2  later divergent positions: logp(gold | gold row) - logp(decoy | decoy row), each with an
//      online log-sum-exp (online_lse.h); stats[p] = (max z, log d) of the gold row, then the decoy's.
// Backward (d contrast -> d logits, g = d contrast / T): kind 1 writes +g at gold and -g at decoy of
// the gold row; kind 2 writes g ([v = gold] - p_gold(v)) to the gold row and g (p_decoy(v) - [v = decoy])
// to the decoy row. Other rows stay zero.
// clipped_mean_min: per row, mean(clip(x)) + min_weight * min(clip(x)) over the mask; NaN for a row
// with no masked value or a non-finite masked value.
// CPU here; CUDA in contrast_cuda.cu when built WITH_CUDA. An id outside the vocabulary at a
// divergent position raises on the CPU path and gives a NaN contrast on CUDA.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "contrast_layout.h"
#include "online_lse.h"
#include "tensor_dtype.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

// contrast_cuda.cu (torch-free). dtype: 0 = float32, 1 = float16, 2 = bfloat16.
cudaError_t contrast_forward_launch(const void* gold, const void* decoy, int dtype, const int64_t* gold_ids,
                                    const int64_t* decoy_ids, const int8_t* kinds, float* contrast, float* stats,
                                    int64_t P, ContrastLayout l, float inv_t, cudaStream_t stream);
cudaError_t contrast_backward_launch(const void* gold, const void* decoy, void* dgold, void* ddecoy, int dtype,
                                     const int64_t* gold_ids, const int64_t* decoy_ids, const int8_t* kinds,
                                     const float* stats, const float* dcontrast, int64_t P, ContrastLayout l,
                                     float inv_t, cudaStream_t stream);
cudaError_t clipped_mean_min_launch(const float* x, const uint8_t* mask, float* out, int64_t R, int64_t K, float clip,
                                    float min_weight, cudaStream_t stream);
#endif

namespace {

constexpr int kStats = 4;  // per position: gold (max z, log d), decoy (max z, log d)

// The [R, K, V] logits with a unit vocabulary stride (rows may be strided), the decoy tensor or the
// gold one when there are no decoy rows (kind 2 never occurs then), and the layout both share.
struct ContrastInputs {
  at::Tensor gold, decoy, gold_ids, decoy_ids, kinds;
  bool has_decoy;
  ContrastLayout layout;
};

ContrastInputs prepare(const at::Tensor& gold_logits, const at::Tensor& decoy_logits, const at::Tensor& gold_ids,
                       const at::Tensor& decoy_ids, const at::Tensor& kinds) {
  TORCH_CHECK(gold_logits.dim() == 3, "gold_decoy_contrast: gold_logits must be [R, K, V], got ", gold_logits.sizes());
  const int64_t R = gold_logits.size(0), K = gold_logits.size(1), V = gold_logits.size(2);
  const bool has_decoy = decoy_logits.numel() > 0;
  TORCH_CHECK(!has_decoy || (decoy_logits.sizes() == gold_logits.sizes() && decoy_logits.scalar_type() == gold_logits.scalar_type()),
              "gold_decoy_contrast: decoy_logits ", decoy_logits.sizes(), " must match gold_logits ", gold_logits.sizes(),
              " in shape and dtype");
  for (const at::Tensor* t : {&gold_ids, &decoy_ids}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == R && t->size(1) == K && t->scalar_type() == at::kLong,
                "gold_decoy_contrast: ids must be int64 [R, K] = [", R, ", ", K, "], got ", t->sizes());
  }
  TORCH_CHECK(kinds.dim() == 2 && kinds.size(0) == R && kinds.size(1) == K && kinds.scalar_type() == at::kChar,
              "gold_decoy_contrast: kinds must be int8 [R, K]");
  const at::Device dev = gold_logits.device();
  for (const at::Tensor* t : {&gold_ids, &decoy_ids, &kinds}) {
    TORCH_CHECK(t->device() == dev, "gold_decoy_contrast: ids and kinds must be on the logits' device ", dev, ", got ",
                t->device());
  }
  TORCH_CHECK(!has_decoy || decoy_logits.device() == dev, "gold_decoy_contrast: decoy_logits on ", decoy_logits.device(),
              ", gold_logits on ", dev);
  ContrastInputs in;
  in.gold = gold_logits.stride(2) == 1 ? gold_logits : gold_logits.contiguous();
  in.decoy = has_decoy ? (decoy_logits.stride(2) == 1 ? decoy_logits : decoy_logits.contiguous()) : in.gold;
  in.gold_ids = gold_ids.contiguous(), in.decoy_ids = decoy_ids.contiguous(), in.kinds = kinds.contiguous();
  in.has_decoy = has_decoy;
  in.layout = {K, V, in.gold.stride(0), in.gold.stride(1), in.decoy.stride(0), in.decoy.stride(1)};
  return in;
}

void check_id(int64_t id, int64_t V, int64_t p, const char* which) {
  TORCH_CHECK(id >= 0 && id < V, "gold_decoy_contrast: ", which, " id ", id, " at position ", p,
              " is outside the vocabulary [0, ", V, ")");
}

template <typename scalar_t>
void forward_positions(const scalar_t* gold, const scalar_t* decoy, const int64_t* gid, const int64_t* did,
                       const int8_t* kinds, float* contrast, float* stats, int64_t begin, int64_t end,
                       const ContrastLayout& l, float inv_t) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t r = p / l.K, k = p % l.K;
    float* st = stats + p * kStats;
    std::fill(st, st + kStats, 0.f);
    contrast[p] = 0.f;
    if (kinds[p] == 0) continue;
    check_id(gid[p], l.V, p, "gold"), check_id(did[p], l.V, p, "decoy");
    const scalar_t* g_row = gold + r * l.stride_g_r + k * l.stride_g_k;
    if (kinds[p] == 1) {
      contrast[p] = (static_cast<float>(g_row[gid[p]]) - static_cast<float>(g_row[did[p]])) * inv_t;
      continue;
    }
    const scalar_t* d_row = decoy + r * l.stride_d_r + k * l.stride_d_k;
    const RowLse lg = row_lse(g_row, l.V, inv_t), ld = row_lse(d_row, l.V, inv_t);
    contrast[p] = lg.logp(static_cast<float>(g_row[gid[p]]), inv_t) - ld.logp(static_cast<float>(d_row[did[p]]), inv_t);
    st[0] = lg.mz, st[1] = lg.log_d(), st[2] = ld.mz, st[3] = ld.log_d();
  }
}

template <typename scalar_t>
void backward_positions(const scalar_t* gold, const scalar_t* decoy, scalar_t* dgold, scalar_t* ddecoy,
                        const int64_t* gid, const int64_t* did, const int8_t* kinds, const float* stats,
                        const float* dcontrast, int64_t begin, int64_t end, const ContrastLayout& l, float inv_t) {
  for (int64_t p = begin; p < end; ++p) {
    if (kinds[p] == 0) continue;
    const int64_t r = p / l.K, k = p % l.K;
    const float g = dcontrast[p] * inv_t;
    scalar_t* dg = dgold + p * l.V;
    if (kinds[p] == 1) {  // d(z_gold - z_decoy); gold == decoy: exactly 0 (the row stays zero)
      if (gid[p] != did[p]) dg[gid[p]] = static_cast<scalar_t>(g), dg[did[p]] = static_cast<scalar_t>(-g);
      continue;
    }
    const scalar_t* g_row = gold + r * l.stride_g_r + k * l.stride_g_k;
    const scalar_t* d_row = decoy + r * l.stride_d_r + k * l.stride_d_k;
    const float* st = stats + p * kStats;
    scalar_t* dd = ddecoy + p * l.V;
    for (int64_t v = 0; v < l.V; ++v) {
      const float pg = std::exp((static_cast<float>(g_row[v]) - st[0]) * inv_t - st[1]);
      const float pd = std::exp((static_cast<float>(d_row[v]) - st[2]) * inv_t - st[3]);
      dg[v] = static_cast<scalar_t>((v == gid[p] ? g : 0.f) - g * pg);
      dd[v] = static_cast<scalar_t>(g * pd - (v == did[p] ? g : 0.f));
    }
  }
}

void clipped_mean_min_rows(const float* x, const uint8_t* mask, float* out, int64_t begin, int64_t end, int64_t K,
                           float clip, float min_weight) {
  for (int64_t r = begin; r < end; ++r) {
    float total = 0.f, count = 0.f, lowest = std::numeric_limits<float>::infinity();
    bool bad = false;
    for (int64_t k = 0; k < K; ++k) {
      if (!mask[r * K + k]) continue;
      const float v = x[r * K + k];
      if (!std::isfinite(v)) {
        bad = true;
        continue;
      }
      const float c = std::min(std::max(v, -clip), clip);
      total += c, count += 1.f, lowest = std::min(lowest, c);
    }
    out[r] = (bad || count == 0.f) ? std::numeric_limits<float>::quiet_NaN() : total / count + min_weight * lowest;
  }
}

}  // namespace

// (contrast [R, K] fp32, stats [R, K, 4] fp32); decoy_logits empty when there are no decoy rows.
std::tuple<at::Tensor, at::Tensor> gold_decoy_contrast_forward(const at::Tensor& gold_logits, const at::Tensor& decoy_logits,
                                                               const at::Tensor& gold_ids, const at::Tensor& decoy_ids,
                                                               const at::Tensor& kinds, double inv_temperature) {
  const ContrastInputs in = prepare(gold_logits, decoy_logits, gold_ids, decoy_ids, kinds);
  const int64_t R = in.gold.size(0), K = in.gold.size(1), P = R * K;
  auto opts = in.gold.options().dtype(at::kFloat);
  auto contrast = at::empty({R, K}, opts), stats = at::empty({R, K, kStats}, opts);
  const float inv_t = static_cast<float>(inv_temperature);
#ifdef WITH_CUDA
  if (in.gold.is_cuda()) {
    const c10::cuda::CUDAGuard guard(in.gold.device());
    stats.zero_();
    const cudaError_t err = contrast_forward_launch(
        in.gold.data_ptr(), in.decoy.data_ptr(), logits_dtype_code(in.gold, "gold_decoy_contrast (cuda)"),
        in.gold_ids.data_ptr<int64_t>(), in.decoy_ids.data_ptr<int64_t>(), in.kinds.data_ptr<int8_t>(),
        contrast.data_ptr<float>(), stats.data_ptr<float>(), P, in.layout, inv_t, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "gold_decoy_contrast (cuda) forward: ", cudaGetErrorString(err));
    return {contrast, stats};
  }
#endif
  TORCH_CHECK(in.gold.device().is_cpu(), "gold_decoy_contrast: this build has no CUDA; logits are on ", in.gold.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.gold.scalar_type(), "gold_decoy_contrast_forward", [&] {
    at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
      forward_positions<scalar_t>(in.gold.data_ptr<scalar_t>(), in.decoy.data_ptr<scalar_t>(), in.gold_ids.data_ptr<int64_t>(),
                                  in.decoy_ids.data_ptr<int64_t>(), in.kinds.data_ptr<int8_t>(), contrast.data_ptr<float>(),
                                  stats.data_ptr<float>(), b, e, in.layout, inv_t);
    });
  });
  return {contrast, stats};
}

// (d gold_logits [R, K, V], d decoy_logits [R, K, V] or empty), contiguous, in the logits' dtype.
std::tuple<at::Tensor, at::Tensor> gold_decoy_contrast_backward(const at::Tensor& gold_logits, const at::Tensor& decoy_logits,
                                                                const at::Tensor& gold_ids, const at::Tensor& decoy_ids,
                                                                const at::Tensor& kinds, const at::Tensor& stats,
                                                                const at::Tensor& dcontrast, double inv_temperature) {
  const ContrastInputs in = prepare(gold_logits, decoy_logits, gold_ids, decoy_ids, kinds);
  const int64_t P = in.gold.size(0) * in.gold.size(1);
  TORCH_CHECK(stats.device() == in.gold.device() && dcontrast.device() == in.gold.device() &&
                  stats.numel() == P * kStats && dcontrast.numel() == P,
              "gold_decoy_contrast_backward: stats [R, K, 4] and dcontrast [R, K] must be on the logits' device");
  auto dgold = at::zeros(in.gold.sizes(), in.gold.options());
  auto ddecoy = in.has_decoy ? at::zeros(in.gold.sizes(), in.gold.options()) : dgold;  // kind 2 needs decoy rows
  auto st = stats.contiguous(), dc = dcontrast.to(at::kFloat).contiguous();
  const float inv_t = static_cast<float>(inv_temperature);
#ifdef WITH_CUDA
  if (in.gold.is_cuda()) {
    const c10::cuda::CUDAGuard guard(in.gold.device());
    const cudaError_t err = contrast_backward_launch(
        in.gold.data_ptr(), in.decoy.data_ptr(), dgold.data_ptr(), ddecoy.data_ptr(),
        logits_dtype_code(in.gold, "gold_decoy_contrast (cuda)"), in.gold_ids.data_ptr<int64_t>(),
        in.decoy_ids.data_ptr<int64_t>(), in.kinds.data_ptr<int8_t>(), st.data_ptr<float>(), dc.data_ptr<float>(), P,
        in.layout, inv_t, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "gold_decoy_contrast (cuda) backward: ", cudaGetErrorString(err));
    return {dgold, in.has_decoy ? ddecoy : at::Tensor()};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.gold.scalar_type(), "gold_decoy_contrast_backward", [&] {
    at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
      backward_positions<scalar_t>(in.gold.data_ptr<scalar_t>(), in.decoy.data_ptr<scalar_t>(), dgold.data_ptr<scalar_t>(),
                                   ddecoy.data_ptr<scalar_t>(), in.gold_ids.data_ptr<int64_t>(), in.decoy_ids.data_ptr<int64_t>(),
                                   in.kinds.data_ptr<int8_t>(), st.data_ptr<float>(), dc.data_ptr<float>(), b, e, in.layout, inv_t);
    });
  });
  return {dgold, in.has_decoy ? ddecoy : at::Tensor()};
}

// [R] fp32 from values [R, K] (any float dtype; fp32 math) and mask [R, K] (uint8).
at::Tensor clipped_mean_min_forward(const at::Tensor& values, const at::Tensor& mask, double clip, double min_weight) {
  TORCH_CHECK(values.dim() == 2 && mask.sizes() == values.sizes() && mask.scalar_type() == at::kByte,
              "clipped_mean_min: values must be [R, K] with a uint8 mask of the same shape; got ", values.sizes(), " and ",
              mask.sizes());
  TORCH_CHECK(mask.device() == values.device(), "clipped_mean_min: mask on ", mask.device(), ", values on ", values.device());
  auto x = values.to(at::kFloat).contiguous();
  auto m = mask.contiguous();
  const int64_t R = x.size(0), K = x.size(1);
  auto out = at::empty({R}, x.options());
#ifdef WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = clipped_mean_min_launch(x.data_ptr<float>(), m.data_ptr<uint8_t>(), out.data_ptr<float>(), R, K,
                                                    static_cast<float>(clip), static_cast<float>(min_weight),
                                                    c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "clipped_mean_min (cuda): ", cudaGetErrorString(err));
    return out;
  }
#endif
  TORCH_CHECK(x.device().is_cpu(), "clipped_mean_min: this build has no CUDA; values are on ", x.device());
  at::parallel_for(0, R, 64, [&](int64_t b, int64_t e) {
    clipped_mean_min_rows(x.data_ptr<float>(), m.data_ptr<uint8_t>(), out.data_ptr<float>(), b, e, K,
                          static_cast<float>(clip), static_cast<float>(min_weight));
  });
  return out;
}
