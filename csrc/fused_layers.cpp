// The decoder layers' RMSNorm and rotary embedding, forward and backward, each one pass over its rows
// on the CPU: what autograd through HF's modules does in 6 to 12 elementwise passes, each a trip
// through memory (the update's activations do not fit in cache). Declarations and formulas in
// fused_layers.h. Math in at::opmath_type (fp32 for fp32/bf16/fp16, double for double); row sums in
// kLanes independent partial sums (vectorised; the order differs from torch's by float rounding);
// results in the input dtype. CPU only: on CUDA the training forward keeps HF's modules
// (selfdistill/ops/fused_layers.py decides). SwiGLU's product stays torch's (its vectorised exp
// beats a scalar one-pass loop).

#include "fused_layers.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 32768;  // below this many elements a call runs on one thread

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, width)); }

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (the fused layers are CPU kernels), got ",
              t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_cpu(x_in, "rms_norm_forward", "x");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "rms_norm_forward: weight must be [", D, "], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type(), "rms_norm_forward: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  const int64_t rows = D ? x.numel() / D : 0;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    double* rp = rstd.data_ptr<double>();
    at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * D;
        const acc_t ss = dot_lanes<acc_t>(xr, xr, D);
        const acc_t inv = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(D) + static_cast<acc_t>(eps));
        rp[r] = static_cast<double>(inv);
        scalar_t* yr = yp + r * D;
        for (int64_t i = 0; i < D; ++i) {
          const scalar_t normed = static_cast<scalar_t>(static_cast<acc_t>(xr[i]) * inv);
          yr[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) * static_cast<acc_t>(normed));
        }
      }
    });
  });
  return {y.view(x_in.sizes()), rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_cpu(x_in, "rms_norm_backward", "x");
  const int64_t D = x_in.size(-1);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous().to(x.scalar_type()), w = weight.contiguous();
  const int64_t rows = D ? x.numel() / D : 0;
  TORCH_CHECK(dy.numel() == x.numel() && rstd.numel() == rows, "rms_norm_backward: dy ", dy.sizes(), " / rstd ",
              rstd.sizes(), " do not match x ", x.sizes());
  at::Tensor dx = at::empty_like(x);
  const int threads = at::get_num_threads();
  // per thread: sum over its rows of dy * xhat (acc_t; combined in double below)
  std::vector<double> partial(static_cast<size_t>(threads) * D, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const at::Tensor rstd_c = rstd.contiguous().to(at::kDouble);
    const double* rp = rstd_c.data_ptr<double>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dw(D, acc_t(0)), gw(D);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * D;
        const scalar_t* gr = gp + r * D;
        const acc_t inv = static_cast<acc_t>(rp[r]);
        for (int64_t i = 0; i < D; ++i) {
          const acc_t g = static_cast<acc_t>(gr[i]);
          gw[i] = g * static_cast<acc_t>(wp[i]);
          dw[i] += g * static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(xr[i]) * inv));
        }
        const acc_t mean = inv * dot_lanes<acc_t>(gw.data(), xr, D) / static_cast<acc_t>(D);  // mean_i (dy_i w_i) xhat_i
        scalar_t* dr = dxp + r * D;
        for (int64_t i = 0; i < D; ++i) dr[i] = static_cast<scalar_t>(inv * (gw[i] - static_cast<acc_t>(xr[i]) * inv * mean));
      }
      double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * D;
      for (int64_t i = 0; i < D; ++i) mine[i] += static_cast<double>(dw[i]);
    });
  });
  at::Tensor dw = at::zeros({D}, x.options().dtype(at::kDouble));
  double* dwp = dw.data_ptr<double>();
  for (int t = 0; t < threads; ++t)
    for (int64_t i = 0; i < D; ++i) dwp[i] += partial[static_cast<size_t>(t) * D + i];
  return {dx.view(x_in.sizes()), dw.to(weight.scalar_type())};
}

at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  check_cpu(x, "rope_apply", "x");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes(), "rope_apply: x must be [B, H, T, D] and "
              "cos/sin [B, T, D], got ", x.sizes(), " and ", cos.sizes());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.size(0) == B && cos.size(1) == T && cos.size(2) == D, "rope_apply: x ", x.sizes(),
              " and cos/sin ", cos.sizes(), " do not fit (even D, cos/sin [B, T, D])");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(2) == 1 && sin.stride(2) == 1,
              "rope_apply: the last dim of x, cos and sin must be contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope_apply: cos/sin dtype ",
              cos.scalar_type(), " differs from x dtype ", x.scalar_type());
  at::Tensor y = at::empty_like(x);  // same layout as x (a transposed view stays one)
  TORCH_CHECK(y.stride(3) == 1, "rope_apply: could not lay out the output like x");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * T, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / (H * T), h = (n / T) % H, t = n % T;
        const scalar_t* xr = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        scalar_t* yr = yp + b * y.stride(0) + h * y.stride(1) + t * y.stride(2);
        const scalar_t* c = cp + b * cos.stride(0) + t * cos.stride(1);
        const scalar_t* s = sp + b * sin.stride(0) + t * sin.stride(1);
        for (int64_t i = 0; i < half; ++i) {
          const acc_t x1 = static_cast<acc_t>(xr[i]), x2 = static_cast<acc_t>(xr[i + half]);
          const acc_t c1 = static_cast<acc_t>(c[i]), c2 = static_cast<acc_t>(c[i + half]);
          const acc_t s1 = static_cast<acc_t>(s[i]), s2 = static_cast<acc_t>(s[i + half]);
          if (!transpose) {  // y = x * cos + cat(-x2, x1) * sin
            yr[i] = static_cast<scalar_t>(x1 * c1 + (-x2) * s1);
            yr[i + half] = static_cast<scalar_t>(x2 * c2 + x1 * s2);
          } else {  // the adjoint: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
            yr[i] = static_cast<scalar_t>(x1 * c1 + x2 * s2);
            yr[i + half] = static_cast<scalar_t>(x2 * c2 - x1 * s1);
          }
        }
      }
    });
  });
  return y;
}
