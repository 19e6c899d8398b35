// How the [R, K, V] gold and decoy logits of gold_decoy_contrast are laid out (element strides; the
// vocabulary stride is 1). Shared by contrast.cpp and the torch-free contrast_cuda.cu.

#pragma once

#include <cstdint>

struct ContrastLayout {
  int64_t K, V, stride_g_r, stride_g_k, stride_d_r, stride_d_k;
};
