// Thin torch binding of the csrc/ kernels: checks inputs, fills the params struct, launches on
// the current stream, writing into caller-given outputs (any strides). Registers the ops as fastgen_C::*; their fake (meta) implementations are
// registered from Python (src/fastgen/_cuda.py). Needs torch's CUDA headers (c10/cuda only).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "qk_norm_rope.h"
#include "quantize_fp8.h"

namespace {

fastgen::View4 view4(const at::Tensor& t) {
  fastgen::View4 v;
  v.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) v.stride[i] = t.stride(i);
  return v;
}

fastgen::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastgen::DType::kFloat32;
    case at::kHalf: return fastgen::DType::kFloat16;
    case at::kBFloat16: return fastgen::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastgen: unsupported dtype ", t.scalar_type(), " (fp16, bf16, fp32 are)");
  }
}

void qk_norm_rope(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& k_weight, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, double eps, int64_t norm_mode, int64_t rope_mode,
    at::Tensor& out_q, at::Tensor& out_k) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda(), "fastgen qk_norm_rope: q and k must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes(), "fastgen qk_norm_rope: q and k must be (B, H, S, D), one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "fastgen qk_norm_rope: q and k must share a dtype");
  TORCH_CHECK(norm_mode >= 0 && norm_mode <= 2 && rope_mode >= 0 && rope_mode <= 2, "fastgen qk_norm_rope: bad mode");
  for (const at::Tensor* o : {&out_q, &out_k}) {
    TORCH_CHECK(o->is_cuda() && o->sizes() == q.sizes() && o->scalar_type() == q.scalar_type(),
                "fastgen qk_norm_rope: outputs must be CUDA tensors of q's shape and dtype");
  }
  c10::cuda::CUDAGuard guard(q.device());

  fastgen::QKNormRopeParams p{};
  p.in[0] = view4(q);
  p.in[1] = view4(k);
  p.out[0] = view4(out_q);
  p.out[1] = view4(out_k);
  p.B = q.size(0); p.H = q.size(1); p.S = q.size(2); p.D = q.size(3);
  p.eps = static_cast<float>(eps);
  p.norm_mode = static_cast<int>(norm_mode);
  p.rope_mode = static_cast<int>(rope_mode);
  p.dtype = dtype_of(q);

  at::Tensor wq, wk;  // keep fp32 copies alive for the launch
  if (norm_mode != 0 && q_weight.has_value()) {
    TORCH_CHECK(k_weight.has_value(), "fastgen qk_norm_rope: give both weights or neither");
    const int64_t want = norm_mode == 1 ? p.D : int64_t(p.H) * p.D;
    TORCH_CHECK(q_weight->numel() == want && k_weight->numel() == want, "fastgen qk_norm_rope: weight size must be ", want);
    wq = q_weight->to(q.device(), at::kFloat).contiguous();
    wk = k_weight->to(q.device(), at::kFloat).contiguous();
    p.weight[0] = wq.data_ptr<float>();
    p.weight[1] = wk.data_ptr<float>();
  }
  if (rope_mode != 0) {
    TORCH_CHECK(cos.has_value() && sin.has_value(), "fastgen qk_norm_rope: rope needs cos and sin");
    TORCH_CHECK(cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat && cos->is_cuda(),
                "fastgen qk_norm_rope: cos/sin must be float32 CUDA tensors");
    TORCH_CHECK(cos->dim() == 2 && cos->size(1) == p.D / 2 && cos->size(0) <= p.S && sin->sizes() == cos->sizes(),
                "fastgen qk_norm_rope: cos/sin must be (S_rope <= S, D/2)");
    p.cos = cos->data_ptr<float>();
    p.sin = sin->data_ptr<float>();
    p.cos_stride[0] = cos->stride(0); p.cos_stride[1] = cos->stride(1);
    p.sin_stride[0] = sin->stride(0); p.sin_stride[1] = sin->stride(1);
    p.S_rope = cos->size(0);
  }
  const cudaError_t err = fastgen::launch_qk_norm_rope(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastgen qk_norm_rope launch failed: ", cudaGetErrorString(err));
}

void quantize_fp8(const at::Tensor& x, at::Tensor& out, at::Tensor& scale) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "fastgen quantize_fp8: x must be a 4-D CUDA tensor (B, H, N, D)");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kFloat8_e4m3fn && out.sizes() == x.sizes() && out.is_contiguous(),
              "fastgen quantize_fp8: out must be a contiguous float8_e4m3fn CUDA tensor of x's shape");
  TORCH_CHECK(scale.is_cuda() && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 3 &&
                  scale.size(0) == x.size(0) && scale.size(1) == x.size(1) && scale.size(2) == x.size(2),
              "fastgen quantize_fp8: scale must be a contiguous float32 CUDA tensor (B, H, N)");
  c10::cuda::CUDAGuard guard(x.device());
  fastgen::QuantizeFp8Params p{};
  p.in = view4(x);
  p.out = static_cast<uint8_t*>(out.data_ptr());
  p.scale = scale.data_ptr<float>();
  p.B = x.size(0); p.H = x.size(1); p.N = x.size(2); p.D = x.size(3);
  p.dtype = dtype_of(x);
  const cudaError_t err = fastgen::launch_quantize_fp8(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastgen quantize_fp8 launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(fastgen_C, m) {
  m.def("qk_norm_rope(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor? cos, Tensor? sin, "
        "float eps, int norm_mode, int rope_mode, Tensor(a!) out_q, Tensor(b!) out_k) -> ()");
  m.def("quantize_fp8(Tensor x, Tensor(a!) out, Tensor(b!) scale) -> ()");
}

TORCH_LIBRARY_IMPL(fastgen_C, CUDA, m) {
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("quantize_fp8", &quantize_fp8);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "fastgen CUDA kernels (ops under torch.ops.fastgen_C)"; }
