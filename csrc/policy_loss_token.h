// The per-token terms of the fused policy loss, one definition for the CPU path (policy_loss.cpp)
// and the CUDA kernel (policy_loss_cuda.cu). See policy_loss.cpp for the math.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define SD_HOST_DEVICE __host__ __device__
#else
#define SD_HOST_DEVICE
#endif

struct PolicyLossArgs {
  float ratio_low, ratio_high, dual_clip, kl_coef, entropy_coef, w0, w1;
  int kl_estimator;  // 1, 2, 3 = k1, k2, k3
  bool ramp, gspo, has_dual, has_ref, has_ent, kl_in_loss, ent_in_loss, store_coef_ent;
};

struct TokenTerms {
  float loss;   // l_t before the token weight
  float dloss;  // d l_t / d logp_t
  float kl;     // the KL estimate (0 without a reference)
  float ratio;  // r_t (gspo: the row's sequence ratio)
};

SD_HOST_DEVICE inline TokenTerms token_terms(float logp, float old, float adv, float ref, float ent, float seq_log_ratio,
                                             const PolicyLossArgs& a) {
  const float ratio = expf(a.gspo ? seq_log_ratio : logp - old);
  const float clipped = fminf(fmaxf(ratio, a.ratio_low), a.ratio_high);
  const float pg_free = -ratio * adv, pg_clip = -clipped * adv;
  float loss = fmaxf(pg_free, pg_clip);
  float dloss = pg_free >= pg_clip ? pg_free : 0.f;  // -r A on the unclipped branch (ties too)
  if (a.has_dual && adv < 0.f && loss > -a.dual_clip * adv) loss = -a.dual_clip * adv, dloss = 0.f;
  float kl = 0.f;
  if (a.has_ref) {
    const float x = logp - ref;  // log pi / ref
    float dkl;
    if (a.kl_estimator == 1) kl = x, dkl = 1.f;
    else if (a.kl_estimator == 2) kl = 0.5f * x * x, dkl = x;
    else kl = expf(-x) + x - 1.f, dkl = 1.f - expf(-x);
    if (a.kl_in_loss) loss += a.kl_coef * kl, dloss += a.kl_coef * dkl;
  }
  if (a.has_ent && a.ent_in_loss) loss -= a.entropy_coef * ent;
  return {loss, dloss, kl, ratio};
}

// The progressive weight of token t in a row of length L (0 past L), given 1 / mean ramp; 1 when uniform.
SD_HOST_DEVICE inline float token_weight(float t, float length, float ramp_denom, float inv_ramp_mean, const PolicyLossArgs& a) {
  if (!a.ramp) return 1.f;
  return t < length ? (a.w0 + (a.w1 - a.w0) * t / ramp_denom) * inv_ramp_mean : 0.f;
}

// One token of a row's loss pass: writes coef[i] (and coef_ent[i]) and adds to the row sums acc[7]
// (w l, tokens, clipped low, clipped high, ratio, kl, entropy). Masked-out tokens get coefficient 0.
template <typename Acc>
SD_HOST_DEVICE inline void loss_pass_token(Acc* acc, int64_t i, int64_t t, const uint8_t* mask, const float* logp,
                                           const float* old, const float* adv, const float* ref, const float* ent,
                                           float* coef, float* coef_ent, float seq_log_ratio, float length,
                                           float ramp_denom, float inv_ramp_mean, const PolicyLossArgs& a) {
  if (!mask[i]) {
    coef[i] = 0.f;
    if (a.store_coef_ent) coef_ent[i] = 0.f;
    return;
  }
  const TokenTerms x = token_terms(logp[i], old[i], adv[i], a.has_ref ? ref[i] : 0.f, a.has_ent ? ent[i] : 0.f,
                                   seq_log_ratio, a);
  const float w = token_weight(static_cast<float>(t), length, ramp_denom, inv_ramp_mean, a);
  coef[i] = x.dloss * w;
  if (a.store_coef_ent) coef_ent[i] = -a.entropy_coef * w;
  acc[0] += x.loss * w;
  acc[1] += 1.f;
  acc[2] += (x.ratio < a.ratio_low && adv[i] < 0.f) ? 1.f : 0.f;
  acc[3] += (x.ratio > a.ratio_high && adv[i] > 0.f) ? 1.f : 0.f;
  acc[4] += x.ratio;
  acc[5] += x.kl;
  if (a.has_ent) acc[6] += ent[i];
}

#if defined(__CUDACC__) || defined(WITH_CUDA)
#include <cuda_runtime.h>

// policy_loss_cuda.cu: one block per row over [B, T] fp32 inputs (mask uint8, lengths int64).
cudaError_t policy_loss_row_pass_launch(const float* logp, const float* old, const float* adv, const uint8_t* mask,
                                        const int64_t* lengths, const float* ref, const float* ent, float* coef,
                                        float* coef_ent, float* rows, int64_t B, int64_t T, const PolicyLossArgs& a,
                                        cudaStream_t stream);
#endif
