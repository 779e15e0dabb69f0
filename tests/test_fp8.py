"""fp8 K/V storage: the quantization kernel against its reference, and attention reading fp8
segments in place against a float64 reference over the dequantized values."""

from __future__ import annotations

import math

import pytest
import torch

import fastgen.ops as ops
from fastgen.kernels.attention import attention_reference
from fastgen.kernels.fp8 import FP8, FP8_MAX, dequantize_fp8, quantize_fp8_reference
from helpers import DEVICE, assert_within_pytorch_error

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def rand(*shape, dtype=torch.float16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES + ([torch.bfloat16] if DEVICE.type == "cpu" else []), ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (2, 3, 77, 80), (1, 2, 1025, 128), (1, 1, 5, 256)])
def test_quantize_matches_reference_exactly(shape, dtype):
    x = rand(*shape, dtype=dtype, seed=sum(shape), scale=3.0)
    x[..., 0, :] = 0  # an all-zero row keeps a positive scale and zero values
    x8, s = ops.quantize_fp8(x, backend="triton")
    r8, rs = quantize_fp8_reference(x)
    assert x8.dtype == FP8 and x8.is_contiguous() and s.dtype == torch.float32 and s.shape == shape[:3]
    assert torch.equal(s, rs)
    assert torch.equal(x8.float(), r8.float())
    assert (s > 0).all()
    # every row uses e4m3's full range, and dequantizes within half a step (2^-4 relative)
    row_max = x8.float().abs().amax(-1)
    assert torch.all((row_max == FP8_MAX) | (x.float().abs().amax(-1) == 0))
    err = (dequantize_fp8(x8, s, torch.float32) - x.float()).abs()
    assert torch.all(err <= x.float().abs() * 2**-4 + s.unsqueeze(-1) * 2**-9 + 1e-30)


def test_quantize_reads_strided_input():
    x = rand(2, 40, 3, 64, scale=2.0).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    a = ops.quantize_fp8(x, backend="triton")
    b = quantize_fp8_reference(x.contiguous())
    assert torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1])


def _fp8_segments(H, D, sizes, dtype, batch=1, seed=10):
    out = []
    for i, n in enumerate(sizes):
        k, v = rand(batch, H, n, D, dtype=dtype, seed=seed + 2 * i), rand(batch, H, n, D, dtype=dtype, seed=seed + 2 * i + 1)
        out.append(ops.quantize_kv(k, v, backend="triton"))
    return out


def _reference(q, k, v, extra, bias):
    # float64 attention over the values the fp8 segments stand for
    pairs = [e.dequantize(torch.float64) if isinstance(e, ops.Fp8KV) else e for e in extra]
    return attention_reference(q, k, v, pairs, bias)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,sizes,D", [(1, 1, (1,), 64), (77, 33, (77,), 80), (130, 64, (1025, 17), 128),
                                           (33, 20, (40, 7, 9), 64)])
def test_attention_over_fp8_segments(nq, nk, sizes, D, dtype):
    B, H = 2, 2
    q, k, v = (rand(B, H, n, D, dtype=dtype, seed=s) for n, s in ((nq, 1), (nk, 2), (nk, 3)))
    extra = _fp8_segments(H, D, sizes, dtype)
    bias = [0.3 * i - 0.2 for i in range(len(sizes))]
    out = ops.attention(q, k, v, extra_kv=extra, extra_bias=bias, backend="triton")
    ref = _reference(q, k, v, extra, bias)
    plain = [e.dequantize(dtype) for e in extra]
    pytorch = ops.attention(q, k, v, extra_kv=plain, extra_bias=bias, backend="sdpa")
    assert_within_pytorch_error(out, ref, pytorch, what=f"{dtype} fp8 segments")


def test_fp8_and_plain_segments_mix_and_chunk():
    # more segments than one launch takes, the later chunk led by fp8 ones only
    H, D = 2, 64
    q, k, v = (rand(1, H, n, D, seed=s) for n, s in ((50, 4), (30, 5), (30, 6)))
    fp8 = _fp8_segments(H, D, (20, 9, 33, 12, 8, 16), torch.float16, seed=30)
    extra = [(rand(1, H, 11, D, seed=60), rand(1, H, 11, D, seed=61))] + fp8
    bias = [0.0, 0.5, -0.5, 0.25, -math.inf, 0.0, 0.1]
    out = ops.attention(q, k, v, extra_kv=extra, extra_bias=bias, backend="triton")
    ref = _reference(q, k, v, extra, bias)
    plain = [e.dequantize(torch.float16) if isinstance(e, ops.Fp8KV) else e for e in extra]
    assert_within_pytorch_error(out, ref, ops.attention(q, k, v, extra_kv=plain, extra_bias=bias, backend="sdpa"))


def test_fp8_segment_matches_the_sdpa_path():
    q, k, v = (rand(2, 2, 20, 64, seed=s) for s in (7, 8, 9))
    extra = _fp8_segments(2, 64, (24,), torch.float16)
    a = ops.attention(q, k, v, extra_kv=extra, backend="triton")
    b = ops.attention(q, k, v, extra_kv=extra, backend="sdpa")
    assert (a.float() - b.float()).abs().max() <= 2e-3


def test_fp8_error_report():
    k, v, q = rand(1, 2, 64, 64, dtype=torch.float32, seed=1), rand(1, 2, 64, 64, dtype=torch.float32, seed=2), \
        rand(1, 2, 16, 64, dtype=torch.float32, seed=3)
    rep = ops.fp8_error(k, v, q)
    assert 0 < rep["k_rel_err"] <= 2**-4 and 0 < rep["v_rel_err"] <= 2**-4
    assert 0 < rep["attention_rel_err"] < 0.05
    assert rep["fp8_bytes"] < 0.3 * rep["bytes"]  # 1 byte + 4/D for scales vs 4 bytes


def test_bad_fp8_segments_raise():
    q, k, v = (rand(1, 2, 8, 64, seed=s) for s in (1, 2, 3))
    e = _fp8_segments(2, 64, (8,), torch.float16)[0]
    with pytest.raises(ValueError, match="key scales must be"):
        ops.attention(q, k, v, extra_kv=[ops.Fp8KV(e.k, e.v, e.k_scale[..., :4], e.v_scale)])
    with pytest.raises(ValueError, match="fp8 segments must be"):
        ops.attention(q, k, v, extra_kv=[ops.Fp8KV(e.k.half(), e.v, e.k_scale, e.v_scale)])
    with pytest.raises(ValueError, match="4-D floating-point"):
        ops.quantize_fp8(torch.ones(3, 4))


def test_opcheck_quantize_and_fp8_attention():
    x = rand(1, 2, 9, 64, dtype=torch.float32)
    out = torch.empty(x.shape, dtype=FP8, device=DEVICE)
    scale = torch.empty(x.shape[:3], device=DEVICE)
    # test_schema compares outputs by arithmetic PyTorch's CPU fp8 lacks; the rest runs
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastgen.quantize_fp8_triton.default, (x, out, scale), test_utils=utils)
    q, k, v = (rand(1, 2, 12, 64, dtype=torch.float32, seed=s) for s in (4, 5, 6))
    e = _fp8_segments(2, 64, (10,), torch.float32)[0]
    torch.library.opcheck(torch.ops.fastgen.attention_triton.default,
                          (q, k, v, [e.k], [e.v], [0.5], 0.125, [e.k_scale], [e.v_scale]), test_utils=utils)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_quantize_matches_reference_on_gpu(dtype):
    from fastgen._cuda import HAVE_CUDA_EXT

    if not HAVE_CUDA_EXT or not hasattr(torch.ops.fastgen_C, "quantize_fp8"):
        pytest.skip("fastgen._C is not built; bench/run_gpu.sh builds it")
    x = rand(2, 24, 1031, 128, dtype=dtype, scale=3.0).transpose(1, 2).contiguous().transpose(1, 2)
    a8, a = ops.quantize_fp8(x, backend="cuda")
    r8, r = quantize_fp8_reference(x)
    t8, t = ops.quantize_fp8(x, backend="triton")
    assert torch.equal(a, r) and torch.equal(a8.float(), r8.float())
    assert torch.equal(t, r) and torch.equal(t8.float(), r8.float())
