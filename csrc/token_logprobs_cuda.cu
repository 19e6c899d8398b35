// CUDA kernels of token_logprobs.cpp (same math, see there), free of torch headers: the C++ side
// owns the tensors and the stream and calls the two launchers below.
// Forward: one block per row; each thread keeps an online (max z, d, a) over a strided slice of the
// vocabulary, then the block merges the triples (warp shuffles, then one warp over the warps).
// Backward: a 2-D grid of rows x vocabulary tiles, elementwise from the saved row stats
// (max z, log d) and the entropy.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kBackwardTile = 2048;

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

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y, float* logp, float* ent,
                               float* stats, int64_t V, int64_t stride, float inv_t) {
  const int64_t row = blockIdx.x;
  const scalar_t* zr = z + row * stride;
  Lse acc{-INFINITY, 0.f, 0.f};
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float zv = to_float(zr[v]);
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
    if (lane == 0) {
      const float logd = logf(acc.d);
      const int64_t t = y[row];  // out of range: NaN (the CPU path raises; a device-side raise would abort)
      logp[row] = (t >= 0 && t < V) ? (to_float(zr[t]) - acc.mz) * inv_t - logd : NAN;
      ent[row] = logd - acc.a / acc.d;
      stats[2 * row] = acc.mz;
      stats[2 * row + 1] = logd;
    }
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y, const float* stats,
                                const float* entropy, const float* dlogp, const float* dent, scalar_t* dz, int64_t V,
                                int64_t stride, float inv_t) {
  const int64_t row = blockIdx.x;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * kBackwardTile;
  const int64_t end = min(start + kBackwardTile, V);
  const float mz = stats[2 * row], logd = stats[2 * row + 1], h = entropy[row], gl = dlogp[row], ge = dent[row];
  const int64_t target = y[row];
  for (int64_t v = start + threadIdx.x; v < end; v += blockDim.x) {
    const float lp = (to_float(z[row * stride + v]) - mz) * inv_t - logd;
    const float p = __expf(lp);
    float g = -gl * p;
    if (p > 0.f) g -= ge * p * (lp + h);
    if (v == target) g += gl;
    dz[row * V + v] = from_float<scalar_t>(g * inv_t);
  }
}

template <typename scalar_t>
void launch_forward(const void* z, const int64_t* y, float* logp, float* ent, float* stats, int64_t N, int64_t V,
                    int64_t stride, float inv_t, cudaStream_t stream) {
  forward_kernel<scalar_t><<<N, kThreads, 0, stream>>>(static_cast<const scalar_t*>(z), y, logp, ent, stats, V, stride,
                                                       inv_t);
}

template <typename scalar_t>
void launch_backward(const void* z, const int64_t* y, const float* stats, const float* ent, const float* dlogp,
                     const float* dent, void* dz, int64_t N, int64_t V, int64_t stride, float inv_t,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((V + kBackwardTile - 1) / kBackwardTile));
  backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(static_cast<const scalar_t*>(z), y, stats, ent, dlogp, dent,
                                                           static_cast<scalar_t*>(dz), V, stride, inv_t);
}

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16. Returns the launch's cudaError_t.
cudaError_t token_logprobs_forward_launch(const void* z, int dtype, const int64_t* y, float* logp, float* ent,
                                          float* stats, int64_t N, int64_t V, int64_t stride, float inv_t,
                                          cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (dtype == 0) launch_forward<float>(z, y, logp, ent, stats, N, V, stride, inv_t, stream);
  else if (dtype == 1) launch_forward<__half>(z, y, logp, ent, stats, N, V, stride, inv_t, stream);
  else launch_forward<__nv_bfloat16>(z, y, logp, ent, stats, N, V, stride, inv_t, stream);
  return cudaGetLastError();
}

cudaError_t token_logprobs_backward_launch(const void* z, int dtype, const int64_t* y, const float* stats,
                                           const float* ent, const float* dlogp, const float* dent, void* dz,
                                           int64_t N, int64_t V, int64_t stride, float inv_t, cudaStream_t stream) {
  if (N == 0 || V == 0) return cudaSuccess;
  if (dtype == 0) launch_backward<float>(z, y, stats, ent, dlogp, dent, dz, N, V, stride, inv_t, stream);
  else if (dtype == 1) launch_backward<__half>(z, y, stats, ent, dlogp, dent, dz, N, V, stride, inv_t, stream);
  else launch_backward<__nv_bfloat16>(z, y, stats, ent, dlogp, dent, dz, N, V, stride, inv_t, stream);
  return cudaGetLastError();
}
