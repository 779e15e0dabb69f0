"""fastgen.ops.qk_norm_rope (fused RMS-norm + RoPE) against a float64 reference and against
diffusers' own modules, with tolerance relative to the unfused PyTorch sequence's error."""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

import fastgen
from fastgen import FastgenFallbackWarning
from fastgen._cuda import HAVE_CUDA_EXT, cuda_ext_can_run_on
from fastgen.kernels import qk_norm_rope as K
from fastgen.kernels.qk_norm_rope import qk_norm_rope_reference
from fastgen.ops import prologue as P
from helpers import DEVICE, INT32_TOKENS, KernelRecorder, assert_within_pytorch_error, max_err

ROOT = Path(__file__).resolve().parents[1]
# bf16 runs under the interpreter too: fastgen computes it in fp32 there (bf16 loads are wrong in it).
DTYPES = [torch.float16, torch.float32, torch.bfloat16]
KERNEL_BACKENDS = ["triton", "cuda"] if HAVE_CUDA_EXT and DEVICE.type == "cuda" else ["triton"]


def inputs(B, S, H, D, dtype, norm, rope, s_rope=None, seed=0, table="half"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = (torch.randn(B, S, H, D, generator=g) * 3).to(DEVICE, dtype).transpose(1, 2)
    wd = D if norm == "head" else H * D
    w = [(torch.rand(wd, generator=g) + 0.5).to(DEVICE, dtype) for _ in range(2)] if norm else [None, None]
    s_rope = S if s_rope is None else s_rope
    ang = torch.rand(s_rope, D // 2, generator=g) * 6.28
    cos, sin = ang.cos().to(DEVICE), ang.sin().to(DEVICE)
    if table == "full":  # diffusers' (S, D) tables: each frequency repeated for its pair
        if rope == "interleaved":
            cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        else:
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return dict(q=q, k=k, q_weight=w[0], k_weight=w[1], cos=cos if rope else None, sin=sin if rope else None,
                norm=norm, rope=rope)


def refs(kw, eps=1e-6):
    cos, sin = kw["cos"], kw["sin"]
    D = kw["q"].shape[-1]
    if cos is not None and cos.shape[-1] == D:
        sl = slice(0, D, 2) if kw["rope"] == "interleaved" else slice(0, D // 2)
        cos, sin = cos[:, sl], sin[:, sl]
    return (qk_norm_rope_reference(kw["q"], kw["q_weight"], cos, sin, eps, kw["norm"], kw["rope"]),
            qk_norm_rope_reference(kw["k"], kw["k_weight"], cos, sin, eps, kw["norm"], kw["rope"]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["head", "all", None])
@pytest.mark.parametrize("rope", ["interleaved", "half", None])
def test_matches_reference(rope, norm, dtype, backend):
    # a seed per case that is the same in every process (hash() of strings is salted per process)
    kw = inputs(2, 13, 3, 80, dtype, norm, rope, seed=zlib.crc32(f"{rope}-{norm}".encode()) % 1000)
    oq, ok = fastgen.ops.qk_norm_rope(**kw, backend=backend)
    tq, tk = fastgen.ops.qk_norm_rope(**kw, backend="torch")
    rq, rk = refs(kw)
    assert oq.shape == kw["q"].shape and oq.dtype == dtype
    assert oq.transpose(1, 2).is_contiguous(), "outputs are laid out (B, S, H, D), viewed as (B, H, S, D)"
    assert_within_pytorch_error(oq, rq, tq, what="q")
    assert_within_pytorch_error(ok, rk, tk, what="k")


@pytest.mark.parametrize("D", [64, 128])
def test_head_dims_and_partial_rope(D):
    # HunyuanVideo rotates only the leading image tokens; trailing text tokens are only normalised.
    kw = inputs(1, 19, 2, D, torch.float16, "head", "interleaved", s_rope=11, seed=D)
    oq, ok = fastgen.ops.qk_norm_rope(**kw, backend="triton")
    rq, rk = refs(kw)
    tq, tk = fastgen.ops.qk_norm_rope(**kw, backend="torch")
    assert_within_pytorch_error(oq, rq, tq)
    assert_within_pytorch_error(ok, rk, tk)


@pytest.mark.parametrize("rope", ["interleaved", "half"])
def test_full_tables_equal_half_tables(rope):
    full = inputs(1, 9, 2, 64, torch.float32, "head", rope, seed=3, table="full")
    half = inputs(1, 9, 2, 64, torch.float32, "head", rope, seed=3, table="half")
    a = fastgen.ops.qk_norm_rope(**full, backend="triton")
    b = fastgen.ops.qk_norm_rope(**half, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_strided_inputs_equal_contiguous():
    kw = inputs(2, 11, 3, 64, torch.float16, "all", "half", seed=5)
    assert not kw["q"].is_contiguous()
    dense = dict(kw, q=kw["q"].contiguous(), k=kw["k"].contiguous())
    a = fastgen.ops.qk_norm_rope(**kw, backend="triton")
    b = fastgen.ops.qk_norm_rope(**dense, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_out_writes_into_slices_of_a_joint_buffer():
    # Flux: text and image tokens are normalised with different weights into one joint query buffer.
    txt = inputs(2, 5, 3, 64, torch.float16, "head", "interleaved", seed=31)
    img = inputs(2, 9, 3, 64, torch.float16, "head", "interleaved", seed=32)
    joint_q = torch.full((2, 14, 3, 64), float("nan"), dtype=torch.float16, device=DEVICE).transpose(1, 2)
    joint_k = torch.full_like(joint_q, float("nan"))
    for part, sl in ((txt, slice(0, 5)), (img, slice(5, 14))):
        got = fastgen.ops.qk_norm_rope(**part, backend="triton", out=(joint_q[:, :, sl], joint_k[:, :, sl]))
        assert got[0].data_ptr() == joint_q[:, :, sl].data_ptr()
    for part, sl in ((txt, slice(0, 5)), (img, slice(5, 14))):
        alone = fastgen.ops.qk_norm_rope(**part, backend="triton")
        assert torch.equal(joint_q[:, :, sl], alone[0]) and torch.equal(joint_k[:, :, sl], alone[1])
    with pytest.raises(ValueError, match="out_q must be"):
        fastgen.ops.qk_norm_rope(**txt, out=(joint_q, joint_k))


def test_poisoned_outputs_are_overwritten(monkeypatch):
    kw = inputs(1, 7, 3, 64, torch.float16, "head", "interleaved", seed=7)
    clean = fastgen.ops.qk_norm_rope(**kw, backend="triton")
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    out = fastgen.ops.qk_norm_rope(**kw, backend="triton")
    assert torch.equal(out[0], clean[0]) and torch.equal(out[1], clean[1])


# --------------------------------------------------------------------------------------------
# In place and other aliasing of out with the inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("norm", ["head", "all", None])
@pytest.mark.parametrize("rope,D", [("half", 64), ("half", 80), ("half", 16), ("interleaved", 64), (None, 64)])
def test_in_place_equals_out_of_place(rope, D, norm, backend):
    # "half" pairs (i, i + D/2) span more than one 32-lane pass for D > 32: the case the CUDA kernel
    # got wrong in place (it read partners it had already rotated).
    kw = inputs(2, 5, 3, D, torch.float32, norm, rope, s_rope=4, seed=D)
    want = fastgen.ops.qk_norm_rope(**kw, backend=backend)
    q, k = kw["q"].clone(), kw["k"].clone()
    assert not P._needs_temporaries(q, k, (q, k)), "in place runs directly, without temporaries"
    got = fastgen.ops.qk_norm_rope(**dict(kw, q=q, k=k), backend=backend, out=(q, k))
    assert got[0] is q and got[1] is k
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["swapped", "shifted", "fused qkv"])
def test_outputs_overlapping_inputs_are_correct(case, backend):
    kw = inputs(1, 6, 2, 64, torch.float16, "head", "half", seed=43)
    want = fastgen.ops.qk_norm_rope(**kw, backend=backend)
    if case == "fused qkv":
        # q and k slices of one (B, S, 3, H, D) projection interleave in memory but share nothing:
        # in place over them needs no temporaries
        qkv = torch.stack([kw["q"].transpose(1, 2), kw["k"].transpose(1, 2), kw["k"].transpose(1, 2)], dim=2)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        out, temporaries = (q, k), False
    elif case == "swapped":  # out_q over k and out_k over q
        q, k = kw["q"].clone(), kw["k"].clone()
        out, temporaries = (k, q), True
    else:  # out_q one token further along q's own buffer
        buf = torch.cat([kw["q"], kw["q"][:, :, :1]], dim=2)
        q, k = buf[:, :, :-1], kw["k"].clone()
        out, temporaries = (buf[:, :, 1:], k), True
    assert P._needs_temporaries(q, k, out) is temporaries
    got = fastgen.ops.qk_norm_rope(**dict(kw, q=q, k=k), backend=backend, out=out)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_swapped_outputs_with_nothing_to_do(backend):
    # norm and rope None: the PyTorch path returns q and k themselves, which must not be overwritten
    # before they are read
    kw = inputs(1, 4, 2, 16, torch.float32, None, None, seed=49)
    q, k = kw["q"].clone(), kw["k"].clone()
    fastgen.ops.qk_norm_rope(**dict(kw, q=q, k=k), backend=backend, out=(k, q))
    assert torch.equal(k, kw["q"]) and torch.equal(q, kw["k"])


def test_overlapping_outputs_raise():
    kw = inputs(1, 4, 2, 16, torch.float32, "head", "interleaved", seed=47)
    with pytest.raises(ValueError, match="out_q and out_k overlap"):
        fastgen.ops.qk_norm_rope(**kw, out=(kw["q"], kw["q"]))
    with pytest.raises(ValueError, match="out_q and out_k overlap"):  # in place over q passed as k too
        fastgen.ops.qk_norm_rope(**dict(kw, k=kw["q"]), out=(kw["q"], kw["q"]))


def test_triton_in_place_flag_follows_the_outputs(monkeypatch):
    kw = inputs(1, 4, 2, 16, torch.float32, "head", "half", seed=53)
    rec = KernelRecorder()
    monkeypatch.setattr(K, "_qk_norm_rope_fwd", rec)
    fastgen.ops.qk_norm_rope(**kw, backend="triton")
    assert rec.kwargs["IN_PLACE"] is False
    fastgen.ops.qk_norm_rope(**kw, backend="triton", out=(kw["q"], kw["k"]))
    assert rec.kwargs["IN_PLACE"] is True


# --------------------------------------------------------------------------------------------
# 64-bit offsets past 2**31 elements
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
@pytest.mark.parametrize("tokens", [INT32_TOKENS - 1, INT32_TOKENS])
def test_int64_offsets_chosen_from_shapes_and_strides(monkeypatch, tokens, layout):
    # meta tensors: the launcher decides from shapes and strides, nothing is allocated. H*D = 3072,
    # so either layout reaches offset S * 3072 - 1.
    def make(n):
        if layout == "BSHD":
            return torch.empty(1, n, 24, 128, dtype=torch.float16, device="meta").transpose(1, 2)
        return torch.empty(1, 24, n, 128, dtype=torch.float16, device="meta")

    rec = KernelRecorder()
    monkeypatch.setattr(K, "_qk_norm_rope_fwd", rec)
    q, k = make(tokens), make(tokens)
    cos = torch.empty(tokens, 64, device="meta")
    K.qk_norm_rope_fwd(q, k, None, None, cos, cos, 1e-6, "head", "interleaved", make(tokens), make(tokens))
    assert rec.kwargs["INT64"] is (tokens * 3072 - 1 > 2**31 - 1)


@pytest.mark.parametrize("rope", ["interleaved", "half"])
def test_int64_variant_is_correct(monkeypatch, rope):
    kw = inputs(2, 7, 3, 64, torch.float16, "all", rope, s_rope=5, seed=59)
    want = fastgen.ops.qk_norm_rope(**kw, backend="triton")
    monkeypatch.setattr(K, "needs_int64", lambda *t: True)
    got = fastgen.ops.qk_norm_rope(**kw, backend="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------------------------
# Same conventions as diffusers' own modules
# --------------------------------------------------------------------------------------------


def test_torch_path_equals_diffusers_flux_sequence():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    B, S, H, D = 2, 10, 3, 64
    kw = inputs(B, S, H, D, torch.float16, "head", "interleaved", seed=11, table="full")
    out = fastgen.ops.qk_norm_rope(**kw, backend="torch")
    for x, w, o in ((kw["q"], kw["q_weight"], out[0]), (kw["k"], kw["k_weight"], out[1])):
        norm = RMSNorm(D, eps=1e-6).to(DEVICE, torch.float16)
        norm.weight.data.copy_(w)
        y = norm(x.transpose(1, 2))  # diffusers works on (B, S, H, D)
        y = apply_rotary_emb(y, (kw["cos"], kw["sin"]), sequence_dim=1)
        assert torch.equal(o, y.transpose(1, 2).contiguous())


def test_torch_path_equals_diffusers_half_rope():
    from diffusers.models.embeddings import apply_rotary_emb

    kw = inputs(1, 8, 2, 32, torch.float32, None, "half", seed=13, table="full")
    out = fastgen.ops.qk_norm_rope(**kw, backend="torch")
    ref = apply_rotary_emb(kw["q"], (kw["cos"], kw["sin"]), use_real_unbind_dim=-2, sequence_dim=2)
    assert torch.equal(out[0], ref.contiguous())


def test_kernel_matches_wan_attention_prologue():
    # Wan: torch.nn.RMSNorm over all heads, then its own interleaved RoPE from (S, D) tables.
    B, S, H, D = 1, 12, 2, 32
    g = torch.Generator().manual_seed(17)
    xq = torch.randn(B, S, H * D, generator=g).to(DEVICE)
    norm = torch.nn.RMSNorm(H * D, eps=1e-6).to(DEVICE)
    norm.weight.data.copy_(torch.rand(H * D, generator=g) + 0.5)
    freqs = torch.rand(S, D // 2, generator=g) * 6.28
    fcos = freqs.cos().repeat_interleave(2, -1).to(DEVICE)
    fsin = freqs.sin().repeat_interleave(2, -1).to(DEVICE)

    y = norm(xq).unflatten(2, (H, -1))  # (B, S, H, D)
    x1, x2 = y.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = fcos[None, :, None, 0::2], fsin[None, :, None, 1::2]
    wan = torch.empty_like(y)
    wan[..., 0::2] = x1 * c - x2 * s
    wan[..., 1::2] = x1 * s + x2 * c

    q = xq.unflatten(2, (H, D)).transpose(1, 2)
    out, _ = fastgen.ops.qk_norm_rope(q, q, q_weight=norm.weight.detach(), k_weight=norm.weight.detach(),
                                      cos=fcos[:, 0::2], sin=fsin[:, 1::2], norm="all", rope="interleaved", backend="triton")
    torch.testing.assert_close(out, wan.transpose(1, 2), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Validation, fallbacks, custom op
# --------------------------------------------------------------------------------------------


def _bad():
    kw = inputs(1, 6, 2, 16, torch.float32, "head", "interleaved", seed=1)
    return [
        ("rank", dict(kw, q=kw["q"][0]), "4-D"),
        ("shape", dict(kw, k=kw["k"][:, :, :3]), "share shape"),
        ("norm", dict(kw, norm="layer"), "norm must be one of"),
        ("rope", dict(kw, rope="complex"), "rope must be one of"),
        ("weight size", dict(kw, q_weight=kw["q_weight"][:8], k_weight=kw["k_weight"][:8]), "q_weight must have shape (16,)"),
        ("one weight", dict(kw, k_weight=None), "both"),
        ("no tables", dict(kw, cos=None), "needs cos and sin"),
        ("table shape", dict(kw, cos=kw["cos"][:, :3], sin=kw["sin"][:, :3]), "cos/sin must be"),
        ("table length", dict(kw, cos=kw["cos"].repeat(2, 1), sin=kw["sin"].repeat(2, 1)), "S_rope <= 6"),
        ("odd head dim", dict(kw, q=kw["q"][..., :15], k=kw["k"][..., :15], q_weight=None, k_weight=None), "even head dim"),
        ("backend", dict(kw, backend="metal"), "backend must be one of"),
        ("eps", dict(kw, eps=0.0), "eps must be positive"),
    ]


@pytest.mark.parametrize("case", range(len(_bad())), ids=[c[0] for c in _bad()])
def test_bad_input_raises_clear_error(case):
    _, kw, match = _bad()[case]
    with pytest.raises(ValueError, match=re.escape(match)):
        fastgen.ops.qk_norm_rope(**kw)


@pytest.mark.skipif(HAVE_CUDA_EXT and DEVICE.type == "cuda", reason="checks the fallback where the extension is missing")
def test_cuda_backend_falls_back_with_one_warning():
    kw = inputs(1, 6, 2, 16, torch.float32, "head", "interleaved", seed=19)
    with pytest.warns(FastgenFallbackWarning, match="CUDA extension") as rec:
        a = fastgen.ops.qk_norm_rope(**kw, backend="cuda")
        fastgen.ops.qk_norm_rope(**kw, backend="cuda")
    assert len([w for w in rec if issubclass(w.category, FastgenFallbackWarning)]) == 1
    rq, _ = refs(kw)
    assert max_err(a[0], rq) < 1e-5


def test_opcheck():
    kw = inputs(2, 5, 2, 16, torch.float32, "head", "interleaved", seed=23)
    op = torch.ops.fastgen.qk_norm_rope_triton.default
    outs = lambda: (torch.empty_like(kw["q"]), torch.empty_like(kw["k"]))  # noqa: E731
    torch.library.opcheck(op, (kw["q"], kw["k"], kw["q_weight"], kw["k_weight"], kw["cos"], kw["sin"], 1e-6, "head",
                               "interleaved", *outs()))
    torch.library.opcheck(op, (kw["q"], kw["k"], None, None, None, None, 1e-6, None, None, *outs()))


# --------------------------------------------------------------------------------------------
# csrc/: compile-only check here, real runs on a GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", ["qk_norm_rope.cu", "quantize_fp8.cu"])
def test_csrc_kernels_compile_for_sm80_and_sm90(tmp_path, source):
    # The kernels and launchers are torch-free, so they compile wherever nvcc is, GPU or not.
    cmd = ["nvcc", "-c", str(ROOT / "csrc" / source), "-o", str(tmp_path / "k.o"), "-std=c++17", "-O3",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-warn-spills"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "spill" not in res.stderr.lower(), res.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("norm", ["head", "all"])
def test_kernels_match_at_model_size(norm, backend):
    # Flux-sized bf16 on a GPU (the CUDA kernel within PyTorch's error of Triton's); the same heads
    # and layout over a few tokens on a CPU. Only the CUDA extension needs a GPU (and a build).
    reason = cuda_ext_can_run_on(DEVICE, "qk_norm_rope") if backend == "cuda" else None
    if reason:
        pytest.skip(reason)
    kw = inputs(2, 4608 if DEVICE.type == "cuda" else 9, 24, 128, torch.bfloat16, norm, "interleaved", seed=29)
    a = fastgen.ops.qk_norm_rope(**kw, backend=backend)
    rq, rk = refs(kw)
    t = fastgen.ops.qk_norm_rope(**kw, backend="torch")
    assert_within_pytorch_error(a[0], rq, t[0])
    assert_within_pytorch_error(a[1], rk, t[1])
    if backend == "cuda":
        b = fastgen.ops.qk_norm_rope(**kw, backend="triton")
        assert max_err(a[0], b[0]) <= 2 * max_err(t[0], rq)


def test_auto_sends_unsupported_dtypes_to_pytorch_even_where_kernels_exist(monkeypatch):
    # "auto" must apply the same dtype rule as an explicit backend: fp64 never reaches a kernel.
    import fastgen.ops.prologue as P

    monkeypatch.setattr(P, "cuda_ext_can_run_on", lambda device, op=None: None)  # as if the extension were built
    q = torch.randn(1, 2, 4, 16, dtype=torch.float64)
    assert P.choose_backend("auto", q, "qk_norm_rope", "qk_norm_rope") == "torch"
    assert P.choose_backend("auto", q.float(), "qk_norm_rope", "qk_norm_rope") == "cuda"
    kw = inputs(1, 4, 2, 16, torch.float32, "head", "interleaved", seed=41)
    kw64 = {k: (v.double() if torch.is_tensor(v) and k in ("q", "k", "q_weight", "k_weight") else v) for k, v in kw.items()}
    out = fastgen.ops.qk_norm_rope(**kw64)  # would raise inside the CUDA binding if "auto" picked it
    rq, _ = refs(kw64)
    # the PyTorch sequence rotates in fp32, as diffusers does: fp32-level error
    assert out[0].dtype == torch.float64 and max_err(out[0], rq) < 1e-5
