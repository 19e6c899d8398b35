// The Python module of the extension (selfdistill.ops.cuda_ext builds it): the ops of
// token_logprobs.cpp, policy_loss.cpp and contrast.cpp.

#include <torch/extension.h>

#include <optional>
#include <tuple>

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                                     double inv_temperature);
at::Tensor token_logprobs_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& stats,
                                   const at::Tensor& entropy, const at::Tensor& dlogp, const at::Tensor& dentropy,
                                   double inv_temperature, const std::optional<at::Tensor>& out);
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_row_pass(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask,
    const at::Tensor& lengths, const at::Tensor& ref_logp, const at::Tensor& entropy, double ratio_low, double ratio_high,
    double dual_clip, double kl_coef, double entropy_coef, double w0, double w1, int64_t kl_estimator, bool ramp, bool gspo,
    bool has_dual, bool store_coef_entropy);
at::Tensor first_position_contrast_forward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                           const at::Tensor& gold_ids, const at::Tensor& decoy_ids, double inv_temperature);
at::Tensor clipped_mean_min_forward(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& minus, double clip,
                                    double min_weight);
std::tuple<at::Tensor, at::Tensor> belief_shift_forward(const at::Tensor& belief_open, const at::Tensor& belief_close,
                                                        double clip, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("token_logprobs_forward", &token_logprobs_forward,
        "(logp, entropy, stats) fp32 from logits [N, V] and targets [N] at 1 / temperature");
  m.def("token_logprobs_backward", &token_logprobs_backward,
        "d logits from the forward's stats and entropy and the upstream d logp, d entropy (into out if given; it may "
        "alias the logits)",
        py::arg("logits"), py::arg("targets"), py::arg("stats"), py::arg("entropy"), py::arg("dlogp"), py::arg("dentropy"),
        py::arg("inv_temperature"), py::arg("out") = py::none());
  m.def("policy_loss_row_pass", &policy_loss_row_pass,
        "(coef [B, T], coef_entropy [B, T] or empty, rows [B, 7]) of the fused policy loss (selfdistill.ops.row_pass_loss)");
  m.def("first_position_contrast_forward", &first_position_contrast_forward,
        "fp32 (h . (W[gold] - W[decoy]) + b[gold] - b[decoy]) / T per row of hidden [n, H] (bias empty: none)");
  m.def("clipped_mean_min_forward", &clipped_mean_min_forward,
        "per row of [R, K], x = values - minus: mean(clip(x)) + min_weight * min(clip(x)) over a uint8 mask, in double; "
        "NaN for no member");
  m.def("belief_shift_forward", &belief_shift_forward,
        "PMI-shift's (clip(close - open) float64 [R], flip int8 [R]) from float64 beliefs");
  m.attr("with_cuda") =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
}
