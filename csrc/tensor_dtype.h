// The dtype code the torch-free CUDA launchers take for a logits tensor (C++ side, torch headers).

#pragma once

#include <torch/extension.h>

// 0 = float32, 1 = float16, 2 = bfloat16; anything else is an error naming `op`.
inline int logits_dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}
