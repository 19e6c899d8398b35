// CUDA kernels of contrast.cpp (same math, see there), free of torch headers: the C++ side owns the
// tensors and the stream and calls the three launchers below.
// first_position: one block per first divergent position; the threads stride over the hidden size,
//   each accumulating h_i (W[gold]_i - W[decoy]_i) in fp32, then a block tree sum (warp shuffles,
//   one warp over the warps' sums). Weight rows are addressed with int64 offsets.
// clipped_mean_min: one thread per row (K, the answer or continuation length, is small), in double.
// belief_shift: one thread per row, in double.

#include <cstdint>

#include "online_lse_cuda.cuh"

namespace {

using online_lse::kThreads;
using online_lse::to_float;

__device__ __forceinline__ float block_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  __shared__ float warps[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    v = lane < blockDim.x / 32 ? warps[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  }
  return v;  // valid in thread 0
}

template <typename scalar_t>
__global__ void first_position_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ weight,
                                      const scalar_t* __restrict__ bias, const int64_t* __restrict__ gid,
                                      const int64_t* __restrict__ did, float* out, int64_t H, int64_t V, int64_t stride_h,
                                      int64_t stride_w, float inv_t) {
  const int64_t p = blockIdx.x;
  const int64_t g = gid[p], d = did[p];
  const bool ok = g >= 0 && g < V && d >= 0 && d < V;  // else NaN: a device-side raise would abort
  const scalar_t* h = hidden + p * stride_h;
  const scalar_t* w_g = weight + (ok ? g : 0) * stride_w;
  const scalar_t* w_d = weight + (ok ? d : 0) * stride_w;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) acc += to_float(h[i]) * (to_float(w_g[i]) - to_float(w_d[i]));
  const float dot = block_sum(acc);
  if (threadIdx.x == 0) {
    const float db = (bias != nullptr && ok) ? to_float(bias[g]) - to_float(bias[d]) : 0.f;
    out[p] = ok ? (dot + db) * inv_t : NAN;
  }
}

__global__ void clipped_mean_min_kernel(const double* __restrict__ x, const double* __restrict__ minus,
                                        const uint8_t* __restrict__ mask, double* out, int64_t R, int64_t K, double clip,
                                        double min_weight) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  double total = 0.0, count = 0.0, lowest = INFINITY;
  bool bad = false;
  for (int64_t k = 0; k < K; ++k) {
    if (!mask[r * K + k]) continue;
    const double v = minus != nullptr ? x[r * K + k] - minus[r * K + k] : x[r * K + k];
    if (!isfinite(v)) {
      bad = true;
      continue;
    }
    const double c = fmin(fmax(v, -clip), clip);
    total += c, count += 1.0, lowest = fmin(lowest, c);
  }
  out[r] = (bad || count == 0.0) ? NAN : total / count + min_weight * lowest;
}

__global__ void belief_shift_kernel(const double* __restrict__ open, const double* __restrict__ close, double* shift,
                                    int8_t* flip, int64_t R, double clip, double eps) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const double o = open[r], c = close[r], s = c - o;
  const bool finite = isfinite(o) && isfinite(c) && isfinite(s);
  shift[r] = finite ? fmin(fmax(s, -clip), clip) : NAN;
  flip[r] = static_cast<int8_t>((o < -eps && c > eps) ? 1 : (o > eps && c < -eps) ? -1 : 0);
}

template <typename scalar_t>
void launch_first_position(const void* hidden, const void* weight, const void* bias, const int64_t* gid,
                           const int64_t* did, float* out, int64_t n, int64_t H, int64_t V, int64_t stride_h,
                           int64_t stride_w, float inv_t, cudaStream_t stream) {
  first_position_kernel<scalar_t><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(hidden), static_cast<const scalar_t*>(weight), static_cast<const scalar_t*>(bias), gid,
      did, out, H, V, stride_h, stride_w, inv_t);
}

unsigned row_blocks(int64_t R) { return static_cast<unsigned>((R + kThreads - 1) / kThreads); }

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16; bias may be null. Each returns the launch's cudaError_t.
cudaError_t first_position_contrast_launch(const void* hidden, const void* weight, const void* bias, int dtype,
                                           const int64_t* gold_ids, const int64_t* decoy_ids, float* out, int64_t n,
                                           int64_t H, int64_t V, int64_t stride_h, int64_t stride_w, float inv_t,
                                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (dtype == 0)
    launch_first_position<float>(hidden, weight, bias, gold_ids, decoy_ids, out, n, H, V, stride_h, stride_w, inv_t, stream);
  else if (dtype == 1)
    launch_first_position<__half>(hidden, weight, bias, gold_ids, decoy_ids, out, n, H, V, stride_h, stride_w, inv_t, stream);
  else
    launch_first_position<__nv_bfloat16>(hidden, weight, bias, gold_ids, decoy_ids, out, n, H, V, stride_h, stride_w, inv_t,
                                         stream);
  return cudaGetLastError();
}

cudaError_t clipped_mean_min_launch(const double* x, const double* minus, const uint8_t* mask, double* out, int64_t R,
                                    int64_t K, double clip, double min_weight, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  clipped_mean_min_kernel<<<row_blocks(R), kThreads, 0, stream>>>(x, minus, mask, out, R, K, clip, min_weight);
  return cudaGetLastError();
}

cudaError_t belief_shift_launch(const double* open, const double* close, double* shift, int8_t* flip, int64_t R,
                                double clip, double eps, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  belief_shift_kernel<<<row_blocks(R), kThreads, 0, stream>>>(open, close, shift, flip, R, clip, eps);
  return cudaGetLastError();
}
