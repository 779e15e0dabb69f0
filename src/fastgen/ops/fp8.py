"""fp8 storage of cached K/V: ``quantize_kv`` -> ``Fp8KV``, read by ``fastgen.ops.attention``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.kernels import fp8 as _k
from fastgen.constants import KERNEL_BACKENDS as BACKENDS
from fastgen.ops.prologue import choose_backend


@torch.library.custom_op("fastgen::quantize_fp8_triton", mutates_args=("out", "scale"))
def _quantize_fp8_triton(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    _k.quantize_fp8_fwd(x, out, scale)


@_quantize_fp8_triton.register_fake
def _(x, out, scale):
    return None


def quantize_fp8(x: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize (B, H, N, D) to e4m3 with one fp32 scale per (b, h, n) row: ``x ~ x8 * scale``.

    Args:
        x: (B, H, N, D), fp16, bf16 or fp32, any strides.
        backend: ``"auto"`` (CUDA extension, else Triton on a GPU; PyTorch on a CPU), ``"cuda"``,
            ``"triton"`` or ``"torch"``.

    Returns:
        (x8, scale): x8 (B, H, N, D) ``torch.float8_e4m3fn`` contiguous; scale (B, H, N) float32
        contiguous, ``amax(|row|) / 448``. Error per element at most half an e4m3 step
        (2**-4 relative) of the row's scale.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a 4-D floating-point tensor (B, H, N, D), got {getattr(x, 'shape', type(x))}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    name = choose_backend(backend, x, "quantize_fp8", "quantize_fp8")
    if name == "torch":
        return _k.quantize_fp8_reference(x)
    out = torch.empty(x.shape, dtype=_k.FP8, device=x.device)
    scale = torch.empty(x.shape[:3], dtype=torch.float32, device=x.device)
    if name == "triton":
        torch.ops.fastgen.quantize_fp8_triton(x, out, scale)
    else:
        torch.ops.fastgen_C.quantize_fp8(x, out, scale)
    return out, scale


@dataclass
class Fp8KV:
    """A cached K/V segment in fp8: k, v (B or 1, H, N, D) e4m3; k_scale, v_scale (B or 1, H, N)
    fp32. Give it to ``fastgen.ops.attention`` in ``extra_kv`` in place of a (k, v) pair: the
    Triton kernel dequantizes while reading; other backends dequantize first."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v, self.k_scale, self.v_scale

    @property
    def shape(self) -> torch.Size:
        return self.k.shape

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) in ``dtype``."""
        return _k.dequantize_fp8(self.k, self.k_scale, dtype), _k.dequantize_fp8(self.v, self.v_scale, dtype)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> Fp8KV:
    """``Fp8KV`` of a (k, v) pair, each (B, H, N, D): half the bytes of fp16/bf16."""
    k8, ks = quantize_fp8(k, backend=backend)
    v8, vs = quantize_fp8(v, backend=backend)
    return Fp8KV(k8, v8, ks, vs)


def fp8_error(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> dict[str, float]:
    """What fp8 storage of (k, v) costs: max relative error of the dequantized k and v (relative to
    each tensor's max |value|), and with queries ``q`` the max error of attention over them
    relative to the output's max |value|; plus the bytes saved. All computed in fp32."""
    e = quantize_kv(k, v)
    kd, vd = e.dequantize(torch.float32)
    kf, vf = k.float(), v.float()
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    out = {"k_rel_err": rel(kd, kf), "v_rel_err": rel(vd, vf),
           "bytes": sum(t.numel() * t.element_size() for t in (k, v)),
           "fp8_bytes": sum(t.numel() * t.element_size() for t in e.tensors())}
    if q is not None:
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kf.expand(q.shape[0], -1, -1, -1),
                                                               vf.expand(q.shape[0], -1, -1, -1))
        got = torch.nn.functional.scaled_dot_product_attention(q.float(), kd.expand(q.shape[0], -1, -1, -1),
                                                               vd.expand(q.shape[0], -1, -1, -1))
        out["attention_rel_err"] = rel(got, ref)
    return out
