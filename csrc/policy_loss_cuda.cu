// CUDA row pass of the fused policy loss (same math as policy_loss.cpp, see there), free of torch
// headers. One block per completion row; threads stride over the row's tokens; the row sums (the
// prepass's 3 and the loss pass's 7) are block reductions: warp shuffles, then one warp.

#include <cuda_runtime.h>

#include <cstdint>

#include "policy_loss_token.h"

namespace {

constexpr int kThreads = 256;
constexpr int kRowStats = 7;

template <int K>
__device__ void block_sum(float (&v)[K]) {  // every thread ends with the block's sums
  __shared__ float partial[K][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_down_sync(0xffffffff, v[k], offset);
    if (lane == 0) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += partial[k][w];
    v[k] = total;
  }
  __syncthreads();  // partial may be reused by the next call
}


__global__ void row_pass_kernel(const float* __restrict__ logp, const float* __restrict__ old,
                                const float* __restrict__ adv, const uint8_t* __restrict__ mask,
                                const int64_t* __restrict__ lengths, const float* __restrict__ ref,
                                const float* __restrict__ ent, float* coef, float* coef_ent, float* rows, int64_t T,
                                PolicyLossArgs a) {
  const int64_t b = blockIdx.x, o = b * T;
  const float length = static_cast<float>(lengths[b]);
  const float ramp_denom = fmaxf(length - 1.f, 1.f);
  float pre[4] = {0.f, 0.f, 0.f, 0.f};  // n_w, sum t, sum log-ratio, n_mask
  if (a.ramp || a.gspo) {
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      if (!mask[o + t]) continue;
      if (static_cast<float>(t) < length) pre[0] += 1.f, pre[1] += static_cast<float>(t);
      pre[2] += logp[o + t] - old[o + t];
      pre[3] += 1.f;
    }
    block_sum<4>(pre);
  }
  const float ramp_mean = a.w0 + (a.w1 - a.w0) * (pre[1] / fmaxf(pre[0], 1.f)) / ramp_denom;
  const float inv_ramp_mean = pre[0] > 0.f ? 1.f / ramp_mean : 0.f;
  const float seq_log_ratio = pre[2] / fmaxf(pre[3], 1.f);
  float acc[kRowStats] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    loss_pass_token(acc, o + t, t, mask, logp, old, adv, ref, ent, coef, coef_ent, seq_log_ratio, length, ramp_denom,
                    inv_ramp_mean, a);
  }
  block_sum<kRowStats>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kRowStats; ++k) rows[b * kRowStats + k] = acc[k];
  }
}

}  // namespace

cudaError_t policy_loss_row_pass_launch(const float* logp, const float* old, const float* adv, const uint8_t* mask,
                                        const int64_t* lengths, const float* ref, const float* ent, float* coef,
                                        float* coef_ent, float* rows, int64_t B, int64_t T, const PolicyLossArgs& a,
                                        cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  row_pass_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logp, old, adv, mask, lengths, ref, ent, coef,
                                                                     coef_ent, rows, T, a);
  return cudaGetLastError();
}
