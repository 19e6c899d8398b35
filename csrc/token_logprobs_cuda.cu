// CUDA kernels of token_logprobs.cpp (same math, see there), free of torch headers: the C++ side
// owns the tensors and the stream and calls the two launchers below.
// Forward: one block per row; each thread keeps an online (max z, d, a) over a strided slice of the
// vocabulary, then the block merges the triples (warp shuffles, then one warp over the warps).
// Backward: a 2-D grid of rows x vocabulary tiles, elementwise from the saved row stats
// (max z, log d) and the entropy; dz may alias z (each thread reads an element before writing it).

#include <cstdint>

#include "online_lse_cuda.cuh"

namespace {

using online_lse::from_float;
using online_lse::kThreads;
using online_lse::to_float;

constexpr int kBackwardTile = 2048;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y, float* logp, float* ent,
                               float* stats, int64_t V, int64_t stride, float inv_t) {
  const int64_t row = blockIdx.x;
  const scalar_t* zr = z + row * stride;
  const online_lse::Lse acc = online_lse::block_row_lse(zr, V, inv_t);
  if (threadIdx.x == 0) {
    const float logd = logf(acc.d);
    const int64_t t = y[row];  // out of range: NaN (the CPU path raises; a device-side raise would abort)
    logp[row] = (t >= 0 && t < V) ? (to_float(zr[t]) - acc.mz) * inv_t - logd : NAN;
    ent[row] = logd - acc.a / acc.d;
    stats[2 * row] = acc.mz;
    stats[2 * row + 1] = logd;
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* z, const int64_t* __restrict__ y, const float* stats,
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
