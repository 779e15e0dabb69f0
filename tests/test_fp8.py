"""fp8 K/V storage: the quantization kernel against its reference, and attention reading fp8
segments in place against a float64 reference over the dequantized values."""

from __future__ import annotations

import math

import pytest
import torch

import fastgen.ops as ops
from fastgen._cuda import cuda_ext_can_run_on
from fastgen.kernels import fp8 as K
from fastgen.kernels.attention import attention_reference
from fastgen.kernels.fp8 import FP8, FP8_MAX, dequantize_fp8, quantize_fp8_reference
from helpers import DEVICE, INT32_TOKENS, KernelRecorder, assert_within_pytorch_error

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e-2, 1e-4])
def test_small_values_keep_their_precision(magnitude, dtype):
    # The value scale of |v| ~ 1e-4 is ~2e-7: applied to the probabilities before their cast to
    # fp16 it underflowed (0.3 relative error where dequantize + SDPA has 7e-4). (On a CPU bf16 runs
    # in fp32 under the interpreter; a GPU runs it natively.)
    B, H, D = 1, 2, 64
    q = rand(B, H, 64, D, dtype=dtype, seed=1)
    k, v = rand(B, H, 32, D, dtype=dtype, seed=2), rand(B, H, 32, D, dtype=dtype, seed=3, scale=magnitude)
    e = ops.quantize_kv(rand(1, H, 96, D, dtype=dtype, seed=4, scale=magnitude),
                        rand(1, H, 96, D, dtype=dtype, seed=5, scale=magnitude), backend="torch")
    out = ops.attention(q, k, v, extra_kv=[e], backend="triton")
    ref = _reference(q, k, v, [e], [0.0])
    pytorch = ops.attention(q, k, v, extra_kv=[e.dequantize(dtype)], backend="sdpa")
    # compared at unit scale: the helper's absolute floor (meant for O(1) outputs) would hide this
    unit = [t.float() / magnitude for t in (out, ref, pytorch)]
    assert_within_pytorch_error(*unit, what=f"|v| ~ {magnitude}, relative")


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


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quantize_backends_match_reference_at_model_layout(dtype, backend):
    # A (B, S, H, D) projection seen as (B, H, S, D): Flux-sized on a GPU, small on a CPU. Only the
    # CUDA extension needs a GPU (and a build).
    reason = cuda_ext_can_run_on(DEVICE, "quantize_fp8") if backend == "cuda" else None
    if reason:
        pytest.skip(reason)
    B, H, N = (2, 24, 1031) if DEVICE.type == "cuda" else (2, 3, 37)
    x = rand(B, H, N, 128, dtype=dtype, scale=3.0).transpose(1, 2).contiguous().transpose(1, 2)
    x8, s = ops.quantize_fp8(x, backend=backend)
    r8, r = quantize_fp8_reference(x)
    assert torch.equal(s, r) and torch.equal(x8.float(), r8.float())


@pytest.mark.parametrize("tokens", [INT32_TOKENS - 1, INT32_TOKENS])
def test_int64_offsets_chosen_from_shapes_and_strides(monkeypatch, tokens):
    # meta tensors: a (B, S, H, D) view with H*D = 3072 reaches offset S * 3072 - 1; nothing allocated
    rec = KernelRecorder()
    monkeypatch.setattr(K, "_quantize_fp8_rows", rec)
    x = torch.empty(1, tokens, 24, 128, dtype=torch.float16, device="meta").transpose(1, 2)
    K.quantize_fp8_fwd(x, torch.empty(x.shape, dtype=FP8, device="meta"), torch.empty(x.shape[:3], device="meta"))
    assert rec.kwargs["INT64"] is (tokens * 3072 - 1 > 2**31 - 1)


def test_int64_variants_are_correct(monkeypatch):
    # the quantize kernel and attention over an fp8 segment, with the flag forced on at small shapes
    from fastgen.kernels import attention as A

    x = rand(2, 40, 3, 80, scale=2.0).transpose(1, 2)
    q, k, v = (rand(2, 2, n, 64, seed=s) for n, s in ((30, 7), (20, 8), (20, 9)))
    extra = _fp8_segments(2, 64, (24, 9), torch.float16)
    want = ops.quantize_fp8(x, backend="triton")
    want_out = ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.3, -0.2], backend="triton")
    monkeypatch.setattr(K, "needs_int64", lambda *t: True)
    monkeypatch.setattr(A, "needs_int64", lambda *t: True)
    got = ops.quantize_fp8(x, backend="triton")
    assert torch.equal(got[0].float(), want[0].float()) and torch.equal(got[1], want[1])
    assert torch.equal(ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.3, -0.2], backend="triton"), want_out)
