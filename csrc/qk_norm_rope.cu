// See qk_norm_rope.h. One thread block per (token, q|k); warps own heads, lanes own channels.
// Pass 1 reduces the sum of squares per head (and over heads for norm_mode 2); pass 2 gives each
// lane whole RoPE pairs: it reads both members (same row, L1-hot), normalises and rotates them,
// and writes both. No lane reads an element another lane writes, so out may be the input itself
// (in place): pass 1's reads end at the barrier, and pass 2 reads a pair only before writing it.
#include "qk_norm_rope.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastgen {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_kernel(QKNormRopeParams p) {
  extern __shared__ float head_ss[];  // H floats: per-head sum of squares
  const int which = blockIdx.y;       // 0: q, 1: k
  const int64_t token = blockIdx.x;
  const int64_t b = token / p.S, s = token % p.S;
  const View4 in = p.in[which], out = p.out[which];
  const T* x = static_cast<const T*>(in.data) + b * in.stride[0] + s * in.stride[2];
  T* y = static_cast<T*>(out.data) + b * out.stride[0] + s * out.stride[2];
  const float* w = p.weight[which];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = p.D, H = p.H;

  if (p.norm_mode != 0) {
    for (int h = warp; h < H; h += kWarps) {
      float acc = 0.f;
      for (int d = lane; d < D; d += 32) {
        const float v = to_f32<T>(x[h * in.stride[1] + d * in.stride[3]]);
        acc += v * v;
      }
      acc = warp_sum(acc);
      if (lane == 0) head_ss[h] = acc;
    }
    __syncthreads();
  }
  float rstd_all = 1.f;
  if (p.norm_mode == 2) {
    float total = 0.f;
    for (int h = 0; h < H; ++h) total += head_ss[h];
    rstd_all = rsqrtf(total / float(H * D) + p.eps);
  }
  const bool rotate = p.rope_mode != 0 && s < p.S_rope;
  const int half = D / 2;

  for (int h = warp; h < H; h += kWarps) {
    const float rstd = p.norm_mode == 1 ? rsqrtf(head_ss[h] / float(D) + p.eps) : rstd_all;
    const float* wh = w == nullptr ? nullptr : (p.norm_mode == 1 ? w : w + h * D);
    const T* xh = x + h * in.stride[1];
    T* yh = y + h * out.stride[1];
    if (!rotate) {
      for (int d = lane; d < D; d += 32) {
        float v = to_f32<T>(xh[d * in.stride[3]]) * rstd;
        if (wh) v *= wh[d];
        yh[d * out.stride[3]] = from_f32<T>(v);
      }
      continue;
    }
    // Pair i is (2i, 2i+1) interleaved or (i, i + D/2) half. Reading the partner of one's own
    // element instead let a lane read, in a later iteration, a "half" partner (D > 32) that
    // another lane had already rotated in place.
    for (int i = lane; i < half; i += 32) {
      const int d0 = p.rope_mode == 1 ? 2 * i : i;
      const int d1 = p.rope_mode == 1 ? 2 * i + 1 : i + half;
      float a = to_f32<T>(xh[d0 * in.stride[3]]) * rstd;
      float b = to_f32<T>(xh[d1 * in.stride[3]]) * rstd;
      if (wh) {
        a *= wh[d0];
        b *= wh[d1];
      }
      const float c = p.cos[s * p.cos_stride[0] + i * p.cos_stride[1]];
      const float sn = p.sin[s * p.sin_stride[0] + i * p.sin_stride[1]];
      yh[d0 * out.stride[3]] = from_f32<T>(a * c - b * sn);
      yh[d1 * out.stride[3]] = from_f32<T>(b * c + a * sn);
    }
  }
}

template <typename T>
cudaError_t launch_typed(const QKNormRopeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B) * static_cast<unsigned>(p.S), 2);
  const size_t smem = sizeof(float) * p.H;
  qk_norm_rope_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_qk_norm_rope(const QKNormRopeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.S == 0) return cudaSuccess;
  if (p.H <= 0 || p.D <= 0 || (p.rope_mode != 0 && (p.D % 2 != 0 || p.cos == nullptr || p.sin == nullptr)))
    return cudaErrorInvalidValue;
  if (static_cast<size_t>(p.H) * sizeof(float) > 48 * 1024) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_typed<float>(p, stream);
    case DType::kFloat16: return launch_typed<__half>(p, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastgen
