// Row pass of the fused policy loss (SPEC sections 5 and 7): the csrc twin of the Triton kernel in
// kernels/policy_loss.py, with the host side shared (selfdistill/ops/row_pass_loss.py).
// Per completion row b:
//   1. (ramp weighting or gspo) n = #{t in mask, t < L}, sum of those t (the ramp's mean), and gspo's
//      sequence log-ratio mean over the mask;
//   2. per token: r = exp(logp - old) (gspo: the row's sequence ratio), l = max(-r A, -clip(r) A),
//      dual clip l = min(l, -dual A) for A < 0, + kl_coef * KL(k1|k2|k3) - entropy_coef * H, times
//      w_t = ramp(t) / mean ramp (or 1); coef_t = w_t dl/dlogp, coef_entropy_t = -entropy_coef w_t;
//      row sums: w l, tokens, clipped low, clipped high, ratio, kl, entropy.
// Inputs are fp32 [B, T] (mask uint8), lengths int64 [B]; an empty ref / entropy tensor means none.
// CPU here; CUDA in policy_loss_cuda.cu when built WITH_CUDA.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "policy_loss_token.h"

namespace {

constexpr int kRowStats = 7;

void check(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& adv, const at::Tensor& mask,
           const at::Tensor& lengths) {
  TORCH_CHECK(logp.dim() == 2, "policy_loss_row_pass: logp must be [B, T], got ", logp.sizes());
  for (const at::Tensor* t : {&old_logp, &adv}) {
    TORCH_CHECK(t->sizes() == logp.sizes() && t->scalar_type() == at::kFloat,
                "policy_loss_row_pass: old_logp / advantages must be fp32 [B, T] like logp");
  }
  TORCH_CHECK(logp.scalar_type() == at::kFloat, "policy_loss_row_pass: logp must be fp32");
  TORCH_CHECK(mask.sizes() == logp.sizes() && mask.scalar_type() == at::kByte, "policy_loss_row_pass: mask must be uint8 [B, T]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == logp.size(0) && lengths.scalar_type() == at::kLong,
              "policy_loss_row_pass: lengths must be int64 [B]");
}

void cpu_rows(const float* logp, const float* old, const float* adv, const uint8_t* mask, const int64_t* lengths,
              const float* ref, const float* ent, float* coef, float* coef_ent, float* rows, int64_t begin, int64_t end,
              int64_t T, const PolicyLossArgs& a) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * T;
    const float length = static_cast<float>(lengths[b]);
    const float ramp_denom = std::max(length - 1.f, 1.f);
    double n_w = 0, sum_t = 0, sum_log_ratio = 0, n_mask = 0;
    if (a.ramp || a.gspo) {
      for (int64_t t = 0; t < T; ++t) {
        if (!mask[o + t]) continue;
        if (static_cast<float>(t) < length) n_w += 1, sum_t += static_cast<double>(t);
        sum_log_ratio += static_cast<double>(logp[o + t] - old[o + t]);
        n_mask += 1;
      }
    }
    const float ramp_mean = a.w0 + (a.w1 - a.w0) * static_cast<float>(sum_t / std::max(n_w, 1.0)) / ramp_denom;
    const float inv_ramp_mean = n_w > 0 ? 1.f / ramp_mean : 0.f;
    const float seq_log_ratio = static_cast<float>(sum_log_ratio / std::max(n_mask, 1.0));
    double acc[kRowStats] = {0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = 0; t < T; ++t) {
      loss_pass_token(acc, o + t, t, mask, logp, old, adv, ref, ent, coef, coef_ent, seq_log_ratio, length, ramp_denom,
                      inv_ramp_mean, a);
    }
    for (int k = 0; k < kRowStats; ++k) rows[b * kRowStats + k] = static_cast<float>(acc[k]);
  }
}

}  // namespace

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_row_pass(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const at::Tensor& lengths, const at::Tensor& ref_logp, const at::Tensor& entropy, double ratio_low, double ratio_high,
    double dual_clip, double kl_coef, double entropy_coef, double w0, double w1, int64_t kl_estimator, bool ramp, bool gspo,
    bool has_dual, bool store_coef_entropy) {
  check(logp, old_logp, advantages, mask, lengths);
  for (const at::Tensor* t : {&old_logp, &advantages, &mask, &lengths, &ref_logp, &entropy}) {
    TORCH_CHECK(t->numel() == 0 || t->device() == logp.device(), "policy_loss_row_pass: every input must be on logp's device ",
                logp.device(), ", got one on ", t->device());
  }
  TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 3, "policy_loss_row_pass: kl_estimator must be 1, 2 or 3 (k1, k2, k3)");
  const int64_t B = logp.size(0), T = logp.size(1);
  PolicyLossArgs a{static_cast<float>(ratio_low), static_cast<float>(ratio_high), static_cast<float>(dual_clip),
                static_cast<float>(kl_coef), static_cast<float>(entropy_coef), static_cast<float>(w0),
                static_cast<float>(w1), static_cast<int>(kl_estimator), ramp, gspo, has_dual,
                ref_logp.numel() == logp.numel() && logp.numel() > 0, entropy.numel() == logp.numel() && logp.numel() > 0,
                false, false, false};
  a.kl_in_loss = a.has_ref && a.kl_coef != 0.f;
  a.ent_in_loss = a.has_ent && a.entropy_coef != 0.f;
  a.store_coef_ent = store_coef_entropy && a.ent_in_loss;
  auto opts = logp.options().dtype(at::kFloat);
  auto coef = at::empty({B, T}, opts);
  auto coef_ent = a.store_coef_ent ? at::empty({B, T}, opts) : at::empty({0}, opts);
  auto rows = at::zeros({B, kRowStats}, opts);
  if (B == 0 || T == 0) return {coef, coef_ent, rows};
  auto lp = logp.contiguous(), old = old_logp.contiguous(), adv = advantages.contiguous(), m = mask.contiguous();
  auto len = lengths.contiguous();
  auto ref = a.has_ref ? ref_logp.contiguous() : lp, ent = a.has_ent ? entropy.contiguous() : lp;
  float* coef_ent_ptr = a.store_coef_ent ? coef_ent.data_ptr<float>() : nullptr;
#ifdef WITH_CUDA
  if (logp.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logp.device());
    const cudaError_t err = policy_loss_row_pass_launch(
        lp.data_ptr<float>(), old.data_ptr<float>(), adv.data_ptr<float>(), m.data_ptr<uint8_t>(), len.data_ptr<int64_t>(),
        ref.data_ptr<float>(), ent.data_ptr<float>(), coef.data_ptr<float>(), coef_ent_ptr, rows.data_ptr<float>(), B, T, a,
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "policy_loss_row_pass (cuda): ", cudaGetErrorString(err));
    return {coef, coef_ent, rows};
  }
#endif
  TORCH_CHECK(logp.device().is_cpu(), "policy_loss_row_pass: this build has no CUDA; inputs are on ", logp.device());
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    cpu_rows(lp.data_ptr<float>(), old.data_ptr<float>(), adv.data_ptr<float>(), m.data_ptr<uint8_t>(),
             len.data_ptr<int64_t>(), ref.data_ptr<float>(), ent.data_ptr<float>(), coef.data_ptr<float>(), coef_ent_ptr,
             rows.data_ptr<float>(), begin, end, T, a);
  });
  return {coef, coef_ent, rows};
}
