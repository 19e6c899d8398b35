// The Python module of the extension (selfdistill.ops.cuda_ext builds it): the ops of
// token_logprobs.cpp, policy_loss.cpp, contrast.cpp, fused_layers.cpp and decode_step.cpp.

#include <torch/extension.h>

#include "fused_layers.h"

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

at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& attention_mask,
                       const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& embed,
                       const at::Tensor& final_norm, const at::Tensor& lm_head, const at::Tensor& lm_head_bias,
                       const std::vector<at::Tensor>& layers, const std::vector<at::Tensor>& keys,
                       const std::vector<at::Tensor>& values, int64_t column, int64_t heads, int64_t kv_heads,
                       double eps, double scaling);

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
  m.def("rms_norm_forward", &rms_norm_forward, "HF RMSNorm over the last dim (CPU): (y, rstd float64 [rows])");
  m.def("rms_norm_backward", &rms_norm_backward, "(dx, dweight) of rms_norm_forward from dy, x, weight, rstd");
  m.def("rope_apply", &rope_apply,
        "x * cos + rotate_half(x) * sin for x [B, H, T, D], cos/sin [B, T, D]; transpose: its adjoint (CPU)");
  m.def("decode_step", &decode_step,
        "logits [B, V] of one decode step of a Qwen3/Qwen2/Llama decoder from its weights and row KV cache (CPU)");
  m.attr("with_cuda") =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
}
