// Fused per-token log-prob and entropy from logits [N, V] (SPEC section 7), the `cuda` backend of
// selfdistill.ops. One pass over each row keeps an online log-sum-exp in fp32 -- the running max m,
// d = sum exp(s - m) and a = sum exp(s - m) * (s - m), with s = z / T -- so the fp32 [N, V] upcast
// is never built:
//   log p_v = (z_v - max z) / T - log d,   entropy = log d - a / d
// (differences of logits are taken before scaling, and the entropy comes from the max-shifted a,
// not lse - E[s]: both avoid rounding logit-sized numbers). The saved row stats are (max z, log d).
// The backward recomputes log p from them and uses s_v - E_p[s] = log p_v + H:
//   d s_v = dlogp * ([v == y] - p_v) - dentropy * p_v * (log p_v + H),   d z = d s / T.
// CPU here (at::parallel_for over rows); CUDA in token_logprobs_cuda.cu when built WITH_CUDA.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "online_lse.h"
#include "tensor_dtype.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

// token_logprobs_cuda.cu (torch-free kernels). dtype: 0 = float32, 1 = float16, 2 = bfloat16.
cudaError_t token_logprobs_forward_launch(const void* z, int dtype, const int64_t* y, float* logp, float* ent,
                                          float* stats, int64_t N, int64_t V, int64_t stride, float inv_t,
                                          cudaStream_t stream);
cudaError_t token_logprobs_backward_launch(const void* z, int dtype, const int64_t* y, const float* stats,
                                           const float* ent, const float* dlogp, const float* dent, void* dz,
                                           int64_t N, int64_t V, int64_t stride, float inv_t, cudaStream_t stream);


std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_cuda(const at::Tensor& logits,
                                                                          const at::Tensor& targets,
                                                                          double inv_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto z = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto y = targets.contiguous();
  const int64_t N = z.size(0), V = z.size(1);
  auto opts = z.options().dtype(at::kFloat);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  const cudaError_t err = token_logprobs_forward_launch(
      z.data_ptr(), logits_dtype_code(z, "token_logprobs (cuda)"), y.data_ptr<int64_t>(), logp.data_ptr<float>(), ent.data_ptr<float>(),
      stats.data_ptr<float>(), N, V, z.stride(0), static_cast<float>(inv_temperature), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "token_logprobs (cuda) forward: ", cudaGetErrorString(err));
  return {logp, ent, stats};
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& stats,
                                        const at::Tensor& entropy, const at::Tensor& dlogp, const at::Tensor& dentropy,
                                        double inv_temperature, at::Tensor dz) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto z = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto y = targets.contiguous();
  auto st = stats.contiguous(), h = entropy.to(at::kFloat).contiguous();
  auto gl = dlogp.to(at::kFloat).contiguous(), ge = dentropy.to(at::kFloat).contiguous();
  const int64_t N = z.size(0), V = z.size(1);
  const cudaError_t err = token_logprobs_backward_launch(
      z.data_ptr(), logits_dtype_code(z, "token_logprobs (cuda)"), y.data_ptr<int64_t>(), st.data_ptr<float>(), h.data_ptr<float>(),
      gl.data_ptr<float>(), ge.data_ptr<float>(), dz.data_ptr(), N, V, z.stride(0), static_cast<float>(inv_temperature),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "token_logprobs (cuda) backward: ", cudaGetErrorString(err));
  return dz;
}
#endif

namespace {

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2, "token_logprobs: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0),
              "token_logprobs: targets must be [N] with N = ", logits.size(0), ", got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "token_logprobs: targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(logits.device() == targets.device(), "token_logprobs: logits and targets on different devices");
}

template <typename scalar_t>
void forward_rows(const scalar_t* z, const int64_t* y, float* logp, float* ent, float* stats, int64_t begin,
                  int64_t end, int64_t V, int64_t stride, float inv_t) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* row = z + r * stride;
    const RowLse lse = row_lse(row, V, inv_t);
    const int64_t t = y[r];
    TORCH_CHECK(t >= 0 && t < V, "token_logprobs: target ", t, " of row ", r, " is outside the vocabulary [0, ", V, ")");
    logp[r] = lse.logp(static_cast<float>(row[t]), inv_t);
    ent[r] = lse.entropy();
    stats[2 * r] = lse.mz;
    stats[2 * r + 1] = lse.log_d();
  }
}

template <typename scalar_t>
void backward_rows(const scalar_t* z, const int64_t* y, const float* stats, const float* ent, const float* dlogp,
                   const float* dent, scalar_t* dz, int64_t begin, int64_t end, int64_t V, int64_t stride, float inv_t) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* row = z + r * stride;
    scalar_t* out = dz + r * V;
    const float mz = stats[2 * r], logd = stats[2 * r + 1];
    for (int64_t v = 0; v < V; ++v) {
      const float lp = (static_cast<float>(row[v]) - mz) * inv_t - logd;
      const float p = std::exp(lp);
      float g = -dlogp[r] * p;
      if (p > 0.f) g -= dent[r] * p * (lp + ent[r]);
      if (v == y[r]) g += dlogp[r];
      out[v] = static_cast<scalar_t>(g * inv_t);
    }
  }
}

}  // namespace

// (logp [N], entropy [N], stats [N, 2] = (max z, log d)), all fp32; the backward takes stats and entropy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                                     double inv_temperature) {
  check_inputs(logits, targets);
#ifdef WITH_CUDA
  if (logits.is_cuda()) return token_logprobs_forward_cuda(logits, targets, inv_temperature);
#endif
  TORCH_CHECK(logits.device().is_cpu(), "token_logprobs: this build has no CUDA; logits are on ", logits.device());
  auto z = logits.stride(1) == 1 ? logits : logits.contiguous();
  auto y = targets.contiguous();
  const int64_t N = z.size(0), V = z.size(1);
  auto opts = z.options().dtype(at::kFloat);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "token_logprobs_forward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t* yp = y.data_ptr<int64_t>();
    const int64_t stride = z.stride(0);
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      forward_rows<scalar_t>(zp, yp, logp.data_ptr<float>(), ent.data_ptr<float>(), stats.data_ptr<float>(), b, e, V,
                             stride, static_cast<float>(inv_temperature));
    });
  });
  return {logp, ent, stats};
}

// d logits [N, V] in the logits' dtype, written into `out` when given (contiguous [N, V], same dtype;
// it may be `logits` itself: each element is read before it is overwritten) or a new tensor.
at::Tensor token_logprobs_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& stats,
                                   const at::Tensor& entropy, const at::Tensor& dlogp, const at::Tensor& dentropy,
                                   double inv_temperature, const std::optional<at::Tensor>& out) {
  check_inputs(logits, targets);
  for (const at::Tensor* t : {&stats, &entropy, &dlogp, &dentropy}) {
    TORCH_CHECK(t->device() == logits.device() && t->size(0) == logits.size(0),
                "token_logprobs_backward: stats, entropy and the upstream gradients must be [N, ...] on the logits' device ",
                logits.device());
  }
  auto z = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t N = z.size(0), V = z.size(1);
  at::Tensor dz;
  if (out.has_value()) {
    dz = *out;
    TORCH_CHECK(dz.sizes() == z.sizes() && dz.scalar_type() == z.scalar_type() && dz.is_contiguous() &&
                    dz.device() == z.device(),
                "token_logprobs_backward: out must be a contiguous ", z.sizes(), " ", z.scalar_type(), " tensor on ",
                z.device());
  } else {
    dz = at::empty({N, V}, z.options());
  }
#ifdef WITH_CUDA
  if (logits.is_cuda())
    return token_logprobs_backward_cuda(z, targets, stats, entropy, dlogp, dentropy, inv_temperature, dz);
#endif
  auto y = targets.contiguous();
  auto gl = dlogp.to(at::kFloat).contiguous(), ge = dentropy.to(at::kFloat).contiguous();
  auto st = stats.contiguous(), h = entropy.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "token_logprobs_backward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t stride = z.stride(0);
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      backward_rows<scalar_t>(zp, y.data_ptr<int64_t>(), st.data_ptr<float>(), h.data_ptr<float>(), gl.data_ptr<float>(),
                              ge.data_ptr<float>(), dz.data_ptr<scalar_t>(), b, e, V, stride,
                              static_cast<float>(inv_temperature));
    });
  });
  return dz;
}
