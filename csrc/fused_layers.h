// The decoder layers' elementwise blocks as single CPU passes (fused_layers.cpp), shared by their
// Python bindings (the training forward's autograd functions, selfdistill/ops/fused_layers.py) and
// the C++ decode step (decode_step.cpp).

#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <tuple>

constexpr int kLanes = 8;  // partial sums of a row reduction: one AVX register of floats

// sum_i a[i] * b[i] in kLanes partial sums of acc_t, combined pairwise (vectorisable, unlike one
// running sum; the order differs from torch's reductions by float rounding).
template <typename acc_t, typename A, typename B>
inline acc_t dot_lanes(const A* a, const B* b, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
  for (; i < n; ++i) lane[0] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// HF's RMSNorm (Qwen3/Qwen2/Llama): y = w * (x * rstd).to(x.dtype), rstd = 1 / sqrt(mean(x^2) + eps)
// over the last dim, in fp32 (double for double; the sum of squares in double). Returns (y, rstd [rows]
// float64, the value used).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);
// (dx, dweight) from dy, x, weight and the forward's rstd.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& rstd);
// HF's rotary embedding x * cos + rotate_half(x) * sin, x [B, H, T, D] (any strides, the last dim
// contiguous), cos/sin [B, T, D] (broadcast over H; any strides, the last dim contiguous). With
// `transpose` the adjoint map (the backward: dx from dy). Output laid out like x.
at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose);
