// The per-token terms of the fused policy loss, one definition for the CPU path (policy_loss.cpp)
// and the CUDA kernel (policy_loss_cuda.cu). See policy_loss.cpp for the math.
#pragma once

#include <math.h>

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
