"""Every Triton kernel compiles for an H100 (sm_90) in compiled mode, on a machine without a GPU.

The other kernel tests run the Triton interpreter, which accepts code the compiler rejects (a
loop-carried or if-merged value that changes type, a non-constexpr global, ...). Here
`triton.compile` runs the whole pipeline (front end, LLVM, the ptxas bundled with triton) on each
kernel with bf16 logits and on every constexpr branch of the policy loss. It runs in a subprocess
without TRITON_INTERPRET, because the mode is fixed when `selfdistill.kernels` is first imported,
and with a fresh Triton cache so nothing is skipped as already compiled.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_NVIDIA_BACKEND = 3  # exit status of the subprocess when this triton build cannot target CUDA

LOGITS = {"x_ptr", "dx_ptr", "h_ptr", "w_ptr", "b_ptr"}
INT64_POINTERS = {"targets_ptr", "gold_ids_ptr", "decoy_ids_ptr", "lengths_ptr", "idx_ptr"}
FLOATS = {"inv_temperature", "clip", "min_weight", "ratio_low", "ratio_high", "dual_clip", "kl_coef", "entropy_coef", "w0", "w1",
          "log_1m_alpha", "log_alpha", "one_m_alpha", "alpha", "tail_lse_max"}


def signature(fn, constexprs: dict, types: dict | None = None) -> dict:
    sig = {}
    for name in fn.arg_names:
        if types and name in types:
            sig[name] = types[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name in LOGITS:
            sig[name] = "*bf16"
        elif name in INT64_POINTERS:
            sig[name] = "*i64"
        elif name == "kind_ptr":
            sig[name] = "*i8"
        elif name == "mask_ptr":
            sig[name] = "*u8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def policy_loss_variants():
    # (RAMP, GSPO, DUAL, KL_EST, HAS_REF, HAS_ENT): every branch taken at least once
    for ramp, gspo, dual, kl, ref, ent in [(0, 0, 0, 1, 1, 1), (1, 1, 1, 2, 1, 1), (1, 0, 1, 3, 1, 0), (0, 1, 0, 3, 0, 1), (0, 0, 0, 1, 0, 0)]:
        yield dict(HAS_REF=bool(ref), HAS_ENT=bool(ent), KL_IN_LOSS=bool(ref), ENT_IN_LOSS=bool(ent), KL_EST=kl, RAMP=bool(ramp),
                   GSPO=bool(gspo), PREPASS=bool(ramp or gspo), DUAL=bool(dual), STORE_COEF_ENT=bool(ent), N_STATS=7, BLOCK_T=1024)


def compile_all() -> int:
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        print("this triton build has no NVIDIA backend; nothing to compile against")
        return NO_NVIDIA_BACKEND
    tk, ck, pk, dk = (importlib.import_module(f"selfdistill.kernels.{m}") for m in ("token_logprobs", "contrast", "policy_loss",
                                                                                     "topk_distill"))
    jobs = [(fn, {"BLOCK_V": 4096}, 8, None) for fn in (tk._token_logprobs_fwd_kernel, tk._token_logprobs_bwd_kernel)]
    # the contrast family: bf16 hidden states and weight; float64 reductions (params, beliefs, outputs)
    jobs += [(ck._first_position_contrast_kernel, {"HAS_BIAS": bias, "BLOCK_H": 4096}, 8, None) for bias in (True, False)]
    fp64 = {"params_ptr": "*fp64", "out_ptr": "*fp64", "open_ptr": "*fp64", "close_ptr": "*fp64", "shift_ptr": "*fp64",
            "flip_ptr": "*i8", "minus_ptr": "*fp32", "x_ptr": "*fp32"}
    jobs += [(ck._clipped_mean_min_kernel, {"HAS_MINUS": minus, "BLOCK_K": 16}, 4, fp64) for minus in (True, False)]
    jobs.append((ck._belief_shift_kernel, {"BLOCK": 256}, 4, fp64))
    jobs += [(pk._policy_loss_fwd_kernel, consts, 4, None) for consts in policy_loss_variants()]
    jobs += [(fn, {"BLOCK_V": 4096, "BLOCK_K": 128}, 8, None) for fn in (dk._topk_logprobs_kernel, dk._topk_distill_bwd_kernel)]
    jobs += [(dk._topk_divergence_kernel, {"TAIL": tail, "MODE": mode, "BLOCK_K": 128}, 4, None)
             for tail in (True, False) for mode in (0, 1, 2)]
    failures = 0
    for fn, consts, warps, types in jobs:
        try:
            triton.compile(ASTSource(fn, signature(fn, consts, types), consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps})
        except Exception as e:  # noqa: BLE001  (report every kernel that fails, then fail)
            failures += 1
            print(f"FAILED {fn.__name__} {consts}: {type(e).__name__}: {e}")
    return 1 if failures else 0


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == NO_NVIDIA_BACKEND:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


if __name__ == "__main__":
    sys.exit(compile_all())
