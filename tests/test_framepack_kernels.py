"""FramePack's kernels (kernels/framepack.py) under the Triton interpreter: ``patchify_pack`` and
``rope_pool`` against float64 references within PyTorch's own error, the references against
diffusers' own modules, the custom ops under torch.compile, and the checks of the public functions."""

from __future__ import annotations

import pytest
import torch

from fastgen import FastgenFallbackWarning
from fastgen.kernels import framepack as K
from fastgen.ops.portable import portable
from fastgen.ops.framepack import patchify_pack, rope_pool
from helpers import DEVICE, assert_within_pytorch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16: fastgen computes it in fp32 under the interpreter
RELEASED = [(4, 8, 8), (2, 4, 4), (1, 2, 2)]  # FramePack's 4x, 2x and 1x history kernels, in its packing order

# Each case: batch, channels, D, per-rate kernels and (T, H, W), tail, layout. Odd on purpose: T, H
# and W that are not kernel multiples (replicate padding on every axis), D not a tile multiple.
CASES = {
    "released-odd-hw": dict(B=1, C=4, D=24, kernels=RELEASED, thw=[(5, 9, 11), (3, 9, 11), (2, 9, 11)], tail=3),
    "other-kernels-strided": dict(B=3, C=16, D=40, kernels=[(3, 6, 6), (1, 3, 3)], thw=[(4, 7, 13), (2, 7, 13)],
                                  tail=0, strided=True),
    "empty-rate-per-rate-hw": dict(B=2, C=4, D=24, kernels=RELEASED, thw=[(0, 9, 11), (3, 10, 6), (1, 5, 7)], tail=5),
}


def _rates(B, C, D, kernels, thw, dtype=torch.float32, strided=False, seed=0, **_):
    """Latents in fp32 (the op casts them to the weights' dtype), weights and biases in ``dtype``;
    rate 1 has no bias. ``strided``: channels-last latents with a sliced-off first frame, and
    weights laid out (D, kt, kh, kw, C), so the kernel reads them through their strides."""
    g = torch.Generator().manual_seed(seed)
    xs, ws, bs = [], [], []
    for r, (k, (t, h, w)) in enumerate(zip(kernels, thw)):
        if strided:  # made on the device, then viewed: a copy would not keep the strides
            xs.append(torch.randn(B, t + 1, h, w, C, generator=g).to(DEVICE).permute(0, 4, 1, 2, 3)[:, :, 1:])
            ws.append((torch.randn(D, *k, C, generator=g) * 0.2).to(DEVICE, dtype).permute(0, 4, 1, 2, 3))
        else:
            xs.append(torch.randn(B, C, t, h, w, generator=g).to(DEVICE))
            ws.append((torch.randn(D, C, *k, generator=g) * 0.2).to(DEVICE, dtype))
        bs.append(None if r == 1 else torch.randn(D, generator=g).to(DEVICE, dtype))
    return xs, ws, bs


def _tokens(xs, ws):
    return sum(K.patch_tokens(x.shape, w.shape[2:]) for x, w in zip(xs, ws))


@pytest.fixture
def poisoned(monkeypatch):
    # torch.empty returns NaN, so a packed row the kernel does not write shows
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))


# --------------------------------------------------------------------------------------------
# patchify_pack
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_patchify_pack_kernel_within_pytorch_error(poisoned, case, dtype):
    c = CASES[case]
    xs, ws, bs = _rates(**c, dtype=dtype, seed=len(case))
    if c.get("strided"):
        assert not any(t.is_contiguous() for t in xs + ws)
    out = patchify_pack(xs, ws, bs, c["tail"], backend="triton")
    n = _tokens(xs, ws)
    assert out.shape == (c["B"], n + c["tail"], c["D"]) and out.dtype == dtype
    ref = K.patchify_pack_reference(xs, ws, bs, c["tail"], dtype=torch.float64)
    pytorch = K.patchify_pack_reference(xs, ws, bs, c["tail"])  # conv3d in the weights' dtype
    assert_within_pytorch_error(out[:, :n], ref[:, :n], pytorch[:, :n])


def test_small_tiles_straddle_batches_and_split_k():
    # 16-wide tiles: token tiles cross batch elements, the K loop runs several steps, D tiles are ragged.
    c = CASES["released-odd-hw"]
    xs, ws, bs = _rates(**dict(c, B=3))
    n = _tokens(xs, ws)
    out = K.patchify_pack_fwd(xs, ws, bs, 0, block_m=16, block_n=16, block_k=16)
    ref = K.patchify_pack_reference(xs, ws, bs, dtype=torch.float64)
    assert_within_pytorch_error(out, ref, K.patchify_pack_reference(xs, ws, bs))
    assert out.shape[1] == n


def test_strided_inputs_equal_contiguous():
    c = CASES["other-kernels-strided"]
    xs, ws, bs = _rates(**c, seed=3)
    dense = patchify_pack([x.contiguous() for x in xs], [w.contiguous() for w in ws], bs, backend="triton")
    assert torch.equal(patchify_pack(xs, ws, bs, backend="triton"), dense)


def test_more_rates_than_one_launch_takes():
    # MAX_RATES rates per launch: a sixth rate starts a second launch, rows still in input order.
    kernels = [(1, 2, 2), (2, 2, 2), (1, 1, 3), (3, 3, 1), (2, 4, 4), (1, 3, 3)]
    xs, ws, bs = _rates(2, 4, 24, kernels, [(3, 5, 7)] * 6, seed=5)
    assert len(kernels) > K.MAX_RATES
    out = patchify_pack(xs, ws, bs, 2, backend="triton")
    ref = K.patchify_pack_reference(xs, ws, bs, 2, dtype=torch.float64)
    n = _tokens(xs, ws)
    assert_within_pytorch_error(out[:, :n], ref[:, :n], K.patchify_pack_reference(xs, ws, bs)[:, :n])


@pytest.fixture(scope="module")
def diffusers_framepack():
    from diffusers.models.transformers import transformer_hunyuan_video_framepack as m

    return m


@pytest.mark.parametrize("hw", [(10, 14), (16, 16)])
def test_patchify_pack_equals_diffusers_history_patch_embed(diffusers_framepack, hw):
    torch.manual_seed(7)
    embed = diffusers_framepack.HunyuanVideoHistoryPatchEmbed(4, 24).eval().to(DEVICE)
    g = torch.Generator().manual_seed(8)
    # The released layout: 16 frames at 4x, 2 at 2x, 2 clean at 1x. diffusers' 1x projection does
    # not pad, so H and W are even; 10 x 14 still pads the 2x and 4x rates.
    x4, x2, x1 = (torch.randn(2, 4, t, *hw, generator=g).to(DEVICE) for t in (16, 2, 2))
    with torch.no_grad():
        c1, c2, c4 = embed(x1, x2, x4)
        want = torch.cat([c4, c2, c1], 1)  # diffusers packs [4x, 2x, 1x, noisy]
        convs = [embed.proj_4x, embed.proj_2x, embed.proj]
        args = ([x4, x2, x1], [p.weight for p in convs], [p.bias for p in convs])
        assert torch.equal(patchify_pack(*args, backend="torch"), want)
        got = patchify_pack(*args, 9, backend="triton")
        ref = K.patchify_pack_reference(*args, dtype=torch.float64)
    assert got.shape == (2, want.shape[1] + 9, 24)
    assert_within_pytorch_error(got[:, : want.shape[1]], ref, want)


# --------------------------------------------------------------------------------------------
# rope_pool
# --------------------------------------------------------------------------------------------

# The released packing: 4x history frames 40..55, 2x 38..39, clean [0, 37], noisy 28..36.
LAYOUT = [torch.arange(40, 56, device=DEVICE), torch.arange(38, 40, device=DEVICE), torch.tensor([0, 37], device=DEVICE),
          torch.arange(28, 37, device=DEVICE)]
POOL = [(4, 4, 4), (2, 2, 2), (1, 1, 1), (1, 1, 1)]
AXES = (16, 56, 56)


@pytest.mark.parametrize("grid", [(5, 7), (4, 4), (38, 40)])
def test_rope_pool_kernel_within_pytorch_error(poisoned, grid):
    cos, sin = rope_pool(LAYOUT, POOL, *grid, AXES, 256.0, backend="triton")
    ref = K.rope_pool_reference(LAYOUT, POOL, *grid, AXES, 256.0, dtype=torch.float64)
    fp32 = K.rope_pool_reference(LAYOUT, POOL, *grid, AXES, 256.0)
    n = sum(-(-len(i) // k[0]) * -(-grid[0] // k[1]) * -(-grid[1] // k[2]) for i, k in zip(LAYOUT, POOL))
    assert cos.shape == sin.shape == (n, sum(AXES)) and cos.dtype == torch.float32
    assert_within_pytorch_error(cos, ref[0], fp32[0], what="cos")
    assert_within_pytorch_error(sin, ref[1], fp32[1], what="sin")


def test_rope_pool_other_kernels_float_strided_and_empty_indices():
    # Kernels that are not cubes, fractional positions, a strided index tensor, a rate with no frames,
    # axes whose sum (40) is not a power of two.
    idx = [torch.linspace(0.5, 9.25, 7), torch.arange(0, 20)[::3], torch.zeros(0, dtype=torch.int64), torch.arange(3)]
    idx = [i.to(DEVICE) for i in idx]
    kernels = [(3, 2, 5), (1, 3, 1), (2, 2, 2), (2, 1, 1)]
    axes = (8, 12, 20)
    cos, sin = rope_pool(idx, kernels, 6, 9, axes, 10000.0, backend="triton")
    ref = K.rope_pool_reference(idx, kernels, 6, 9, axes, 10000.0, dtype=torch.float64)
    fp32 = K.rope_pool_reference(idx, kernels, 6, 9, axes, 10000.0)
    assert_within_pytorch_error(cos, ref[0], fp32[0], what="cos")
    assert_within_pytorch_error(sin, ref[1], fp32[1], what="sin")
    cos_rows = [rope_pool([i], [k], 6, 9, axes, 10000.0, backend="triton")[0] for i, k in zip(idx, kernels)]
    assert torch.equal(cos, torch.cat(cos_rows)), "rates are packed in input order"


@pytest.mark.parametrize("grid", [(5, 7), (38, 40)])
def test_rope_pool_equals_diffusers(diffusers_framepack, grid):
    m = diffusers_framepack
    rope = m.HunyuanVideoFramepackRotaryPosEmbed(patch_size=2, patch_size_t=1, rope_dim=list(AXES), theta=256.0)
    h, w = grid
    parts = []
    for idx, k in zip(LAYOUT, POOL):
        emb = rope(frame_indices=idx, height=2 * h, width=2 * w, device=DEVICE)
        if k != (1, 1, 1):
            # the model's method uses nothing of self: call it unbound, as _pack_history_states does
            emb = m.HunyuanVideoFramepackTransformer3DModel._pad_rotary_emb(None, emb, h, w, k)
        parts.append(emb)
    want = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    got = rope_pool(LAYOUT, POOL, h, w, AXES, 256.0, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    kernel = rope_pool(LAYOUT, POOL, h, w, AXES, 256.0, backend="triton")
    ref = K.rope_pool_reference(LAYOUT, POOL, h, w, AXES, 256.0, dtype=torch.float64)
    assert_within_pytorch_error(kernel[0], ref[0], want[0], what="cos")
    assert_within_pytorch_error(kernel[1], ref[1], want[1], what="sin")


# --------------------------------------------------------------------------------------------
# Custom ops, backends, 64-bit offsets, bad input
# --------------------------------------------------------------------------------------------


def test_custom_ops_trace_and_compile_fullgraph():
    xs, ws, bs = _rates(**CASES["released-odd-hw"])
    ops = torch.ops.fastgen
    torch.library.opcheck(ops.patchify_pack, (xs, ws, bs, 2), test_utils=("test_schema", "test_faketensor"))
    freqs = K.rope_freqs(AXES, 256.0, device=DEVICE)
    idx = [i.float() for i in LAYOUT]
    torch.library.opcheck(ops.rope_pool, (idx, [v for k in POOL for v in k], 5, 7, list(AXES), freqs),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x4, x2, x1, i4, i1):
        packed = patchify_pack([x4, x2, x1], ws, bs, 2, backend="triton")
        cos, sin = rope_pool([i4, i1], [(4, 4, 4), (1, 1, 1)], 5, 7, AXES, 256.0, backend="triton")
        return packed[:, :-2] * 2, cos + sin

    args = (*xs, LAYOUT[0], LAYOUT[3])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    eager = f(*args)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_auto_and_portable_take_the_reference():
    xs, ws, bs = _rates(**CASES["released-odd-hw"])
    ref = K.patchify_pack_reference(xs, ws, bs)
    if DEVICE.type == "cpu":
        assert torch.equal(patchify_pack(xs, ws, bs), ref), "auto on a CPU: the reference"
    with portable():  # no fastgen:: node in an export, and no fallback warning
        assert torch.equal(patchify_pack(xs, ws, bs, backend="triton"), ref)
        assert torch.equal(rope_pool(LAYOUT, POOL, 5, 7, AXES, 256.0, backend="triton")[0],
                           K.rope_pool_reference(LAYOUT, POOL, 5, 7, AXES, 256.0)[0])


def test_weights_that_need_gradients_take_the_reference():
    xs, ws, bs = _rates(**CASES["released-odd-hw"])
    ws = [w.requires_grad_() for w in ws]
    with pytest.warns(FastgenFallbackWarning, match="no backward"):
        out = patchify_pack(xs, ws, bs, backend="triton")
    out.sum().backward()
    assert all(w.grad is not None for w in ws)


def test_int64_offsets_path(monkeypatch):
    # tensors of 2**31 elements do not fit here: force the 64-bit offset code on small inputs instead
    xs, ws, bs = _rates(**CASES["empty-rate-per-rate-hw"])
    packed = patchify_pack(xs, ws, bs, backend="triton")
    pooled = rope_pool(LAYOUT, POOL, 5, 7, AXES, 256.0, backend="triton")
    monkeypatch.setattr(K, "needs_int64", lambda *tensors: True)
    assert torch.equal(patchify_pack(xs, ws, bs, backend="triton"), packed)
    assert all(torch.equal(a, b) for a, b in zip(rope_pool(LAYOUT, POOL, 5, 7, AXES, 256.0, backend="triton"), pooled))


def test_bad_inputs_raise_value_errors_that_name_them():
    xs, ws, bs = _rates(**CASES["released-odd-hw"])
    bad_patchify = [
        (dict(inputs=[xs[0], xs[1][:, :2], xs[2]]), r"inputs\[1\] has \(B, C\)"),
        (dict(inputs=[xs[0], torch.cat([xs[1]] * 2), xs[2]]), r"inputs\[1\] has \(B, C\)"),
        (dict(inputs=[xs[0][0], xs[1], xs[2]]), r"inputs\[0\] must be a 5-D"),
        (dict(weights=[ws[0], ws[1][0], ws[2]]), r"weights\[1\] must be a 5-D"),
        (dict(weights=[ws[0], ws[1]]), "2 weights"),
        (dict(weights=[ws[0], ws[1][:, :2], ws[2]]), "takes 2 channels"),
        (dict(weights=[ws[0], ws[1][:8], ws[2]]), "one D and dtype"),
        (dict(weights=[ws[0], ws[1].half(), ws[2]]), "one D and dtype"),
        (dict(biases=bs[:2]), "2 biases"),
        (dict(biases=[bs[0], torch.zeros(3, device=DEVICE), None]), r"biases\[1\] must be None or"),
        (dict(inputs=xs[0]), "inputs must be a list"),
        (dict(inputs=[]), "inputs is empty"),
        (dict(tail=-1), "tail"),
        (dict(backend="cuda"), "backend"),
    ]
    for change, match in bad_patchify:
        kw = dict(dict(inputs=xs, weights=ws, biases=bs, tail=0, backend="triton"), **change)
        with pytest.raises(ValueError, match=match):
            patchify_pack(**kw)
    good = dict(frame_indices=LAYOUT, kernels=POOL, height=5, width=7, axes_dim=AXES, theta=256.0)
    bad_rope = [
        (dict(frame_indices=[LAYOUT[0][None]] + LAYOUT[1:]), r"frame_indices\[0\] must be a 1-D"),
        (dict(frame_indices=LAYOUT[0]), "frame_indices must be a list"),
        (dict(kernels=POOL[:3]), "kernels must be a list of 4"),
        (dict(kernels=[(4, 4)] + POOL[1:]), r"kernels\[0\] must be three positive ints"),
        (dict(kernels=[(4, 0, 4)] + POOL[1:]), r"kernels\[0\] must be three positive ints"),
        (dict(kernels=[(4, 2.0, 4)] + POOL[1:]), r"kernels\[0\] must be three positive ints"),
        (dict(axes_dim=(16, 55, 56)), "axes_dim must be three positive even ints"),
        (dict(axes_dim=(16, 56)), "axes_dim must be three positive even ints"),
        (dict(height=0), "height must be an int >= 1"),
        (dict(theta=0.0), "theta must be a positive number"),
    ]
    for change, match in bad_rope:
        with pytest.raises(ValueError, match=match):
            rope_pool(**dict(good, **change), backend="triton")
