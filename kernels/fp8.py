"""fp8 (e4m3) storage of cached K/V with one scale per token and head.

A cached condition or background K/V of (B, H, N, D) becomes an e4m3 tensor of the same shape
and an fp32 scale (B, H, N): ``x = x8 * scale``, ``scale = amax(|x|) / 448`` over the D channels
of the row (448 is e4m3's largest finite value), so every row uses the format's full range. The
attention kernel dequantizes as it reads (``kernels/attention.py``): the key scale multiplies a
logit column after the QK product (which runs on the unscaled, fp8-exact keys), and each value
tile is dequantized in fp32 and rounded once to q's dtype before the PV product, exactly as
``dequantize_fp8`` rounds it. (Scaling the probabilities instead underflows fp16 for small
values.)

Three layers: the ``@triton.jit`` kernel, its launcher ``quantize_fp8_fwd``, and the reference
``quantize_fp8_reference``.
"""

from __future__ import annotations

import torch

from ._common import HAVE_TRITON, INTERPRET, needs_int64, next_pow2, tl, triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# A row of zeros gets this scale, not 0, so dequantization never divides by or multiplies into NaN.
MIN_SCALE = 1e-12


def quantize_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) -> (e4m3 (B, H, N, D), fp32 scale (B, H, N)), computed in fp32."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / FP8_MAX).clamp_min(MIN_SCALE)
    x8 = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, scale


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values an fp8 entry stands for, in ``dtype`` (rounded once, from fp32)."""
    return (x8.float() * scale.unsqueeze(-1).float()).to(dtype)


if HAVE_TRITON:

    @triton.jit
    def _quantize_fp8_rows(
        X, Out, Scale,
        s_b, s_h, s_n, s_d,  # input strides: any layout
        H, N, D, R,  # R = B * H * N rows
        FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
        ROUND_FIRST: tl.constexpr, INT64: tl.constexpr,
    ):
        # ROWS rows of D channels per program; the outputs are contiguous.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        if INT64:
            # x or out spans 2**31 elements or more: row * D and index * stride would wrap in int32
            # (and 64-bit division, needed then, is slow: the common case keeps int32)
            rows = rows.to(tl.int64)
            offs_d = offs_d.to(tl.int64)
        row_ok = rows < R
        b = rows // (H * N)
        h = (rows // N) % H
        n = rows % N
        mask = row_ok[:, None] & (offs_d[None, :] < D)
        x_ptrs = X + b[:, None] * s_b + h[:, None] * s_h + n[:, None] * s_n + offs_d[None, :] * s_d
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 1) / FP8_MAX, MIN_SCALE)
        y = tl.minimum(tl.maximum(x / scale[:, None], -FP8_MAX), FP8_MAX)
        if ROUND_FIRST:
            # The interpreter's fp32 -> e4m3 cast loses the carry when rounding crosses a power of
            # two (124.3 -> 64, not 128). Round to the e4m3 grid here (3 mantissa bits, exponent
            # >= -6, exact power-of-two steps; ties to even, as the hardware) so the cast is exact.
            e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            step = tl.math.exp2((tl.maximum(e, -6) - 3).to(tl.float32))
            t = tl.abs(y) / step
            r = tl.floor(t + 0.5)
            odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
            r = tl.where((r - t == 0.5) & odd, r - 1.0, r)
            y = tl.where(y < 0, -r * step, r * step)
        tl.store(Out + rows[:, None] * D + offs_d[None, :], y.to(Out.dtype.element_ty), mask=mask)
        tl.store(Scale + rows, scale, mask=row_ok)


def quantize_fp8_fwd(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    """Write e4m3 ``out`` (contiguous (B, H, N, D)) and fp32 ``scale`` (contiguous (B, H, N)) of x."""
    B, H, N, D = x.shape
    rows = B * H * N
    if rows == 0:
        return
    if INTERPRET and x.dtype == torch.bfloat16:
        x = x.float()  # the interpreter computes garbage on bf16; fp32 holds it exactly
    block_d = max(16, next_pow2(D))
    per = max(1, min(64, 4096 // block_d))
    _quantize_fp8_rows[(triton.cdiv(rows, per),)](
        x, out, scale, *x.stride(), H, N, D, rows,
        FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK_D=block_d, ROWS=per, ROUND_FIRST=INTERPRET,
        INT64=needs_int64(x, out, scale),
    )
