// CUDA helpers shared by token_logprobs_cuda.cu and contrast_cuda.cu (torch-free): dtype
// conversions and the online log-sum-exp of one row of logits reduced by one thread block.
// Each thread keeps a triple (max z, d, a) over a strided slice of the row, with s = z / T,
// d = sum exp(s - m), a = sum exp(s - m) (s - m); triples merge by shifting to the joint max
// (warp shuffles, then one warp over the warps' results).

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace online_lse {

constexpr int kThreads = 256;  // threads per block of the row kernels

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

struct Lse {
  float mz, d, a;  // raw max logit, sum e^(s-m), sum e^(s-m) (s-m); s = z / T, m = mz / T
};

__device__ __forceinline__ Lse merge(Lse x, Lse y, float inv_t) {
  if (x.d == 0.f) return y;
  if (y.d == 0.f) return x;
  const float mz = fmaxf(x.mz, y.mz);
  const float hx = (x.mz - mz) * inv_t, hy = (y.mz - mz) * inv_t;  // <= 0: shifts to the joint max
  const float sx = __expf(hx), sy = __expf(hy);
  return {mz, x.d * sx + y.d * sy, sx * (x.a + x.d * hx) + sy * (y.a + y.d * hy)};
}

__device__ __forceinline__ Lse warp_merge(Lse v, float inv_t) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Lse o{__shfl_down_sync(0xffffffff, v.mz, offset), __shfl_down_sync(0xffffffff, v.d, offset),
          __shfl_down_sync(0xffffffff, v.a, offset)};
    v = merge(v, o, inv_t);
  }
  return v;
}

// The row's triple, valid in thread 0 only; every thread of the block must call it (it syncs).
template <typename scalar_t>
__device__ Lse block_row_lse(const scalar_t* __restrict__ row, int64_t V, float inv_t) {
  Lse acc{-INFINITY, 0.f, 0.f};
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float zv = to_float(row[v]);
    if (zv == -INFINITY) continue;  // a banned token
    acc = merge(acc, Lse{zv, 1.f, 0.f}, inv_t);
  }
  __shared__ Lse warps[kThreads / 32];
  acc = warp_merge(acc, inv_t);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warps[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < blockDim.x / 32 ? warps[lane] : Lse{-INFINITY, 0.f, 0.f};
    acc = warp_merge(acc, inv_t);
  }
  __syncthreads();  // warps may be reused by the next call
  return acc;
}

}  // namespace online_lse
