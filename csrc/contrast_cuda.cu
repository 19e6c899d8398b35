// CUDA kernels of contrast.cpp (same math, see there), free of torch headers: the C++ side owns the
// tensors and the stream and calls the three launchers below.
// Forward: one block per answer position; kind 2 reduces the gold row, then the decoy row, with the
// block's online log-sum-exp (online_lse_cuda.cuh); kinds 0 and 1 are one thread's work.
// Backward: a 2-D grid of positions x vocabulary tiles into zero-initialised gradients (kind 1 is
// two writes by one thread of the first tile).
// clipped_mean_min: one thread per row (K, the answer length, is small).

#include <cstdint>

#include "contrast_layout.h"
#include "online_lse_cuda.cuh"

namespace {

using online_lse::from_float;
using online_lse::kThreads;
using online_lse::to_float;

constexpr int kBackwardTile = 2048;
constexpr int kStats = 4;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ gold, const scalar_t* __restrict__ decoy,
                               const int64_t* __restrict__ gid, const int64_t* __restrict__ did,
                               const int8_t* __restrict__ kinds, float* contrast, float* stats, ContrastLayout l,
                               float inv_t) {
  const int64_t p = blockIdx.x, r = p / l.K, k = p % l.K;
  const int kind = kinds[p];  // uniform over the block, so the reductions below are reached by all threads
  const int64_t g = gid[p], d = did[p];
  const bool ids_ok = g >= 0 && g < l.V && d >= 0 && d < l.V;  // else NaN: a device-side raise would abort
  const scalar_t* g_row = gold + r * l.stride_g_r + k * l.stride_g_k;
  if (kind != 2) {
    if (threadIdx.x == 0) {
      contrast[p] = kind == 0 ? 0.f : ids_ok ? (to_float(g_row[g]) - to_float(g_row[d])) * inv_t : NAN;
    }
    return;
  }
  const scalar_t* d_row = decoy + r * l.stride_d_r + k * l.stride_d_k;
  const online_lse::Lse lg = online_lse::block_row_lse(g_row, l.V, inv_t);
  const online_lse::Lse ld = online_lse::block_row_lse(d_row, l.V, inv_t);
  if (threadIdx.x == 0) {
    const float logd_g = logf(lg.d), logd_d = logf(ld.d);
    contrast[p] = ids_ok ? ((to_float(g_row[g]) - lg.mz) * inv_t - logd_g) - ((to_float(d_row[d]) - ld.mz) * inv_t - logd_d)
                         : NAN;
    float* st = stats + p * kStats;
    st[0] = lg.mz, st[1] = logd_g, st[2] = ld.mz, st[3] = logd_d;
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ gold, const scalar_t* __restrict__ decoy, scalar_t* dgold,
                                scalar_t* ddecoy, const int64_t* __restrict__ gid, const int64_t* __restrict__ did,
                                const int8_t* __restrict__ kinds, const float* __restrict__ stats,
                                const float* __restrict__ dcontrast, ContrastLayout l, float inv_t) {
  const int64_t p = blockIdx.x, r = p / l.K, k = p % l.K;
  const int kind = kinds[p];
  const int64_t g_id = gid[p], d_id = did[p];
  if (kind == 0 || g_id < 0 || g_id >= l.V || d_id < 0 || d_id >= l.V) return;
  const float g = dcontrast[p] * inv_t;
  scalar_t* dg = dgold + p * l.V;
  if (kind == 1) {  // d(z_gold - z_decoy); gold == decoy: exactly 0 (the row stays zero)
    if (blockIdx.y == 0 && threadIdx.x == 0 && g_id != d_id) {
      dg[g_id] = from_float<scalar_t>(g);
      dg[d_id] = from_float<scalar_t>(-g);
    }
    return;
  }
  const scalar_t* g_row = gold + r * l.stride_g_r + k * l.stride_g_k;
  const scalar_t* d_row = decoy + r * l.stride_d_r + k * l.stride_d_k;
  const float* st = stats + p * kStats;
  const float mz_g = st[0], logd_g = st[1], mz_d = st[2], logd_d = st[3];
  scalar_t* dd = ddecoy + p * l.V;
  const int64_t start = static_cast<int64_t>(blockIdx.y) * kBackwardTile;
  const int64_t end = min(start + kBackwardTile, l.V);
  for (int64_t v = start + threadIdx.x; v < end; v += blockDim.x) {
    const float pg = __expf((to_float(g_row[v]) - mz_g) * inv_t - logd_g);
    const float pd = __expf((to_float(d_row[v]) - mz_d) * inv_t - logd_d);
    dg[v] = from_float<scalar_t>((v == g_id ? g : 0.f) - g * pg);
    dd[v] = from_float<scalar_t>(g * pd - (v == d_id ? g : 0.f));
  }
}

__global__ void clipped_mean_min_kernel(const float* __restrict__ x, const uint8_t* __restrict__ mask, float* out,
                                        int64_t R, int64_t K, float clip, float min_weight) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  float total = 0.f, count = 0.f, lowest = INFINITY;
  bool bad = false;
  for (int64_t k = 0; k < K; ++k) {
    if (!mask[r * K + k]) continue;
    const float v = x[r * K + k];
    if (!isfinite(v)) {
      bad = true;
      continue;
    }
    const float c = fminf(fmaxf(v, -clip), clip);
    total += c, count += 1.f, lowest = fminf(lowest, c);
  }
  out[r] = (bad || count == 0.f) ? NAN : total / count + min_weight * lowest;
}

template <typename scalar_t>
void launch_forward(const void* gold, const void* decoy, const int64_t* gid, const int64_t* did, const int8_t* kinds,
                    float* contrast, float* stats, int64_t P, ContrastLayout l, float inv_t, cudaStream_t stream) {
  forward_kernel<scalar_t><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(gold), static_cast<const scalar_t*>(decoy), gid, did, kinds, contrast, stats, l, inv_t);
}

template <typename scalar_t>
void launch_backward(const void* gold, const void* decoy, void* dgold, void* ddecoy, const int64_t* gid,
                     const int64_t* did, const int8_t* kinds, const float* stats, const float* dcontrast, int64_t P,
                     ContrastLayout l, float inv_t, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>((l.V + kBackwardTile - 1) / kBackwardTile));
  backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(gold), static_cast<const scalar_t*>(decoy), static_cast<scalar_t*>(dgold),
      static_cast<scalar_t*>(ddecoy), gid, did, kinds, stats, dcontrast, l, inv_t);
}

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16. Each returns the launch's cudaError_t.
cudaError_t contrast_forward_launch(const void* gold, const void* decoy, int dtype, const int64_t* gold_ids,
                                    const int64_t* decoy_ids, const int8_t* kinds, float* contrast, float* stats,
                                    int64_t P, ContrastLayout l, float inv_t, cudaStream_t stream) {
  if (P == 0) return cudaSuccess;
  if (dtype == 0) launch_forward<float>(gold, decoy, gold_ids, decoy_ids, kinds, contrast, stats, P, l, inv_t, stream);
  else if (dtype == 1) launch_forward<__half>(gold, decoy, gold_ids, decoy_ids, kinds, contrast, stats, P, l, inv_t, stream);
  else launch_forward<__nv_bfloat16>(gold, decoy, gold_ids, decoy_ids, kinds, contrast, stats, P, l, inv_t, stream);
  return cudaGetLastError();
}

cudaError_t contrast_backward_launch(const void* gold, const void* decoy, void* dgold, void* ddecoy, int dtype,
                                     const int64_t* gold_ids, const int64_t* decoy_ids, const int8_t* kinds,
                                     const float* stats, const float* dcontrast, int64_t P, ContrastLayout l,
                                     float inv_t, cudaStream_t stream) {
  if (P == 0 || l.V == 0) return cudaSuccess;
  if (dtype == 0)
    launch_backward<float>(gold, decoy, dgold, ddecoy, gold_ids, decoy_ids, kinds, stats, dcontrast, P, l, inv_t, stream);
  else if (dtype == 1)
    launch_backward<__half>(gold, decoy, dgold, ddecoy, gold_ids, decoy_ids, kinds, stats, dcontrast, P, l, inv_t, stream);
  else
    launch_backward<__nv_bfloat16>(gold, decoy, dgold, ddecoy, gold_ids, decoy_ids, kinds, stats, dcontrast, P, l, inv_t,
                                   stream);
  return cudaGetLastError();
}

cudaError_t clipped_mean_min_launch(const float* x, const uint8_t* mask, float* out, int64_t R, int64_t K, float clip,
                                    float min_weight, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((R + kThreads - 1) / kThreads);
  clipped_mean_min_kernel<<<blocks, kThreads, 0, stream>>>(x, mask, out, R, K, clip, min_weight);
  return cudaGetLastError();
}
