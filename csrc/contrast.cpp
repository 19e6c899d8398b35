// Gold-vs-decoy contrast at first divergent positions and the rewards' row reductions (SPEC sections
// 1, 2 and 8): the csrc twins of kernels/contrast.py. The host side (input checks, position kinds,
// the later positions' fused-linear log-probs, the float64 belief, autograd) is
// selfdistill/ops/contrast_host.py, shared with the Triton kernels; formulas in
// selfdistill/ops/contrast_reference.py.
//   first_position_contrast_forward: per row n of hidden [n, H],
//     (h . (W[gold] - W[decoy]) + b[gold] - b[decoy]) / T in fp32 -- two weight rows, no logits;
//     an id outside the vocabulary raises on the CPU path and gives NaN on CUDA.
//   clipped_mean_min_forward: per row of [R, K], x = values - minus (or values),
//     mean(clip(x)) + min_weight * min(clip(x)) over the mask in double; NaN for a row with no
//     masked value or a non-finite masked x.
//   belief_shift_forward: PMI-shift's clip(close - open, -clip, clip) in double (NaN where a belief
//     is not finite) and the flips at +-eps (+1 decoy -> gold, -1 gold -> decoy).
// CPU here; CUDA in contrast_cuda.cu when built WITH_CUDA.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "tensor_dtype.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

// contrast_cuda.cu (torch-free). dtype: 0 = float32, 1 = float16, 2 = bfloat16.
cudaError_t first_position_contrast_launch(const void* hidden, const void* weight, const void* bias, int dtype,
                                           const int64_t* gold_ids, const int64_t* decoy_ids, float* out, int64_t n,
                                           int64_t H, int64_t V, int64_t stride_h, int64_t stride_w, float inv_t,
                                           cudaStream_t stream);
cudaError_t clipped_mean_min_launch(const double* x, const double* minus, const uint8_t* mask, double* out, int64_t R,
                                    int64_t K, double clip, double min_weight, cudaStream_t stream);
cudaError_t belief_shift_launch(const double* open, const double* close, double* shift, int8_t* flip, int64_t R,
                                double clip, double eps, cudaStream_t stream);
#endif

namespace {

template <typename scalar_t>
void first_positions(const scalar_t* hidden, const scalar_t* weight, const scalar_t* bias, const int64_t* gid,
                     const int64_t* did, float* out, int64_t begin, int64_t end, int64_t H, int64_t V, int64_t stride_h,
                     int64_t stride_w, float inv_t) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t g = gid[p], d = did[p];
    TORCH_CHECK(g >= 0 && g < V && d >= 0 && d < V, "gold_decoy_contrast: gold id ", g, " or decoy id ", d,
                " of first divergent position ", p, " is outside the vocabulary [0, ", V, ")");
    const scalar_t* h = hidden + p * stride_h;
    const scalar_t* w_g = weight + g * stride_w;
    const scalar_t* w_d = weight + d * stride_w;
    float dot = 0.f;
    for (int64_t i = 0; i < H; ++i) {
      dot += static_cast<float>(h[i]) * (static_cast<float>(w_g[i]) - static_cast<float>(w_d[i]));
    }
    if (bias != nullptr) dot += static_cast<float>(bias[g]) - static_cast<float>(bias[d]);
    out[p] = dot * inv_t;
  }
}

void clipped_mean_min_rows(const double* x, const double* minus, const uint8_t* mask, double* out, int64_t begin,
                           int64_t end, int64_t K, double clip, double min_weight) {
  for (int64_t r = begin; r < end; ++r) {
    double total = 0.0, count = 0.0, lowest = std::numeric_limits<double>::infinity();
    bool bad = false;
    for (int64_t k = 0; k < K; ++k) {
      if (!mask[r * K + k]) continue;
      const double v = minus ? x[r * K + k] - minus[r * K + k] : x[r * K + k];
      if (!std::isfinite(v)) {
        bad = true;
        continue;
      }
      const double c = std::min(std::max(v, -clip), clip);
      total += c, count += 1.0, lowest = std::min(lowest, c);
    }
    out[r] = (bad || count == 0.0) ? std::numeric_limits<double>::quiet_NaN() : total / count + min_weight * lowest;
  }
}

void belief_shift_rows(const double* open, const double* close, double* shift, int8_t* flip, int64_t begin, int64_t end,
                       double clip, double eps) {
  for (int64_t r = begin; r < end; ++r) {
    const double o = open[r], c = close[r], s = c - o;
    const bool finite = std::isfinite(o) && std::isfinite(c) && std::isfinite(s);
    shift[r] = finite ? std::min(std::max(s, -clip), clip) : std::numeric_limits<double>::quiet_NaN();
    flip[r] = static_cast<int8_t>((o < -eps && c > eps) ? 1 : (o > eps && c < -eps) ? -1 : 0);
  }
}

}  // namespace

// contrast [n] fp32 at first divergent positions; bias empty when the head has none.
at::Tensor first_position_contrast_forward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                           const at::Tensor& gold_ids, const at::Tensor& decoy_ids, double inv_temperature) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "gold_decoy_contrast: hidden must be [n, H] and weight [V, H]; got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "gold_decoy_contrast: hidden is ", hidden.scalar_type(),
              " but weight is ", weight.scalar_type());
  const int64_t n = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.dim() == 1 && bias.size(0) == V && bias.scalar_type() == weight.scalar_type()),
              "gold_decoy_contrast: bias must be [V=", V, "] in the weight's dtype; got ", bias.sizes());
  for (const at::Tensor* t : {&gold_ids, &decoy_ids}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kLong, "gold_decoy_contrast: ids must be int64 [n=",
                n, "], got ", t->sizes());
  }
  const at::Device dev = hidden.device();
  for (const at::Tensor* t : {&weight, &gold_ids, &decoy_ids}) {
    TORCH_CHECK(t->device() == dev, "gold_decoy_contrast: weight and ids must be on the hidden states' device ", dev,
                ", got ", t->device());
  }
  TORCH_CHECK(!has_bias || bias.device() == dev, "gold_decoy_contrast: bias on ", bias.device(), ", hidden on ", dev);
  auto h = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  auto w = weight.stride(1) == 1 ? weight : weight.contiguous();
  auto b = has_bias ? bias.contiguous() : bias;
  auto g = gold_ids.contiguous(), d = decoy_ids.contiguous();
  auto out = at::empty({n}, h.options().dtype(at::kFloat));
  const float inv_t = static_cast<float>(inv_temperature);
#ifdef WITH_CUDA
  if (h.is_cuda()) {
    const c10::cuda::CUDAGuard guard(h.device());
    const cudaError_t err = first_position_contrast_launch(
        h.data_ptr(), w.data_ptr(), has_bias ? b.data_ptr() : nullptr, logits_dtype_code(h, "gold_decoy_contrast (cuda)"),
        g.data_ptr<int64_t>(), d.data_ptr<int64_t>(), out.data_ptr<float>(), n, H, V, h.stride(0), w.stride(0), inv_t,
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "gold_decoy_contrast (cuda): ", cudaGetErrorString(err));
    return out;
  }
#endif
  TORCH_CHECK(h.device().is_cpu(), "gold_decoy_contrast: this build has no CUDA; hidden states are on ", h.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "first_position_contrast_forward", [&] {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      first_positions<scalar_t>(h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), has_bias ? b.data_ptr<scalar_t>() : nullptr,
                                g.data_ptr<int64_t>(), d.data_ptr<int64_t>(), out.data_ptr<float>(), begin, end, H, V,
                                h.stride(0), w.stride(0), inv_t);
    });
  });
  return out;
}

// [R] float64 from values [R, K] (any float dtype; double math), mask [R, K] (uint8) and minus (empty, or like values).
at::Tensor clipped_mean_min_forward(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& minus, double clip,
                                    double min_weight) {
  TORCH_CHECK(values.dim() == 2 && mask.sizes() == values.sizes() && mask.scalar_type() == at::kByte,
              "clipped_mean_min: values must be [R, K] with a uint8 mask of the same shape; got ", values.sizes(), " and ",
              mask.sizes());
  const bool has_minus = minus.numel() > 0;
  TORCH_CHECK(!has_minus || minus.sizes() == values.sizes(), "clipped_mean_min: minus must match values ", values.sizes(),
              ", got ", minus.sizes());
  TORCH_CHECK(mask.device() == values.device() && (!has_minus || minus.device() == values.device()),
              "clipped_mean_min: mask and minus must be on the values' device ", values.device());
  auto x = values.to(at::kDouble).contiguous();
  auto y = has_minus ? minus.to(at::kDouble).contiguous() : x;
  auto m = mask.contiguous();
  const int64_t R = x.size(0), K = x.size(1);
  auto out = at::empty({R}, x.options());
  const double* minus_ptr = has_minus ? y.data_ptr<double>() : nullptr;
#ifdef WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = clipped_mean_min_launch(x.data_ptr<double>(), minus_ptr, m.data_ptr<uint8_t>(),
                                                    out.data_ptr<double>(), R, K, clip, min_weight,
                                                    c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "clipped_mean_min (cuda): ", cudaGetErrorString(err));
    return out;
  }
#endif
  TORCH_CHECK(x.device().is_cpu(), "clipped_mean_min: this build has no CUDA; values are on ", x.device());
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    clipped_mean_min_rows(x.data_ptr<double>(), minus_ptr, m.data_ptr<uint8_t>(), out.data_ptr<double>(), begin, end, K,
                          clip, min_weight);
  });
  return out;
}

// (clipped shift float64 [R], flip int8 [R]) from float64 beliefs [R].
std::tuple<at::Tensor, at::Tensor> belief_shift_forward(const at::Tensor& belief_open, const at::Tensor& belief_close,
                                                        double clip, double eps) {
  TORCH_CHECK(belief_open.dim() == 1 && belief_close.sizes() == belief_open.sizes() &&
                  belief_open.scalar_type() == at::kDouble && belief_close.scalar_type() == at::kDouble,
              "belief_shift: beliefs must be float64 [R] of one shape; got ", belief_open.sizes(), " and ", belief_close.sizes());
  TORCH_CHECK(belief_close.device() == belief_open.device(), "belief_shift: open on ", belief_open.device(), ", close on ",
              belief_close.device());
  auto o = belief_open.contiguous(), c = belief_close.contiguous();
  const int64_t R = o.size(0);
  auto shift = at::empty({R}, o.options()), flip = at::empty({R}, o.options().dtype(at::kChar));
#ifdef WITH_CUDA
  if (o.is_cuda()) {
    const c10::cuda::CUDAGuard guard(o.device());
    const cudaError_t err = belief_shift_launch(o.data_ptr<double>(), c.data_ptr<double>(), shift.data_ptr<double>(),
                                                flip.data_ptr<int8_t>(), R, clip, eps, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "belief_shift (cuda): ", cudaGetErrorString(err));
    return {shift, flip};
  }
#endif
  TORCH_CHECK(o.device().is_cpu(), "belief_shift: this build has no CUDA; beliefs are on ", o.device());
  belief_shift_rows(o.data_ptr<double>(), c.data_ptr<double>(), shift.data_ptr<double>(), flip.data_ptr<int8_t>(), 0, R,
                    clip, eps);
  return {shift, flip};
}
