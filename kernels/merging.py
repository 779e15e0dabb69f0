"""Token merging (ToMe): bipartite matching, merge and unmerge as fused kernels.

Method: Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (2023); conventions of tomesd
0.1.3's ``merge.py`` (``bipartite_soft_matching_random2d``). Tokens are split into *src* and *dst*
by grid position; each src token's best dst is its highest cosine similarity; the ``r`` src tokens
with the highest best are merged into their dst (unweighted mean, tomesd's
``scatter_reduce("mean", include_self=True)``); the merged sequence is ``[unmerged src..., dst...]``.

Three kernels, each with its launcher and its plain-PyTorch reference beside it:

- ``match``: per src row, the max cosine similarity over the dst rows and its argmax. A GEMM with
  a running (max, argmax) epilogue, tiled over src rows x dst columns: the (n_src, n_dst) score
  matrix never exists; memory is O(N) (the outputs and the (B, N) inverse norms).
- ``merge``: a deterministic segment mean. ``segments`` turns a matching into ``row_of`` (each grid
  position's row of the merged sequence) and a CSR list (``members``, ``offsets``) of the positions
  each merged row averages; each program sums its rows' members in a fixed order, so no float
  atomics and results do not depend on scheduling.
- ``unmerge``: a gather by ``row_of``, optionally fused with a residual add.

Every index is a grid position in [0, N) of a (B, N, C) token tensor, row-major on the (h, w) grid.
"""

from __future__ import annotations

import torch

from ._common import HAVE_TRITON, INTERPRET, needs_int64, next_pow2, tl, triton

# --- references ---------------------------------------------------------------------------------


def match_reference(metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each src row's best dst by cosine similarity, in fp32 (fp64 for fp64), materialising the
    (B, n_src, n_dst) score matrix.

    Args:
        metric: (B, N, C) float, any strides.
        src_idx, dst_idx: (n_src,), (n_dst,) int64 grid positions.

    Returns:
        (best, best_dst): (B, n_src) max similarity (fp32, fp64 for fp64) and (B, n_src) int64 index
        *into dst_idx*. Ties go to the lowest dst index (``torch.max`` over a dim returns the first
        maximal value, as documented); the kernel breaks ties the same way. Rows of zero norm give
        NaN, as tomesd.
    """
    m = metric.to(torch.promote_types(metric.dtype, torch.float32))
    m = m / m.norm(dim=-1, keepdim=True)  # normalise first, as tomesd (its fp32 rounding)
    scores = m[:, src_idx] @ m[:, dst_idx].transpose(-1, -2)
    return scores.max(dim=-1)


def merge_reference(x: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, unmerged: torch.Tensor,
                    merged: torch.Tensor, into: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """tomesd's merge: (B, N, C) -> (B, N - r, C) ``[unmerged src, dst]``, each merged src reduced
    into its dst by ``mode`` ("mean" or "sum", ``scatter_reduce`` with ``include_self=True``), in x's
    dtype. ``unmerged`` (B, n_src - r), ``merged`` and ``into`` (B, r): positions within src / dst."""
    B, _, C = x.shape
    src, dst = x[:, src_idx], x[:, dst_idx]
    unm = src.gather(1, unmerged[..., None].expand(B, -1, C))
    moved = src.gather(1, merged[..., None].expand(B, -1, C))
    dst = dst.scatter_reduce(1, into[..., None].expand(B, -1, C), moved, reduce=mode)
    return torch.cat([unm, dst], dim=1)


def unmerge_reference(y: torch.Tensor, row_of: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M, C) -> (B, N, C): every grid position gets its merged row ``y[b, row_of[b, n]]``, plus
    ``residual`` (B, N, C) if given (added in fp32 and rounded once, as PyTorch's ``+`` does)."""
    B, _, C = y.shape
    out = y.gather(1, row_of.long()[..., None].expand(B, -1, C))
    return out if residual is None else residual + out


def segments(n: int, src_idx: torch.Tensor, dst_idx: torch.Tensor, unmerged: torch.Tensor, merged: torch.Tensor,
             into: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merge/unmerge maps of a matching, O(N) memory, on the indices' device.

    Returns:
        row_of: (B, N) int32, each grid position's row in the merged sequence (unmerged src k: row
            k; dst j and every src merged into it: row ``n_unm + j``).
        members: (B, N) int32 grid positions grouped by merged row: a dst first, then the src merged
            into it in merge-rank order (the order tomesd's scatter_reduce adds them, so a fp32
            segment sum rounds as it does).
        offsets: (B, M + 1) int32 CSR offsets into ``members`` (M = N - r).
    """
    B, r = merged.shape
    n_unm, n_dst = unmerged.shape[1], dst_idx.numel()
    dev = unmerged.device
    # One sort key per token: (row, place in row). Unique, so an unstable sort is deterministic.
    step = r + 1
    key = torch.empty(B, n, dtype=torch.int64, device=dev)
    key.scatter_(1, src_idx[unmerged], torch.arange(n_unm, device=dev).mul_(step).expand(B, -1))
    key[:, dst_idx] = torch.arange(n_unm, n_unm + n_dst, device=dev).mul_(step)
    key.scatter_(1, src_idx[merged], (into + n_unm) * step + torch.arange(1, r + 1, device=dev))
    row_of = key.div(step, rounding_mode="floor")
    members = key.argsort(dim=1).to(torch.int32)
    counts = torch.zeros(B, n_unm + n_dst + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(1, row_of + 1, torch.ones_like(row_of, dtype=torch.int32))
    return row_of.to(torch.int32), members, torch.cumsum(counts, 1, dtype=torch.int32)


# --- kernels ------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _batch_and_rows(ROWS: tl.constexpr, INT64: tl.constexpr):
        # program (i, b): rows i * ROWS ... of batch b, in int64 when some offset needs it
        b = tl.program_id(1)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        if INT64:
            b = b.to(tl.int64)
            rows = rows.to(tl.int64)
        return b, rows

    @triton.jit
    def _match_kernel(
        M, InvNorm, SrcIdx, DstIdx, Best, BestDst,
        s_b, s_n, s_c,  # metric strides: any layout
        N, n_src, n_dst, C,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        # One program: BLOCK_S src rows of one batch against every dst, BLOCK_D columns at a time.
        b = tl.program_id(1)
        offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_src
        src = tl.load(SrcIdx + offs_s, mask=s_ok, other=0)
        if INT64:
            b = b.to(tl.int64)
            src = src.to(tl.int64)
        else:
            src = src.to(tl.int32)
        base = M + b * s_b
        run_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
        run_arg = tl.zeros([BLOCK_S], tl.int32)
        for d0 in range(0, n_dst, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < n_dst
            dst = tl.load(DstIdx + offs_d, mask=d_ok, other=0)
            if INT64:
                dst = dst.to(tl.int64)
            else:
                dst = dst.to(tl.int32)
            acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < C
                a = tl.load(base + src[:, None] * s_n + offs_c[None, :] * s_c,
                            mask=s_ok[:, None] & c_ok[None, :], other=0.0)
                bt = tl.load(base + dst[None, :] * s_n + offs_c[:, None] * s_c,
                             mask=c_ok[:, None] & d_ok[None, :], other=0.0)
                # fp16/bf16 products are exact in the fp32 accumulator; fp32 inputs ask for IEEE
                # products (TF32 would round them to 10 bits and change the argmax).
                if IEEE:
                    acc = tl.dot(a, bt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, bt, acc)
            # Cosine = dot * inv|a| * inv|b|; inv|a| is one positive factor per row, so it cannot
            # change the argmax and is applied once at the end.
            inv_d = tl.load(InvNorm + b * N + dst, mask=d_ok, other=0.0)
            score = tl.where(d_ok[None, :], acc * inv_d[None, :], float("-inf"))
            tile_max = tl.max(score, 1)
            # Ties: the lowest dst index, within the tile by min over the maximal columns, across
            # tiles by taking a later tile only when strictly greater (tiles go up in index).
            tile_arg = tl.min(tl.where(score == tile_max[:, None], offs_d[None, :], n_dst), 1)
            better = tile_max > run_max
            run_arg = tl.where(better, tile_arg, run_arg)
            run_max = tl.where(better, tile_max, run_max)
        inv_s = tl.load(InvNorm + b * N + src, mask=s_ok, other=0.0)
        out = b * n_src + offs_s
        tl.store(Best + out, run_max * inv_s, mask=s_ok)
        tl.store(BestDst + out, run_arg.to(BestDst.dtype.element_ty), mask=s_ok)

    @triton.jit
    def _merge_kernel(
        X, Members, Offsets, Out,
        s_xb, s_xn, s_xc,  # x strides: any layout; out is contiguous
        s_mb, s_ob,  # batch strides of members and offsets (0: one matching for every batch)
        R, C,  # R = N - r rows out
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, MEAN: tl.constexpr, INT64: tl.constexpr,
    ):
        # ROWS merged rows of one batch; each is the sum (mean) of its members, added in the
        # order ``members`` lists them: fixed, so the result is the same on every run.
        b, rows = _batch_and_rows(ROWS, INT64)
        ok = rows < R
        start = tl.load(Offsets + b * s_ob + rows, mask=ok, other=0)
        cnt = tl.load(Offsets + b * s_ob + rows + 1, mask=ok, other=0) - start
        k_end = tl.max(cnt, 0)  # one dst may take many src: loop to this tile's longest segment
        x_base = X + b * s_xb
        out_base = Out + b * R * C + rows[:, None] * C
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            acc = tl.zeros([ROWS, BLOCK_C], tl.float32)
            for k in range(k_end):
                take = k < cnt
                pos = tl.load(Members + b * s_mb + start + k, mask=take, other=0)
                if INT64:
                    pos = pos.to(tl.int64)
                v = tl.load(x_base + pos[:, None] * s_xn + offs_c[None, :] * s_xc,
                            mask=take[:, None] & c_ok[None, :], other=0.0)
                acc += v.to(tl.float32)
            if MEAN:
                # correctly rounded, as PyTorch's division (a plain fp32 "/" is approximate on GPUs)
                acc = tl.math.div_rn(acc, tl.maximum(cnt, 1).to(tl.float32)[:, None])
            tl.store(out_base + offs_c[None, :], acc.to(Out.dtype.element_ty), mask=ok[:, None] & c_ok[None, :])

    @triton.jit
    def _unmerge_kernel(
        Y, RowOf, Res, Out,
        s_yb, s_yn, s_yc, s_rb, s_rn, s_rc,  # y and residual strides: any layout; out is contiguous
        s_ib,  # row_of's batch stride (0: one matching for every batch)
        N, C,
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RES: tl.constexpr, INT64: tl.constexpr,
    ):
        b, pos = _batch_and_rows(ROWS, INT64)
        ok = pos < N
        row = tl.load(RowOf + b * s_ib + pos, mask=ok, other=0)
        if INT64:
            row = row.to(tl.int64)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = ok[:, None] & (offs_c[None, :] < C)
            v = tl.load(Y + b * s_yb + row[:, None] * s_yn + offs_c[None, :] * s_yc, mask=mask, other=0.0)
            if HAS_RES:
                # one fp32 add, one rounding: what ``residual + unmerged`` gives in PyTorch
                res = tl.load(Res + b * s_rb + pos[:, None] * s_rn + offs_c[None, :] * s_rc, mask=mask, other=0.0)
                v = res.to(tl.float32) + v.to(tl.float32)
            tl.store(Out + b * N * C + pos[:, None] * C + offs_c[None, :], v.to(Out.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------------------


def _interpretable(t: torch.Tensor | None) -> torch.Tensor | None:
    # The interpreter computes garbage on bf16 (ENGINEERING.md); fp32 holds every bf16 value exactly,
    # and the kernels compute in fp32 anyway, so results are those a GPU gives.
    if t is not None and INTERPRET and t.dtype == torch.bfloat16:
        return t.float()
    return t


def match_fwd(metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, *, block_s: int | None = None,
              block_d: int | None = None, block_c: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of ``match_reference``: same outputs, same ties, fp32 accumulation.

    Args:
        metric: (B, N, C) fp16, bf16 or fp32, any strides; rows of nonzero norm.
        src_idx, dst_idx: (n_src,), (n_dst,) integer grid positions in [0, N).
        block_s, block_d, block_c: tile sizes (powers of two, at least 16); default 64, 64 and
            min(64, C rounded up) on a GPU, larger under the interpreter (fewer tiles run faster).

    Returns:
        (best, best_dst): (B, n_src) fp32 and (B, n_src) int64 (index into dst_idx).

    Memory: the outputs and (B, N) fp32 inverse norms; no (n_src, n_dst) buffer exists.
    """
    B, N, C = metric.shape
    n_src, n_dst = src_idx.numel(), dst_idx.numel()
    best = torch.empty(B, n_src, dtype=torch.float32, device=metric.device)
    best_dst = torch.empty(B, n_src, dtype=torch.int64, device=metric.device)
    if B * n_src == 0:
        return best, best_dst
    if n_dst == 0:
        return best.fill_(float("-inf")), best_dst.zero_()
    # O(N) inverse norms, computed in fp32 without an fp32 copy of metric
    inv_norm = torch.linalg.vector_norm(metric, dim=-1, dtype=torch.float32).reciprocal_()
    metric = _interpretable(metric)
    big = 128 if INTERPRET else 64
    bs, bd = block_s or big, block_d or big
    bc = block_c or min(big, max(16, next_pow2(C)))
    _match_kernel[(triton.cdiv(n_src, bs), B)](
        metric, inv_norm, src_idx, dst_idx, best, best_dst, *metric.stride(), N, n_src, n_dst, C,
        BLOCK_S=bs, BLOCK_D=bd, BLOCK_C=bc, IEEE=metric.dtype == torch.float32,
        INT64=needs_int64(metric, inv_norm), num_warps=4,
    )
    return best, best_dst


def _rows_and_block_c(C: int, rows: int | None, block_c: int | None) -> tuple[int, int]:
    # one chunk covers C up to 1024 channels; about 4096 elements a program
    bc = block_c or min(1024, max(16, next_pow2(C)))
    return rows or max(1, min(64, 4096 // bc)), bc


def merge_fwd(x: torch.Tensor, members: torch.Tensor, offsets: torch.Tensor, mean: bool = True, *,
              rows: int | None = None, block_c: int | None = None) -> torch.Tensor:
    """Segment mean (or sum) of x's rows: (B, N, C) -> (B, M, C), row i of batch b reducing
    ``x[b, members[b, offsets[b, i]:offsets[b, i + 1]]]``, in fp32, rounded once to x's dtype.

    Args:
        x: (B, N, C) fp16, bf16 or fp32, any strides.
        members: (B or 1, N) int32; offsets: (B or 1, M + 1) int32 (``segments``); the last dim
            contiguous, batch 1 (or batch stride 0) shared by every batch.
        mean: divide by the segment length (else the sum).
        rows, block_c: rows per program and channels per chunk (powers of two; defaults fit ~4096
            elements a program).

    Returns:
        (B, M, C) contiguous, x's dtype. With ``segments``' order (a dst, then its src in merge
        rank) an fp32 result is bit-identical to ``merge_reference`` on a CPU.
    """
    B, _, C = x.shape
    R = offsets.shape[1] - 1
    out = torch.empty(B, R, C, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    xi = _interpretable(x)
    res = out if xi is x else torch.empty(B, R, C, dtype=xi.dtype, device=x.device)
    per, bc = _rows_and_block_c(C, rows, block_c)
    _merge_kernel[(triton.cdiv(R, per), B)](
        xi, members, offsets, res, *xi.stride(), _batch_stride(members), _batch_stride(offsets), R, C,
        ROWS=per, BLOCK_C=bc, MEAN=bool(mean), INT64=needs_int64(xi, res, members), num_warps=4,
    )
    return out if res is out else out.copy_(res)


def unmerge_fwd(y: torch.Tensor, row_of: torch.Tensor, residual: torch.Tensor | None = None, *,
                rows: int | None = None, block_c: int | None = None) -> torch.Tensor:
    """Gather by ``row_of``: (B, M, C) -> (B, N, C), ``out[b, n] = y[b, row_of[b, n]]``, plus
    ``residual`` (B, N, C) in fp32 rounded once when given; one pass.

    Args:
        y: (B, M, C) fp16, bf16 or fp32, any strides; residual: y's dtype, any strides.
        row_of: (B or 1, N) int32 with values in [0, M), the last dim contiguous.

    Returns:
        (B, N, C) contiguous, y's dtype.
    """
    B, _, C = y.shape
    N = row_of.shape[1]
    out = torch.empty(B, N, C, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    yi, ri = _interpretable(y), _interpretable(residual)
    res = out if yi is y else torch.empty(B, N, C, dtype=yi.dtype, device=y.device)
    per, bc = _rows_and_block_c(C, rows, block_c)
    r_strides = ri.stride() if ri is not None else (0, 0, 0)
    _unmerge_kernel[(triton.cdiv(N, per), B)](
        yi, row_of, ri if ri is not None else yi, res, *yi.stride(), *r_strides, _batch_stride(row_of), N, C,
        ROWS=per, BLOCK_C=bc, HAS_RES=ri is not None, INT64=needs_int64(yi, ri, res, row_of), num_warps=4,
    )
    return out if res is out else out.copy_(res)


def _batch_stride(t: torch.Tensor) -> int:
    # a map of batch 1 serves every batch
    return 0 if t.shape[0] == 1 else t.stride(0)
