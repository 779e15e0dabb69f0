// fp8 (e4m3) quantization of cached K/V with one fp32 scale per (b, h, n) row of D channels:
// scale = max(amax(|row|) / 448, 1e-12), out = round_to_nearest_even(clamp(x / scale)). The
// twin of kernels/fp8.py. Torch-free like qk_norm_rope.h.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common.h"

namespace fastgen {

struct QuantizeFp8Params {
  View4 in;          // (B, H, N, D), any strides
  uint8_t* out;      // e4m3 bytes, contiguous (B, H, N, D)
  float* scale;      // contiguous (B, H, N)
  int B, H, N, D;
  DType dtype;       // of in
};

cudaError_t launch_quantize_fp8(const QuantizeFp8Params& p, cudaStream_t stream);

}  // namespace fastgen
