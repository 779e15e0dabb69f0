// Fused attention prologue: RMS-norm of q and k (per head or over all heads) plus rotary
// embedding, one pass, both tensors in one launch. Torch-free: raw pointers and a stream, so this
// header and qk_norm_rope.cu compile (nvcc -c) on machines without torch's CUDA headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common.h"

namespace fastgen {

struct QKNormRopeParams {
  View4 in[2];              // q, k
  View4 out[2];             // q_out, k_out; each may be its input itself (in place), else disjoint from both inputs
  const float* weight[2];   // fp32 RMS-norm weights, (D) or (H*D), or nullptr
  const float* cos;         // (S_rope, D/2) fp32, or nullptr
  const float* sin;
  int64_t cos_stride[2];
  int64_t sin_stride[2];
  int B, H, S, D, S_rope;
  float eps;
  int norm_mode;            // 0 none, 1 per head (over D), 2 over all heads (H*D)
  int rope_mode;            // 0 none, 1 interleaved pairs (2i, 2i+1), 2 halves (i, i+D/2)
  DType dtype;              // of in and out
};

// Returns cudaSuccess or the launch error; never synchronises.
cudaError_t launch_qk_norm_rope(const QKNormRopeParams& p, cudaStream_t stream);

}  // namespace fastgen
