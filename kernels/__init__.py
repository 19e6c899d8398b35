"""Triton kernels, installed as `selfdistill.kernels` (SPEC section 8).

Each public function has the name and signature of its torch reference in
`selfdistill.ops.reference`; `selfdistill.ops` picks one or the other (`ops.backend`). Layering,
after Liger-Kernel: `_x_kernel` (raw Triton) -> `x_forward` / `x_backward` (launch) ->
`XFunction` (autograd) -> `x` (public, validates its inputs).

Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter when
TRITON_INTERPRET=1 was set before this package was first imported (tests; slow).
"""

# With the repository root on sys.path this directory is also importable as a top-level `kernels`,
# the import name of Hugging Face's kernel-hub package, which `import transformers` probes for
# (`is_kernels_available` imports it and reads `__version__`). Under that name the module stays
# empty: triton is not imported, no kernel is compiled before TRITON_INTERPRET is decided, and
# transformers sees no version and treats the hub package as absent.
if __name__ == "selfdistill.kernels":
    from selfdistill.kernels.contrast import belief_shift, clipped_mean_min, gold_decoy_contrast
    from selfdistill.kernels.fused_linear import fused_linear_token_logprobs
    from selfdistill.kernels.policy_loss import policy_loss
    from selfdistill.kernels.token_logprobs import token_logprobs
    from selfdistill.kernels.topk_distill import fused_linear_topk_distill, topk_distill
    from selfdistill.kernels.utils import INTERPRETED

    __all__ = [
        "INTERPRETED",
        "belief_shift",
        "clipped_mean_min",
        "fused_linear_token_logprobs",
        "fused_linear_topk_distill",
        "gold_decoy_contrast",
        "policy_loss",
        "token_logprobs",
        "topk_distill",
    ]
