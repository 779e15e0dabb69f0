// Types shared by the torch-free kernels in csrc/: a dtype tag and a strided 4-D view.
#pragma once
#include <cstdint>

namespace fastgen {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct View4 {  // a (B, H, S, D) tensor: data pointer and element strides
  void* data;
  int64_t stride[4];
};

}  // namespace fastgen
