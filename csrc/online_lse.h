// The CPU online log-sum-exp over one row of logits, shared by token_logprobs.cpp and contrast.cpp.
// With s = z / T and m = max s, it keeps d = sum exp(s - m) and a = sum exp(s - m) (s - m) in one
// pass; then log p_v = (z_v - max z) / T - log d and the entropy is log d - a / d. Differences of
// logits are taken before scaling by 1 / T. d and a accumulate in double: a sequential fp32 sum over
// the vocabulary would lose ~sqrt(V) ulps (torch sums pairwise; the CUDA path merges a tree).

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

struct RowLse {
  float mz = -std::numeric_limits<float>::infinity();  // the raw max logit (m = mz / T)
  double d = 0.0;                                       // sum exp(s - m)
  double a = 0.0;                                       // sum exp(s - m) (s - m)
  float log_d() const { return static_cast<float>(std::log(d)); }
  float entropy() const { return static_cast<float>(std::log(d) - a / d); }
  // log p of a token whose raw logit is zv
  float logp(float zv, float inv_t) const { return (zv - mz) * inv_t - log_d(); }
};

template <typename scalar_t>
RowLse row_lse(const scalar_t* row, int64_t V, float inv_t) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  RowLse r;
  for (int64_t v = 0; v < V; ++v) {
    const float zv = static_cast<float>(row[v]);
    if (zv == kNegInf) continue;  // a banned token: p = 0, contributes nothing
    if (r.d == 0.0) {
      r.mz = zv, r.d = 1.0, r.a = 0.0;
    } else if (zv > r.mz) {  // rescale to the new max: sum e^(s'-s)(s'-s) = e^(m-s) (a + d (m - s))
      const double shift = static_cast<double>((r.mz - zv) * inv_t);
      const double scale = std::exp(shift);
      r.a = scale * (r.a + r.d * shift);
      r.d = r.d * scale + 1.0;
      r.mz = zv;
    } else {
      const double sm = static_cast<double>((zv - r.mz) * inv_t);  // s - m, scaled after the subtraction
      const double e = std::exp(sm);
      r.d += e;
      r.a += e * sm;
    }
  }
  return r;
}
