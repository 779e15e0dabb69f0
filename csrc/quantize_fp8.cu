// See quantize_fp8.h. One warp per row: lanes stride over the D channels, a warp max gives the
// row's scale, then each lane writes its channels. Memory-bound: one read, ~half a write.
#include "quantize_fp8.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace fastgen {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;
constexpr float kFp8Max = 448.f;
constexpr float kMinScale = 1e-12f;

template <typename T> __device__ __forceinline__ float load_f32(const T* p);
template <> __device__ __forceinline__ float load_f32<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float load_f32<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_fp8_kernel(QuantizeFp8Params p) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.B) * p.H * p.N;
  if (row >= rows) return;
  const int64_t b = row / (int64_t(p.H) * p.N), h = (row / p.N) % p.H, n = row % p.N;
  const T* x = static_cast<const T*>(p.in.data) + b * p.in.stride[0] + h * p.in.stride[1] + n * p.in.stride[2];
  const int64_t sd = p.in.stride[3];

  float amax = 0.f;
  for (int d = lane; d < p.D; d += 32) amax = fmaxf(amax, fabsf(load_f32<T>(x + d * sd)));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = fmaxf(amax / kFp8Max, kMinScale);

  uint8_t* y = p.out + row * p.D;
  for (int d = lane; d < p.D; d += 32) {
    const float v = fminf(fmaxf(load_f32<T>(x + d * sd) / scale, -kFp8Max), kFp8Max);
    y[d] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);  // round to nearest even
  }
  if (lane == 0) p.scale[row] = scale;
}

}  // namespace

cudaError_t launch_quantize_fp8(const QuantizeFp8Params& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.H * p.N;
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  switch (p.dtype) {
    case DType::kFloat32: quantize_fp8_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kFloat16: quantize_fp8_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: quantize_fp8_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace fastgen
