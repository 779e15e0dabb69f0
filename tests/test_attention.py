"""fastgen.ops.attention against a float64 reference, with tolerance relative to PyTorch's own
error in the same dtype. On a CPU the Triton kernel runs under the interpreter (conftest)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen import FastgenFallbackWarning
from fastgen.kernels import attention as A
from fastgen.kernels.attention import attention_reference, merge_partials
from helpers import DEVICE, INT32_TOKENS, QUICK, KernelRecorder, KernelSpy, assert_within_pytorch_error, max_err

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def rand(*shape, dtype=torch.float16, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEVICE, dtype)


def make(B, H, Nq, Nk, D, dtype, seed=0, segments=(), seg_batch=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(B, H, Nq, D, dtype=dtype, gen=g), rand(B, H, Nk, D, dtype=dtype, gen=g), rand(B, H, Nk, D, dtype=dtype, gen=g)
    extra = [(rand(seg_batch, H, n, D, dtype=dtype, gen=g), rand(seg_batch, H, n, D, dtype=dtype, gen=g)) for n in segments]
    return q, k, v, extra


def pytorch_same_dtype(q, k, v, extra=(), bias=()):
    """PyTorch's own answer in the inputs' dtype: concatenate, then SDPA with an additive mask."""
    return fastgen.ops.attention(q, k, v, extra_kv=list(extra), extra_bias=list(bias) or None, backend="sdpa")


def triton(q, k, v, **kw):
    return fastgen.ops.attention(q, k, v, backend="triton", **kw)


# --------------------------------------------------------------------------------------------
# Accuracy over shapes, head dims and dtypes
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (1, 77), (77, 1), (77, 77), (77, 1025), (1025, 77), (1025, 1025)]
if QUICK:
    SHAPES = [(1, 77), (77, 1025), (1025, 77)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [80, 128] if QUICK else [64, 80, 128])
@pytest.mark.parametrize("nq,nk", SHAPES)
def test_matches_reference(nq, nk, D, dtype):
    B, H = (2, 3) if nq * nk < 1025 * 77 else (1, 2)
    q, k, v, _ = make(B, H, nq, nk, D, dtype, seed=nq * 7 + nk + D)
    out = triton(q, k, v)
    ref, _ = attention_reference(q, k, v)
    assert out.dtype == dtype
    assert_within_pytorch_error(out, ref, pytorch_same_dtype(q, k, v))


@pytest.mark.slow
@pytest.mark.parametrize(
    "nq,nk,D,dtype",
    [(4097, 4097, 64, torch.float16), (1, 4097, 128, torch.float32), (4097, 77, 80, torch.float16), (77, 4097, 128, torch.float16)],
    ids=str,
)
def test_long_sequences(nq, nk, D, dtype):
    q, k, v, _ = make(1, 1, nq, nk, D, dtype, seed=3)
    out = triton(q, k, v)
    ref, _ = attention_reference(q, k, v)
    assert_within_pytorch_error(out, ref, pytorch_same_dtype(q, k, v))


@pytest.mark.parametrize("D", [32, 96, 256])
def test_other_head_dims(D):
    q, k, v, _ = make(1, 2, 70, 130, D, torch.float16, seed=D)
    out = triton(q, k, v)
    ref, _ = attention_reference(q, k, v)
    assert_within_pytorch_error(out, ref, pytorch_same_dtype(q, k, v))


def test_custom_scale():
    q, k, v, _ = make(1, 2, 50, 60, 64, torch.float32, seed=11)
    out = triton(q, k, v, scale=0.3)
    ref, _ = attention_reference(q, k, v, scale=0.3)
    assert_within_pytorch_error(out, ref, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_bf16_on_interpreter_or_gpu():
    # On a GPU the kernel runs bf16 natively; under the interpreter fastgen computes it in fp32.
    q, k, v, extra = make(1, 2, 90, 70, 64, torch.bfloat16, seed=5, segments=(33,))
    out = triton(q, k, v, extra_kv=extra, extra_bias=0.7)
    ref, _ = attention_reference(q, k, v, extra, [0.7])
    assert out.dtype == torch.bfloat16
    assert_within_pytorch_error(out, ref, pytorch_same_dtype(q, k, v, extra, [0.7]))


# --------------------------------------------------------------------------------------------
# Cached segments, biases, broadcast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lengths", [(1,), (33, 1), (17, 64, 5, 129), (9, 20, 3, 40, 77), (8, 1, 30, 2, 61, 7, 16)], ids=str)
def test_segments_equal_concatenation(lengths, dtype):
    q, k, v, extra = make(2, 2, 97, 45, 64, dtype, seed=len(lengths), segments=lengths, seg_batch=2)
    out = triton(q, k, v, extra_kv=extra)
    kk = torch.cat([k] + [e[0] for e in extra], dim=2)
    vv = torch.cat([v] + [e[1] for e in extra], dim=2)
    concat = triton(q, kk, vv)
    ref, _ = attention_reference(q, kk, vv)
    pt = F.scaled_dot_product_attention(q, kk, vv)
    assert_within_pytorch_error(out, ref, pt, what="segments")
    assert_within_pytorch_error(concat, ref, pt, what="concatenated")
    assert max_err(out, concat) <= 2 * max_err(pt, ref) + 2e-5


@pytest.mark.parametrize("bias", [0.5, -2.0, [math.log(3.0), -0.25]], ids=str)
def test_segment_bias(bias):
    q, k, v, extra = make(2, 2, 61, 50, 64, torch.float16, seed=7, segments=(40, 23))
    biases = bias if isinstance(bias, list) else [bias, bias]
    out = triton(q, k, v, extra_kv=extra, extra_bias=bias)
    ref, _ = attention_reference(q, k, v, extra, biases)
    assert_within_pytorch_error(out, ref, pytorch_same_dtype(q, k, v, extra, biases))
    # the bias must matter: the unbiased answer is far from the biased one
    assert max_err(out, triton(q, k, v, extra_kv=extra)) > 1e-2


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_neg_inf_bias_drops_segment(backend):
    q, k, v, extra = make(1, 2, 40, 30, 64, torch.float32, seed=9, segments=(20, 25))
    out = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.0, -math.inf], backend=backend)
    without = fastgen.ops.attention(q, k, v, extra_kv=extra[:1], backend=backend)
    torch.testing.assert_close(out, without, rtol=0, atol=1e-6)


def test_broadcast_segments_equal_materialised():
    # One cached condition (batch 1) serving a CFG pair (batch 2) reads exactly what a copy would.
    q, k, v, extra = make(2, 2, 70, 35, 64, torch.float16, seed=13, segments=(50, 19))
    out = triton(q, k, v, extra_kv=extra, extra_bias=[0.3, -0.1])
    copied = [(a.expand(2, -1, -1, -1).contiguous(), b.expand(2, -1, -1, -1).contiguous()) for a, b in extra]
    assert torch.equal(out, triton(q, k, v, extra_kv=copied, extra_bias=[0.3, -0.1]))
    # main k/v may broadcast too
    k1, v1 = k[:1], v[:1]
    assert torch.equal(triton(q, k1, v1), triton(q, k1.expand(2, -1, -1, -1).contiguous(), v1.expand(2, -1, -1, -1).contiguous()))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(21)
    B, H, N, D = 2, 3, 83, 64
    q = rand(B, N, H, D, gen=g).transpose(1, 2)  # (B, S, H, D) projection output, read in place
    k = rand(B, H, 2 * N, D, gen=g)[:, :, ::2]  # every other token
    v = rand(B, H, D, N, gen=g).transpose(-1, -2)  # D not the fastest dim
    ck = rand(1, H, 40, 2 * D, gen=g)[..., D:]  # a slice of a wider cache
    cv = rand(1, H, 40, D, gen=g)
    for t in (q, k, v, ck):
        assert not t.is_contiguous()
    out = triton(q, k, v, extra_kv=[(ck, cv)])
    dense = triton(q.contiguous(), k.contiguous(), v.contiguous(), extra_kv=[(ck.contiguous(), cv)])
    assert torch.equal(out, dense)
    assert out.stride() == q.stride(), "output should keep q's memory layout"
    ref, _ = attention_reference(q, k, v, [(ck, cv)], [0.0])
    assert_within_pytorch_error(out, ref, pytorch_same_dtype(q, k, v, [(ck, cv)]))


def test_more_segments_than_one_launch_merge_exactly():
    # 7 segments: more than MAX_EXTRA, so partial results merge through the LSE.
    q, k, v, extra = make(1, 2, 33, 20, 64, torch.float32, seed=17, segments=(5, 6, 7, 8, 9, 10, 11))
    bias = [0.1 * i for i in range(7)]
    out, lse = triton(q, k, v, extra_kv=extra, extra_bias=bias, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, extra, bias)
    assert_within_pytorch_error(out, ref, pytorch_same_dtype(q, k, v, extra, bias))
    assert max_err(lse, ref_lse) < 1e-5


# --------------------------------------------------------------------------------------------
# LSE and merging
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_lse_matches_reference(backend):
    q, k, v, extra = make(2, 2, 77, 64, 80, torch.float16, seed=23, segments=(31,))
    out, lse = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=0.4, backend=backend, return_lse=True)
    _, ref_lse = attention_reference(q, k, v, extra, [0.4])
    assert lse.shape == (2, 2, 77) and lse.dtype == torch.float32
    # q, k are exact in fp16 and products accumulate in fp32; only the fp16 bias mask of sdpa rounds
    assert max_err(lse, ref_lse) < 2e-3


def test_merge_partials_equals_full_attention():
    q, k, v, _ = make(2, 2, 65, 150, 64, torch.float32, seed=29)
    o1, l1 = triton(q, k[:, :, :70], v[:, :, :70], return_lse=True)
    o2, l2 = triton(q, k[:, :, 70:], v[:, :, 70:], return_lse=True)
    merged, lse = merge_partials([o1, o2], [l1, l2])
    ref, ref_lse = attention_reference(q, k, v)
    assert_within_pytorch_error(merged, ref, F.scaled_dot_product_attention(q, k, v))
    assert max_err(lse, ref_lse) < 1e-5


def test_merge_partials_with_an_empty_part_and_nan():
    q, k, v, _ = make(1, 2, 20, 30, 64, torch.float32, seed=30)
    o1, l1 = triton(q, k, v, return_lse=True)
    o0, l0 = triton(q, k[:, :, :0], v[:, :, :0], return_lse=True)  # no keys: out 0, lse -inf
    merged, lse = merge_partials([o0, o1], [l0, l1])
    assert torch.equal(merged, o1) and torch.equal(lse, l1), "an empty part must weigh exactly 0"
    both, lse0 = merge_partials([o0, o0], [l0, l0])
    assert torch.equal(both, torch.zeros_like(o0)) and torch.isneginf(lse0).all()
    l1[0, 1, 3] = float("nan")  # a NaN row (NaN inputs) stays NaN: only -inf parts are zeroed
    merged, _ = merge_partials([o0, o1], [l0, l1])
    assert merged[0, 1, 3].isnan().all() and not merged[0, 1, 4].isnan().any()


# --------------------------------------------------------------------------------------------
# Rows with no admissible key: PyTorch's convention on every backend
# --------------------------------------------------------------------------------------------


def _pytorch_fully_masked(q, v):
    # What PyTorch itself gives a query row whose every key is masked out (torch >= 2.5: zeros)
    n = max(1, v.shape[2])
    kk = torch.zeros(q.shape[0], q.shape[1], n, q.shape[3], dtype=q.dtype, device=q.device)
    mask = torch.zeros(q.shape[2], n, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, kk, kk, attn_mask=mask)


@pytest.mark.parametrize("case", ["no keys", "all dropped", "empty and dropped", "many dropped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_with_no_admissible_key_follow_pytorch(case, dtype):
    q, k, v, extra = make(2, 2, 37, 0, 64, dtype, seed=71, segments=(9, 0, 5, 7, 3, 8))
    extra = {"no keys": [], "all dropped": extra[:1], "empty and dropped": extra[:3], "many dropped": extra}[case]
    bias = [-math.inf if e[0].shape[2] else 0.0 for e in extra]
    pytorch = _pytorch_fully_masked(q, v)
    assert torch.equal(pytorch, torch.zeros_like(pytorch)), "PyTorch's convention changed: revisit the docstrings"
    ref, ref_lse = attention_reference(q, k, v, extra, bias)
    for backend in ("triton", "sdpa"):
        out, lse = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=bias, backend=backend, return_lse=True)
        assert out.dtype == dtype and torch.equal(out, pytorch), f"{backend}: out of a row with no key"
        assert lse.dtype == torch.float32 and torch.isneginf(lse).all(), f"{backend}: lse of a row with no key"
    assert torch.equal(ref, torch.zeros_like(ref)) and torch.isneginf(ref_lse).all()


def test_dropped_segments_beside_live_keys_are_exact():
    # Kept keys in one launch, dropped ones in more than MAX_EXTRA segments: the same as without them.
    q, k, v, extra = make(1, 2, 30, 20, 64, torch.float32, seed=73, segments=(4, 5, 6, 7, 8, 9))
    bias = [-math.inf, 0.3, -math.inf, -math.inf, -math.inf, -math.inf]
    out, lse = triton(q, k, v, extra_kv=extra, extra_bias=bias, return_lse=True)
    want, want_lse = triton(q, k, v, extra_kv=extra[1:2], extra_bias=[0.3], return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


# --------------------------------------------------------------------------------------------
# 64-bit offsets past 2**31 elements
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["q", "segment"])
@pytest.mark.parametrize("tokens", [INT32_TOKENS - 1, INT32_TOKENS])
def test_int64_offsets_chosen_from_shapes_and_strides(monkeypatch, tokens, where):
    # A (B, S, H, D) view with H*D = 3072 at ~700k tokens (long video), on the meta device: the
    # launcher decides without anything allocated. The last element sits at offset S * 3072 - 1.
    def view(n):
        return torch.empty(1, n, 24, 128, dtype=torch.float16, device="meta").transpose(1, 2)

    rec = KernelRecorder()
    monkeypatch.setattr(A, "_attn_fwd", rec)
    small = view(64)
    if where == "q":
        A.attention_fwd(view(tokens), small, small)
    else:
        A.attention_fwd(small, small, small, [view(tokens)], [view(tokens)], [0.0])
    assert rec.kwargs["INT64"] is (tokens * 3072 - 1 > 2**31 - 1)


def test_int64_variant_is_correct(monkeypatch):
    # The flag only widens the index arithmetic: forced on at a small shape, the same result.
    g = torch.Generator().manual_seed(79)
    q = rand(2, 45, 2, 64, gen=g).transpose(1, 2)
    k, v = rand(2, 2, 30, 64, gen=g), rand(2, 2, 30, 64, gen=g)
    extra = [(rand(1, 2, n, 64, gen=g), rand(1, 2, n, 64, gen=g)) for n in (17, 40)]
    want, want_lse = triton(q, k, v, extra_kv=extra, extra_bias=[0.2, -0.4], return_lse=True)
    monkeypatch.setattr(A, "needs_int64", lambda *t: True)
    spy = KernelSpy(A._attn_fwd)
    monkeypatch.setattr(A, "_attn_fwd", spy)
    out, lse = triton(q, k, v, extra_kv=extra, extra_bias=[0.2, -0.4], return_lse=True)
    assert [kw["INT64"] for kw in spy.launches] == [True]
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


# --------------------------------------------------------------------------------------------
# Every element written; NaN and inf as in the reference
# --------------------------------------------------------------------------------------------


def test_poisoned_outputs_are_overwritten(monkeypatch):
    q, k, v, extra = make(2, 2, 130, 70, 80, torch.float16, seed=31, segments=(45,))
    clean, clean_lse = triton(q, k, v, extra_kv=extra, return_lse=True)
    real_empty_like, real_empty = torch.empty_like, torch.empty

    def poisoned_like(*a, **kw):
        return real_empty_like(*a, **kw).fill_(float("nan"))

    def poisoned(*a, **kw):
        return real_empty(*a, **kw).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty_like", poisoned_like)
    monkeypatch.setattr(torch, "empty", poisoned)
    out, lse = triton(q, k, v, extra_kv=extra, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("where", ["q", "k", "v", "k_segment", "q_inf"])
def test_nan_and_inf_propagate_like_reference(where):
    q, k, v, extra = make(1, 2, 40, 50, 64, torch.float32, seed=37, segments=(20,))
    if where == "q":
        q[0, 1, 5, 3] = float("nan")
    elif where == "k":
        k[0, 0, 7, 0] = float("nan")
    elif where == "v":
        v[0, 1, 9, 2] = float("nan")
    elif where == "k_segment":
        extra[0][0][0, 0, 3, 1] = float("nan")
    else:
        q[0, 0, 2, 0] = float("inf")
    out = triton(q, k, v, extra_kv=extra)
    ref, _ = attention_reference(q, k, v, extra, [0.0])
    assert ref.isnan().any(), "the case must poison the reference"
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN pattern differs for {where}"
    ok = ~ref.isnan()
    assert max_err(out[ok], ref[ok]) < 1e-5


# --------------------------------------------------------------------------------------------
# Input validation, backends, fallbacks
# --------------------------------------------------------------------------------------------


def _bad_inputs():
    q, k, v, extra = make(2, 2, 8, 6, 64, torch.float32, seed=1, segments=(4,))
    meta = torch.empty(2, 2, 6, 64, device="meta")
    return [
        ("rank", lambda: fastgen.ops.attention(q[0], k, v), "4-D"),
        ("heads", lambda: fastgen.ops.attention(q, k[:, :1], v[:, :1]), "expected"),
        ("head dim", lambda: fastgen.ops.attention(q, k[..., :32], v[..., :32]), "expected"),
        ("batch", lambda: fastgen.ops.attention(q, torch.cat([k, k, k]), torch.cat([v, v, v])), "expected"),
        ("kv mismatch", lambda: fastgen.ops.attention(q, k, v[:, :, :3]), "does not match"),
        ("device", lambda: fastgen.ops.attention(q, meta, meta), "device"),
        ("dtype", lambda: fastgen.ops.attention(q, k.half(), v.half()), "dtype"),
        ("segment shape", lambda: fastgen.ops.attention(q, k, v, extra_kv=[(extra[0][0][..., :3], extra[0][1])]), "extra_kv[0]"),
        ("segment not pair", lambda: fastgen.ops.attention(q, k, v, extra_kv=[extra[0][0]]), "pair"),
        ("bare pair", lambda: fastgen.ops.attention(q, k, v, extra_kv=extra[0]), "list of"),
        ("bias count", lambda: fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=[1.0, 2.0]), "entries"),
        ("nan bias", lambda: fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=float("nan")), "finite"),
        ("inf bias", lambda: fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=float("inf")), "finite"),
        ("backend", lambda: fastgen.ops.attention(q, k, v, backend="flash9"), "backend must be one of"),
        ("scale", lambda: fastgen.ops.attention(q, k, v, scale=float("nan")), "scale"),
        ("bias rank", lambda: fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=torch.zeros(1, 1)),
         "0-d tensor"),
        ("bias string", lambda: fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias="0.5"), "0-d tensor"),
        ("batch of 1", lambda: fastgen.ops.attention(q[:1], k[:, :1], v[:, :1]), "expected (1, 2, N, 64)"),
        ("integer", lambda: fastgen.ops.attention(q.long(), k.long(), v.long()), "floating-point"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises_clear_error(case):
    _, call, match = _bad_inputs()[case]
    with pytest.raises(ValueError, match=re.escape(match)):
        call()


def test_extra_bias_as_tensor():
    q, k, v, extra = make(2, 2, 20, 16, 64, torch.float32, seed=83, segments=(8, 12))
    want = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=0.5, backend="triton")
    assert torch.equal(fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=torch.tensor(0.5), backend="triton"), want)
    per = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=[0.5, -1.0], backend="triton")
    assert torch.equal(fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=torch.tensor([0.5, -1.0]),
                                             backend="triton"), per)
    assert max_err(per, want) > 1e-3


def test_empty_queries():
    q, k, v, _ = make(1, 2, 0, 10, 64, torch.float16)
    assert triton(q, k, v).shape == (1, 2, 0, 64)


@pytest.mark.parametrize("backend", ["cuda", "xformers"])
def test_unavailable_backend_falls_back_with_one_warning(backend):
    q, k, v, extra = make(1, 2, 30, 20, 64, torch.float32, seed=41, segments=(10,))
    with pytest.warns(FastgenFallbackWarning, match=backend) as rec:
        out = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=0.5, backend=backend)
        out2 = fastgen.ops.attention(q, k, v, extra_kv=extra, extra_bias=0.5, backend=backend)
    assert len([w for w in rec if issubclass(w.category, FastgenFallbackWarning)]) == 1
    ref, _ = attention_reference(q, k, v, extra, [0.5])
    assert max_err(out, ref) < 1e-5 and torch.equal(out, out2)


def test_requires_grad_falls_back_to_differentiable_path():
    q, k, v, _ = make(1, 2, 20, 20, 64, torch.float32, seed=43)
    q.requires_grad_(True)
    with pytest.warns(FastgenFallbackWarning, match="forward-only"):
        out = fastgen.ops.attention(q, k, v, backend="triton")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_auto_without_autotuning_follows_the_fixed_table(monkeypatch):
    # tests/conftest.py sets FASTGEN_AUTOTUNE=0: "auto" is the fixed table of static_choice.
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "0")
    q, k, v, extra = make(1, 2, 64, 20, 64, torch.float16, seed=47, segments=(7,))
    want = "triton" if DEVICE.type == "cuda" else "sdpa"  # segments on a GPU: read in place
    auto = fastgen.ops.attention(q, k, v, extra_kv=extra)
    assert torch.equal(auto, fastgen.ops.attention(q, k, v, extra_kv=extra, backend=want))
    # no segment, or fp32: PyTorch's SDPA everywhere
    assert torch.equal(fastgen.ops.attention(q, k, v), fastgen.ops.attention(q, k, v, backend="sdpa"))
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert torch.equal(fastgen.ops.attention(q32, k32, v32, extra_kv=[tuple(t.float() for t in extra[0])]),
                       fastgen.ops.attention(q32, k32, v32, extra_kv=[tuple(t.float() for t in extra[0])], backend="sdpa"))


# --------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, torch.export
# --------------------------------------------------------------------------------------------


def test_opcheck():
    q, k, v, extra = make(2, 2, 33, 20, 64, torch.float32, seed=53, segments=(9,))
    op = torch.ops.fastgen.attention_triton.default
    torch.library.opcheck(op, (q, k, v, [], [], [], 0.125, [], []))
    torch.library.opcheck(op, (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, [extra[0][0]], [extra[0][1]], [0.5],
                               0.125, [None], [None]))


class _Attn(torch.nn.Module):
    def forward(self, q, k, v, ck, cv):
        return fastgen.ops.attention(q, k, v, extra_kv=[(ck, cv)], extra_bias=0.25, backend="triton") * 2


@pytest.mark.slow
def test_torch_compile_fullgraph():
    q, k, v, extra = make(1, 2, 40, 24, 64, torch.float32, seed=59, segments=(16,))
    eager = _Attn()(q, k, v, *extra[0])
    compiled = torch.compile(_Attn(), fullgraph=True)(q, k, v, *extra[0])
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_torch_export_sees_the_op():
    q, k, v, extra = make(1, 2, 40, 24, 64, torch.float32, seed=61, segments=(16,))
    ep = torch.export.export(_Attn(), (q, k, v, *extra[0]))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fastgen.attention_triton.default" in targets
    torch.testing.assert_close(ep.module()(q, k, v, *extra[0]), _Attn()(q, k, v, *extra[0]), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Model-sized on a GPU; the same body at small sizes under the interpreter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_flux_shaped_with_cached_condition(dtype):
    # Flux-dev 1024^2 on a GPU: 4608 fresh tokens + a cached 1024-token condition, 24 heads of 128,
    # CFG batch. A CPU runs the same layout at a size the interpreter takes in a second.
    B, H, n, n_cond = (2, 24, 4608, 1024) if DEVICE.type == "cuda" else (2, 2, 200, 72)
    q, k, v, extra = make(B, H, n, n, 128, dtype, seed=67, segments=(n_cond,))
    out = triton(q, k, v, extra_kv=extra, extra_bias=math.log(1.5))
    kk = torch.cat([k, extra[0][0].expand(B, -1, -1, -1)], 2)
    vv = torch.cat([v, extra[0][1].expand(B, -1, -1, -1)], 2)
    mask = torch.cat([torch.zeros(n), torch.full((n_cond,), math.log(1.5))]).to(DEVICE)[None]  # (1, Nk)
    ref = F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=mask)
    pt = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask.to(dtype))
    assert_within_pytorch_error(out, ref, pt)
