"""Token-merging kernels (kernels/merging.py) under the Triton interpreter against their references:
the same matchings (ties broken as documented), merge within PyTorch's own error of an fp64 merge,
unmerge exact, O(N) memory for the matching, and the checks of the public functions."""

import pytest
import torch

from fastgen.kernels import merging as K
from fastgen.merging.matching import bipartite_match, dst_grid, merge, unmerge

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TILES = {"block_s": 16, "block_d": 16, "block_c": 16}  # small tiles: several tiles and ragged edges on small grids


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty fills what it returns with NaN (floats) or -7 (integers), so an output element a
    kernel does not write shows."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def _metric(B, N, C, dtype, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # (B, C, N) in memory: channel stride N
        return torch.randn(B, C, N, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(B, N, C, generator=g).to(dtype)


def _match(x, h, w, r, backend, **kw):
    return bipartite_match(x, h, w, 2, 2, r, generator=torch.Generator().manual_seed(5), backend=backend, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,h,w,C,layout", [(1, 9, 11, 40, "contiguous"), (3, 7, 13, 72, "transposed"),
                                            (2, 6, 6, 8, "contiguous")])
def test_match_kernel_equals_reference(poisoned, dtype, B, h, w, C, layout):
    x = _metric(B, h * w, C, dtype, seed=h * w + C, layout=layout)
    mask = dst_grid(h, w, 2, 2, generator=torch.Generator().manual_seed(5))
    dst_idx, src_idx = mask.flatten().nonzero().flatten(), (~mask).flatten().nonzero().flatten()
    best, arg = K.match_fwd(x, src_idx, dst_idx, **TILES)
    ref_best, ref_arg = K.match_reference(x, src_idx, dst_idx)
    assert torch.equal(arg, ref_arg)
    torch.testing.assert_close(best, ref_best, rtol=0, atol=2e-6)
    # and the whole matching, through the public function
    r = h * w // 2
    mk, mt = _match(x, h, w, r, "triton"), _match(x, h, w, r, "torch")
    for name in ("src_idx", "dst_idx", "unmerged", "merged", "into", "row_of", "members", "offsets"):
        assert torch.equal(getattr(mk, name), getattr(mt, name)), name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ties_go_to_the_lowest_dst_and_the_lowest_src(backend):
    # Small integers: every dot product is exact, so equal rows tie exactly on every path.
    h, w, C = 8, 10, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (1, h * w, C), generator=g).float()
    mask = dst_grid(h, w, 2, 2, use_rand=False)
    dst_idx, src_idx = mask.flatten().nonzero().flatten(), (~mask).flatten().nonzero().flatten()
    u = torch.arange(1.0, C + 1)
    twins_dst = [2, 5, 17]  # 17 lies in the second 16-column dst tile
    twins_src = [4, 9, 30, 41]
    x[0, dst_idx[twins_dst]] = u
    x[0, src_idx[twins_src]] = u
    best, arg = (K.match_fwd(x, src_idx, dst_idx, **TILES) if backend == "triton"
                 else K.match_reference(x, src_idx, dst_idx))
    assert arg[0, twins_src].tolist() == [2, 2, 2, 2]  # the lowest of the equal dst
    assert len(set(best[0, twins_src].tolist())) == 1 and best[0, twins_src].max() == best.max()
    # the four src tie for the highest similarity: the lower src positions merge first
    m = bipartite_match(x, h, w, 2, 2, 3, use_rand=False, backend=backend)
    assert m.merged[0].tolist() == twins_src[:3] and m.into[0].tolist() == [2, 2, 2]
    assert m.unmerged[0, 0].item() == twins_src[3]


def test_reference_max_returns_the_first_maximum():
    # match_reference relies on it (torch.max over a dim is documented to return the first)
    s = torch.tensor([[0.5, 1.0, 0.2, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert s.max(dim=-1).indices.tolist() == [1, 0]


def _fp64_merge(x, m, mode):
    return K.merge_reference(x.double(), m.src_idx, m.dst_idx, m.unmerged, m.merged, m.into, mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,h,w,C,ratio,mode", [(1, 9, 11, 40, 0.5, "mean"), (3, 7, 13, 72, 0.7, "mean"),
                                                (2, 5, 9, 33, 0.3, "sum")])
def test_merge_and_unmerge_kernels_equal_the_reference(poisoned, dtype, B, h, w, C, ratio, mode):
    x = _metric(B, h * w, C, dtype, seed=C)
    m = _match(x, h, w, int(h * w * ratio), "torch")
    got = merge(x, m, mode, backend="triton")
    want = K.merge_reference(x, m.src_idx, m.dst_idx, m.unmerged, m.merged, m.into, mode)  # tomesd's sequence
    fast = merge(x, m, mode, backend="torch")  # fastgen's CPU path: one scatter_add, one division
    assert got.shape == want.shape == fast.shape == (B, h * w - m.r, C) and got.dtype == fast.dtype == dtype
    ref = _fp64_merge(x, m, mode)
    assert (fast.double() - ref).abs().max() <= 2 * (want.double() - ref).abs().max() + 1e-6
    if dtype == torch.float32:
        assert torch.equal(got, want)  # same order of additions (segments), same correctly rounded division
    else:  # one rounding of an fp32 sum: no further from fp64 than PyTorch's own merge in this dtype
        assert (got.double() - ref).abs().max() <= 2 * (want.double() - ref).abs().max() + 1e-6
    # small tiles: several channel chunks with a ragged last one, several programs
    assert torch.equal(K.merge_fwd(x, m.members, m.offsets, mode == "mean", rows=16, block_c=32), got)
    # unmerge is a gather (exact), with the residual one fp32 add rounded once, as PyTorch's "+"
    y = _metric(B, h * w - m.r, C, dtype, seed=7, layout="transposed")
    res = _metric(B, h * w, C + 3, dtype, seed=8)[..., 1:C + 1]  # a strided view
    assert torch.equal(unmerge(y, m, backend="triton"), unmerge(y, m, backend="torch"))
    want = unmerge(y, m, backend="torch") + res
    assert torch.equal(unmerge(y, m, residual=res, backend="triton"), want)
    assert torch.equal(K.unmerge_fwd(y, m.row_of, res, rows=16, block_c=32), want)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("h,w,ratio", [(7, 9, 0.5), (5, 4, 0.0), (6, 10, 0.74)])
def test_unmerge_of_merge_keeps_every_unmerged_token_exactly(backend, h, w, ratio):
    x = _metric(3, h * w, 24, torch.float16, seed=h * w)
    m = _match(x, h, w, int(h * w * ratio), backend)
    y = unmerge(merge(x, m, backend=backend), m, backend=backend)
    kept = torch.cat([m.src_idx[m.unmerged], m.dst_idx.expand(3, -1)], 1)[..., None].expand(-1, -1, 24)
    if m.r == 0:
        assert torch.equal(y, x)  # nothing merges: x back, bit for bit
    else:  # unmerged src exactly; each dst its merged value
        assert torch.equal(y.gather(1, kept[:, : m.unmerged.shape[1]]), x.gather(1, kept[:, : m.unmerged.shape[1]]))
    # every merged src carries its dst's value
    src_pos, dst_pos = m.src_idx[m.merged], m.dst_idx[m.into]
    for b in range(3):
        assert torch.equal(y[b, src_pos[b]], y[b, dst_pos[b]])


def test_one_matching_of_batch_one_serves_every_batch():
    h, w, C = 7, 9, 40
    x = _metric(3, h * w, C, torch.float32, seed=1)
    m = _match(x[:1], h, w, 30, "torch")
    for backend in ("triton", "torch"):
        got = merge(x, m, backend=backend)
        want = torch.cat([merge(x[i:i + 1], m, backend=backend) for i in range(3)])
        assert torch.equal(got, want)
        assert torch.equal(unmerge(got, m, backend=backend), torch.cat([unmerge(got[i:i + 1], m) for i in range(3)]))


def test_shared_dst_mask_gives_the_drawn_matching():
    x = _metric(2, 8 * 8, 16, torch.float32, seed=2)
    mask = dst_grid(8, 8, 2, 2, generator=torch.Generator().manual_seed(5))
    a, b = _match(x, 8, 8, 20, "torch"), _match(x, 8, 8, 20, "torch", dst_mask=mask)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("dst_idx", "merged", "into", "row_of"))


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of every tensor an aten op returns (the interpreter's copies of the kernel's
    arguments too)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor)]
        return out


def test_matching_kernel_memory_is_linear_in_tokens():
    # 64 x 64 grid: n_src * n_dst = 3072 * 1024 fp32 scores, 12.6 MB; the launcher holds O(N) (the
    # outputs, (B, N) inverse norms; the interpreter copies the arguments), never a score matrix.
    B, h, w, C = 1, 64, 64, 16
    x = _metric(B, h * w, C, torch.float16, seed=3)
    mask = dst_grid(h, w, 2, 2, use_rand=False)
    dst_idx, src_idx = mask.flatten().nonzero().flatten(), (~mask).flatten().nonzero().flatten()
    with _Allocations() as seen:
        best, arg = K.match_fwd(x, src_idx, dst_idx)
    scores = src_idx.numel() * dst_idx.numel() * 4
    assert seen.sizes and max(seen.sizes) <= x.numel() * x.element_size() <= scores // 96 and sum(seen.sizes) < scores // 8
    ref_best, ref_arg = K.match_reference(x, src_idx, dst_idx)
    assert (arg != ref_arg).float().mean() < 1e-3  # fp16 near-ties may fall either way at this size
    torch.testing.assert_close(best, ref_best, rtol=0, atol=2e-6)


def test_custom_ops_trace():
    x = _metric(2, 6 * 6, 8, torch.float32, seed=4)
    m = _match(x, 6, 6, 12, "torch")
    ops = torch.ops.fastgen
    for op, args in ((ops.tome_match, (x, m.src_idx, m.dst_idx)), (ops.tome_merge, (x, m.members, m.offsets, True)),
                     (ops.tome_unmerge, (merge(x, m), m.row_of, x)), (ops.tome_unmerge, (merge(x, m), m.row_of, None))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_value_errors_that_name_them():
    x = _metric(2, 6 * 6, 8, torch.float32, seed=4)
    m = _match(x, 6, 6, 10, "torch")
    with pytest.raises(ValueError, match="backend"):
        _match(x, 6, 6, 10, "cuda")
    with pytest.raises(ValueError, match="backend"):
        merge(x, m, backend="fast")
    with pytest.raises(ValueError, match="metric must be a 3-D"):
        bipartite_match(x[0], 6, 6, 2, 2, 10)
    with pytest.raises(ValueError, match="floating point"):
        bipartite_match(x.long(), 6, 6, 2, 2, 10)
    with pytest.raises(ValueError, match="grid is 5 x 6"):
        bipartite_match(x, 5, 6, 2, 2, 10)
    with pytest.raises(ValueError, match="dst_mask"):
        bipartite_match(x, 6, 6, 2, 2, 10, dst_mask=torch.ones(6, 6))
    with pytest.raises(ValueError, match="dst_mask"):
        bipartite_match(x, 6, 6, 2, 2, 10, dst_mask=torch.ones(3, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="no dst"):
        bipartite_match(x, 6, 6, 2, 2, 10, dst_mask=torch.zeros(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="x has 35 tokens"):
        merge(x[:, 1:], m)
    with pytest.raises(ValueError, match="batch"):
        merge(torch.cat([x, x, x]), m)
    with pytest.raises(ValueError, match="mode"):
        merge(x, m, "max")
    y = merge(x, m)
    with pytest.raises(ValueError, match="y has 36 tokens"):
        unmerge(x, m)
    with pytest.raises(ValueError, match="residual must have shape"):
        unmerge(y, m, residual=y)
    with pytest.raises(ValueError, match="residual must have y's dtype"):
        unmerge(y, m, residual=x.half())


def test_inputs_that_need_gradients_take_the_reference():
    from fastgen import FastgenFallbackWarning

    x = _metric(2, 6 * 6, 8, torch.float32, seed=4).requires_grad_()
    m = _match(x, 6, 6, 12, "triton")  # the matching needs no gradient: the kernel runs
    assert torch.equal(m.merged, _match(x, 6, 6, 12, "torch").merged)
    with pytest.warns(FastgenFallbackWarning, match="no backward"):
        y = merge(x, m, backend="triton")
    unmerge(y, m).sum().backward()  # "auto" on a CPU: the reference, differentiable
    assert x.grad is not None and x.grad.shape == x.shape


def test_int64_offsets_path(monkeypatch):
    # tensors of 2**31 elements do not fit here: force the 64-bit offset code on a small input instead
    monkeypatch.setattr(K, "needs_int64", lambda *tensors: True)
    x = _metric(2, 7 * 9, 40, torch.float32, seed=6, layout="transposed")
    m = _match(x, 7, 9, 25, "torch")
    assert torch.equal(K.match_fwd(x, m.src_idx, m.dst_idx, **TILES)[1], K.match_reference(x, m.src_idx, m.dst_idx)[1])
    y = merge(x, m, backend="triton")
    assert torch.equal(y, K.merge_reference(x, m.src_idx, m.dst_idx, m.unmerged, m.merged, m.into, "mean"))
    assert torch.equal(unmerge(y, m, residual=x, backend="triton"), unmerge(y, m) + x)
