"""FramePack's history tokens: multi-rate patchify-and-pack, and the pooled RoPE of packed tokens.

Method: Zhang & Agrawala, "Packing Input Frame Context in Next-Frame Prediction Models for Video
Generation" (arXiv 2504.12626); conventions of diffusers 0.42's
``HunyuanVideoFramepackTransformer3DModel`` (``HunyuanVideoHistoryPatchEmbed``, ``_pad_for_3d_conv``,
``_center_down_sample_3d``, ``_pad_rotary_emb``) and ``HunyuanVideoFramepackRotaryPosEmbed``.

Two kernels, each with its launcher and its plain-PyTorch reference beside it:

- ``patchify_pack``: R history latents (B, C, T_r, H_r, W_r), each patchified by a Conv3d whose
  stride equals its kernel (FramePack's (1,2,2), (2,4,4), (4,8,8)) after replicate padding to a
  kernel multiple, packed into one (B, N + tail, D) buffer. One launch computes every rate: a
  grouped implicit-im2col GEMM. Each program owns a (token tile, D tile) of one rate; the host
  table says which tiles belong to which rate (tiles never straddle rates). The patch elements are
  gathered straight from the latents, with the replicate padding done by clamping indices: no
  padded copy and no im2col buffer exist. fp32 accumulation, bias, one rounding at the store.
- ``rope_pool``: 3-axis rotary cos/sin on the post-patch grid at the given frame indices, replicate
  padded and average-pooled with each rate's token kernel. Each axis's columns depend on that
  axis's coordinate only, so the 3-D window mean equals a 1-D mean over that axis's kernel of
  ``cos(pos * f)`` at clamped positions: the kernel never builds the full-resolution grid.

Up to ``MAX_RATES`` rates go in one launch, their tensors passed as kernel arguments (no device
table: nothing is copied from the host, so the launches can be captured in a CUDA graph); more
rates take one launch per ``MAX_RATES``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import HAVE_TRITON, INTERPRET, needs_int64, next_pow2, tl, triton

MAX_RATES = 4  # rates fused in one launch (FramePack uses three)


def cdiv(a, b):
    """Ceiling division; works on SymInts (fake tensors) too."""
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def pad_replicate(x: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """diffusers' ``_pad_for_3d_conv``: replicate-pad the end of T, H and W of (B, C, T, H, W) up to
    multiples of ``kernel`` (kt, kh, kw)."""
    pads = []
    for n, k in zip(reversed(x.shape[2:]), reversed(tuple(kernel))):
        pads += [0, (k - n % k) % k]
    return F.pad(x, pads, mode="replicate") if any(pads) else x


def patch_tokens(shape: Sequence[int], kernel: Sequence[int]) -> int:
    """Tokens one batch element of a (..., T, H, W) input gives with ``kernel``: the padded grid's size."""
    t, h, w = shape[-3:]
    return cdiv(t, kernel[0]) * cdiv(h, kernel[1]) * cdiv(w, kernel[2])


def patchify_pack_reference(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    tail: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``cat([conv3d(pad_replicate(x_r), w_r, b_r, stride=k_r).flatten(2).transpose(1, 2)] + [empty tail], 1)``.

    Args:
        inputs: R tensors (B, C, T_r, H_r, W_r), any strides; first rounded to the weights' dtype
            (as diffusers casts latents to the transformer's dtype), then computed in ``dtype``.
        weights: R Conv3d weights (D, C, kt, kh, kw), one dtype.
        biases: None, or R entries each (D,) or None.
        tail: rows appended uninitialised (``torch.empty``).
        dtype: compute and output dtype (default: the weights'; float64 for a test oracle).

    Returns:
        (B, N + tail, D) in ``dtype``, N = sum over rates of ceil(T_r/kt) ceil(H_r/kh) ceil(W_r/kw).
        A rate with no tokens (e.g. T_r = 0) contributes nothing.
    """
    wdtype = weights[0].dtype
    dtype = dtype or wdtype
    biases = [None] * len(weights) if biases is None else biases
    B, D = inputs[0].shape[0], weights[0].shape[0]
    parts = []
    for x, w, b in zip(inputs, weights, biases, strict=True):
        k = tuple(w.shape[2:])
        if patch_tokens(x.shape, k) == 0:
            continue  # conv and replicate padding refuse empty inputs; there are no tokens anyway
        x = pad_replicate(x.to(wdtype).to(dtype), k)
        y = F.conv3d(x, w.to(dtype), None if b is None else b.to(dtype), stride=k)
        parts.append(y.flatten(2).transpose(1, 2))
    parts.append(torch.empty((B, tail, D), dtype=dtype, device=weights[0].device))
    return torch.cat(parts, 1)


def rope_freqs(axes_dim: Sequence[int], theta: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each output column's angular frequency, (sum(axes_dim),): for axis a with dim d, columns 2j
    and 2j+1 hold ``1 / theta ** (2j / d)`` computed as diffusers' ``get_1d_rotary_pos_embed`` does
    (in ``dtype``), axes concatenated [t | h | w]."""
    parts = []
    for d in axes_dim:
        f = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=dtype, device=device) / d))
        parts.append(f.repeat_interleave(2))
    return torch.cat(parts)


def rope_pool_reference(
    frame_indices: Sequence[torch.Tensor],
    kernels: Sequence[Sequence[int]],
    height: int,
    width: int,
    axes_dim: Sequence[int],
    theta: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' sequence, rate by rate, then concatenated: ``HunyuanVideoFramepackRotaryPosEmbed``
    (meshgrid of frame indices x arange(height) x arange(width), ``get_1d_rotary_pos_embed(d_a,
    pos, theta, use_real=True)`` per axis), then for a kernel other than (1, 1, 1) ``_pad_rotary_emb``
    (replicate pad to kernel multiples, ``avg_pool3d`` with stride = kernel). In float32 this is
    diffusers' arithmetic; ``dtype=torch.float64`` gives a higher-precision oracle.

    Returns:
        (cos, sin), each (N, sum(axes_dim)) in ``dtype``, N = sum over rates of
        ceil(T_r/kt) ceil(height/kh) ceil(width/kw); rows in (t, h, w) raster order per rate.
    """
    device = frame_indices[0].device
    cos_parts, sin_parts = [], []
    for idx, k in zip(frame_indices, kernels, strict=True):
        if idx.numel() == 0 or height * width == 0:
            continue  # no tokens (and padding refuses empty tensors)
        grid = torch.meshgrid(
            idx.to(device=device, dtype=torch.float32).to(dtype),
            torch.arange(0, height, device=device, dtype=dtype),
            torch.arange(0, width, device=device, dtype=dtype),
            indexing="ij",
        )
        cos, sin = [], []
        for d, pos in zip(axes_dim, grid):
            freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=dtype, device=device) / d))
            ang = torch.outer(pos.reshape(-1), freqs)
            cos.append(ang.cos().repeat_interleave(2, dim=1))
            sin.append(ang.sin().repeat_interleave(2, dim=1))
        cos, sin = torch.cat(cos, 1), torch.cat(sin, 1)
        if tuple(k) != (1, 1, 1):
            pooled = []
            for f in (cos, sin):  # (T*H*W, D) -> (1, D, T, H, W) -> pad -> pool -> (T'*H'*W', D)
                g = f.unsqueeze(0).permute(0, 2, 1).unflatten(2, (-1, height, width))
                g = F.avg_pool3d(pad_replicate(g, k), tuple(k), stride=tuple(k))
                pooled.append(g.flatten(2).permute(0, 2, 1).squeeze(0))
            cos, sin = pooled
        cos_parts.append(cos)
        sin_parts.append(sin)
    if not cos_parts:
        empty = torch.empty((0, sum(axes_dim)), dtype=dtype, device=device)
        return empty, empty.clone()
    return torch.cat(cos_parts, 0), torch.cat(sin_parts, 0)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _patch_tile(
        X, W, Bias, Out, tile, pid_n,
        sx_b, sx_c, sx_t, sx_h, sx_w, sw_d, sw_k, so_b, so_n, so_d,
        T, H, W_, Tp, Hp, Wp, row_off, M, C, D,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        # One (token tile, D tile) of one rate. Rows are (b, t', h', w') flattened over the batch;
        # columns of the implicit im2col matrix are (c, dt, dh, dw), the weight's own order.
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INT64:
            offs_m = offs_m.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
        m_ok = offs_m < M
        n_ok = offs_n < D
        n_tok = Tp * Hp * Wp
        b = offs_m // n_tok
        tok = offs_m % n_tok
        t0 = (tok // (Hp * Wp)) * KT
        h0 = ((tok // Wp) % Hp) * KH
        w0 = (tok % Wp) * KW
        x_row = b * sx_b
        K = C * (KT * KH * KW)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if INT64:
                offs_k = offs_k.to(tl.int64)  # channel * channel-stride may pass 2**31 too
            k_ok = offs_k < K
            c = offs_k // (KT * KH * KW)
            r = offs_k % (KT * KH * KW)
            dt = r // (KH * KW)
            dh = (r // KW) % KH
            dw = r % KW
            # Replicate padding: a patch element past the end reads the last frame / row / column.
            t = tl.minimum(t0[:, None] + dt[None, :], T - 1)
            h = tl.minimum(h0[:, None] + dh[None, :], H - 1)
            w = tl.minimum(w0[:, None] + dw[None, :], W_ - 1)
            x_off = x_row[:, None] + c[None, :] * sx_c + t * sx_t + h * sx_h + w * sx_w
            a = tl.load(X + x_off, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(W + offs_k[:, None] * sw_k + offs_n[None, :] * sw_d,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            # fp32 inputs ask for IEEE products (TF32 would round them to 10 bits); fp16/bf16 products
            # are exact in the fp32 accumulator.
            if IEEE:
                acc = tl.dot(a, bt, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, bt, acc)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_ptrs = Out + b[:, None] * so_b + (row_off + tok)[:, None] * so_n + offs_n[None, :] * so_d
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _patchify_pack_kernel(
        Out, so_b, so_n, so_d, C, D,
        X0, W0, B0, sx0_b, sx0_c, sx0_t, sx0_h, sx0_w, sw0_d, sw0_k, T0, H0, Wd0, Tp0, Hp0, Wp0, off0, M0, end0,
        X1, W1, B1, sx1_b, sx1_c, sx1_t, sx1_h, sx1_w, sw1_d, sw1_k, T1, H1, Wd1, Tp1, Hp1, Wp1, off1, M1, end1,
        X2, W2, B2, sx2_b, sx2_c, sx2_t, sx2_h, sx2_w, sw2_d, sw2_k, T2, H2, Wd2, Tp2, Hp2, Wp2, off2, M2, end2,
        X3, W3, B3, sx3_b, sx3_c, sx3_t, sx3_h, sx3_w, sw3_d, sw3_k, T3, H3, Wd3, Tp3, Hp3, Wp3, off3, M3, end3,
        KT0: tl.constexpr, KH0: tl.constexpr, KW0: tl.constexpr, BIAS0: tl.constexpr,
        KT1: tl.constexpr, KH1: tl.constexpr, KW1: tl.constexpr, BIAS1: tl.constexpr,
        KT2: tl.constexpr, KH2: tl.constexpr, KW2: tl.constexpr, BIAS2: tl.constexpr,
        KT3: tl.constexpr, KH3: tl.constexpr, KW3: tl.constexpr, BIAS3: tl.constexpr,
        NUM_RATES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, INT64: tl.constexpr,
    ):
        # Axis 0 walks the token tiles of every rate, rate after rate (end_r: the first tile past
        # rate r, from the host's tile table); axis 1 the D tiles. Programs next to each other share
        # a weight tile, which stays in L2.
        pid = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid < end0:
            _patch_tile(X0, W0, B0, Out, pid, pid_n, sx0_b, sx0_c, sx0_t, sx0_h, sx0_w, sw0_d, sw0_k, so_b, so_n,
                        so_d, T0, H0, Wd0, Tp0, Hp0, Wp0, off0, M0, C, D, KT0, KH0, KW0, BIAS0,
                        BLOCK_M, BLOCK_N, BLOCK_K, IEEE, INT64)
        if NUM_RATES >= 2:
            if (pid >= end0) & (pid < end1):
                _patch_tile(X1, W1, B1, Out, pid - end0, pid_n, sx1_b, sx1_c, sx1_t, sx1_h, sx1_w, sw1_d, sw1_k,
                            so_b, so_n, so_d, T1, H1, Wd1, Tp1, Hp1, Wp1, off1, M1, C, D, KT1, KH1, KW1, BIAS1,
                            BLOCK_M, BLOCK_N, BLOCK_K, IEEE, INT64)
        if NUM_RATES >= 3:
            if (pid >= end1) & (pid < end2):
                _patch_tile(X2, W2, B2, Out, pid - end1, pid_n, sx2_b, sx2_c, sx2_t, sx2_h, sx2_w, sw2_d, sw2_k,
                            so_b, so_n, so_d, T2, H2, Wd2, Tp2, Hp2, Wp2, off2, M2, C, D, KT2, KH2, KW2, BIAS2,
                            BLOCK_M, BLOCK_N, BLOCK_K, IEEE, INT64)
        if NUM_RATES >= 4:
            if pid >= end2:
                _patch_tile(X3, W3, B3, Out, pid - end2, pid_n, sx3_b, sx3_c, sx3_t, sx3_h, sx3_w, sw3_d, sw3_k,
                            so_b, so_n, so_d, T3, H3, Wd3, Tp3, Hp3, Wp3, off3, M3, C, D, KT3, KH3, KW3, BIAS3,
                            BLOCK_M, BLOCK_N, BLOCK_K, IEEE, INT64)

    @triton.jit
    def _rope_tile(
        Idx, s_idx, Freq, Cos, Sin, tile, T, row_off, H, W,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KMAX: tl.constexpr,
        D_T: tl.constexpr, D_H: tl.constexpr, D_SUM: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
    ):
        Tp = (T + KT - 1) // KT
        Hp = (H + KH - 1) // KH
        Wp = (W + KW - 1) // KW
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        if INT64:
            rows = rows.to(tl.int64)
        ok = rows < Tp * Hp * Wp
        t0 = (rows // (Hp * Wp)) * KT
        h0 = ((rows // Wp) % Hp) * KH
        w0 = (rows % Wp) * KW
        cols = tl.arange(0, BLOCK_C)
        c_ok = cols < D_SUM
        f = tl.load(Freq + cols, mask=c_ok, other=0.0)
        is_t = cols < D_T
        is_h = (cols >= D_T) & (cols < D_T + D_H)
        k_col = tl.where(is_t, KT, tl.where(is_h, KH, KW))
        acc_c = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        acc_s = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(KMAX):
            # The window's j-th position along each axis, clamped: replicate padding. Rows past the
            # grid read a valid (clamped) index and are masked at the store.
            it = tl.minimum(t0 + j, T - 1)
            pos_t = tl.load(Idx + it * s_idx, mask=ok, other=0.0).to(tl.float32)
            pos_h = tl.minimum(h0 + j, H - 1).to(tl.float32)
            pos_w = tl.minimum(w0 + j, W - 1).to(tl.float32)
            pos = tl.where(is_t[None, :], pos_t[:, None], tl.where(is_h[None, :], pos_h[:, None], pos_w[:, None]))
            ang = pos * f[None, :]
            take = (j < k_col)[None, :]
            acc_c += tl.where(take, tl.cos(ang), 0.0)
            acc_s += tl.where(take, tl.sin(ang), 0.0)
        # The mean over the window; correctly rounded as PyTorch's (a plain fp32 "/" is approximate on GPUs).
        kf = k_col.to(tl.float32)[None, :]
        acc_c = tl.math.div_rn(acc_c, kf)
        acc_s = tl.math.div_rn(acc_s, kf)
        o = (row_off + rows)[:, None] * D_SUM + cols[None, :]
        mask = ok[:, None] & c_ok[None, :]
        tl.store(Cos + o, acc_c, mask=mask)
        tl.store(Sin + o, acc_s, mask=mask)

    @triton.jit
    def _rope_pool_kernel(
        Freq, Cos, Sin, H, W,
        I0, si0, T0, off0, end0, I1, si1, T1, off1, end1, I2, si2, T2, off2, end2, I3, si3, T3, off3, end3,
        KT0: tl.constexpr, KH0: tl.constexpr, KW0: tl.constexpr, KM0: tl.constexpr,
        KT1: tl.constexpr, KH1: tl.constexpr, KW1: tl.constexpr, KM1: tl.constexpr,
        KT2: tl.constexpr, KH2: tl.constexpr, KW2: tl.constexpr, KM2: tl.constexpr,
        KT3: tl.constexpr, KH3: tl.constexpr, KW3: tl.constexpr, KM3: tl.constexpr,
        D_T: tl.constexpr, D_H: tl.constexpr, D_SUM: tl.constexpr,
        NUM_RATES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
    ):
        # Axis 0: the row tiles of every rate, rate after rate (end_r from the host's tile table).
        pid = tl.program_id(0)
        if pid < end0:
            _rope_tile(I0, si0, Freq, Cos, Sin, pid, T0, off0, H, W, KT0, KH0, KW0, KM0, D_T, D_H, D_SUM,
                       BLOCK_R, BLOCK_C, INT64)
        if NUM_RATES >= 2:
            if (pid >= end0) & (pid < end1):
                _rope_tile(I1, si1, Freq, Cos, Sin, pid - end0, T1, off1, H, W, KT1, KH1, KW1, KM1, D_T, D_H, D_SUM,
                           BLOCK_R, BLOCK_C, INT64)
        if NUM_RATES >= 3:
            if (pid >= end1) & (pid < end2):
                _rope_tile(I2, si2, Freq, Cos, Sin, pid - end1, T2, off2, H, W, KT2, KH2, KW2, KM2, D_T, D_H, D_SUM,
                           BLOCK_R, BLOCK_C, INT64)
        if NUM_RATES >= 4:
            if pid >= end2:
                _rope_tile(I3, si3, Freq, Cos, Sin, pid - end2, T3, off3, H, W, KT3, KH3, KW3, KM3, D_T, D_H, D_SUM,
                           BLOCK_R, BLOCK_C, INT64)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def tile_table(rows_per_rate: Sequence[int], block: int) -> list[int]:
    """The host tile table: for each rate, the first tile index past it (tiles of ``block`` rows,
    rate after rate; a rate's last tile is partial rather than shared with the next rate)."""
    ends, total = [], 0
    for n in rows_per_rate:
        total += cdiv(n, block)
        ends.append(total)
    return ends


def _groups(items: list) -> list[list]:
    return [items[i:i + MAX_RATES] for i in range(0, len(items), MAX_RATES)]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) on a GPU. Not tuned on hardware yet: tensor-core tiles
# for fp16/bf16; fp32 (IEEE products on FMAs) takes smaller ones to keep registers in budget.
GPU_TILES = {torch.float32: (32, 64, 32, 4, 2), "default": (64, 128, 64, 4, 3)}


def patchify_pack_fwd(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    tail: int = 0,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """The kernel of ``patchify_pack_reference`` (same output, fp32 accumulation, one rounding).
    Inputs must already be validated.

    Args:
        inputs: R tensors (B, C, T_r, H_r, W_r) in the weights' dtype (fp16, bf16 or fp32), any
            strides, one device.
        weights: R tensors (D, C, kt, kh, kw), one dtype; any strides (a weight that is not
            viewable as (D, C*kt*kh*kw) is copied).
        biases: R entries, each (D,) in the weights' dtype or None.
        tail: uninitialised rows after the packed tokens.
        block_m, block_n, block_k: tile sizes (powers of two, at least 16); default from
            ``GPU_TILES`` on a GPU, large under the interpreter (fewer tiles run faster there).

    Returns:
        (B, N + tail, D) contiguous, the weights' dtype; rows [0, N) written, rate after rate.
    """
    B, C = inputs[0].shape[:2]
    D, dtype = weights[0].shape[0], weights[0].dtype
    kernels = [tuple(w.shape[2:]) for w in weights]
    tokens = [patch_tokens(x.shape, k) for x, k in zip(inputs, kernels)]
    out = torch.empty((B, sum(tokens) + tail, D), dtype=dtype, device=weights[0].device)
    rates, off = [], 0
    for x, w, b, k, n in zip(inputs, weights, biases, kernels, tokens):
        if n and B:
            rates.append((x, w.reshape(D, -1), b, k, n, off))
        off += n
    if not rates or D == 0:
        return out
    if INTERPRET and dtype == torch.bfloat16:
        # bf16 is wrong in the interpreter (ENGINEERING.md): fp32 holds every bf16 value exactly and
        # the kernel accumulates in fp32 anyway, so the result is the one a GPU gives.
        res = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        rates = [(x.float(), w.float(), None if b is None else b.float(), k, n, o) for x, w, b, k, n, o in rates]
    else:
        res = out
    if res.device.type == "cuda" and not INTERPRET:
        bm, bn, bk, warps, stages = GPU_TILES.get(dtype, GPU_TILES["default"])
        extra = dict(num_warps=warps, num_stages=stages)
    else:  # interpreter: cost grows with the number of tiles, so take them large
        bm = min(128, max(16, next_pow2(max(B * r[4] for r in rates))))
        bn = min(128, max(16, next_pow2(D)))
        bk = min(256, max(16, next_pow2(max(C * r[3][0] * r[3][1] * r[3][2] for r in rates))))
        extra = {}
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    int64 = needs_int64(res, *(t for r in rates for t in r[:2]))
    for group in _groups(rates):
        ends = tile_table([B * r[4] for r in group], bm)
        slots, meta = [], {}
        for i, (x, w, b, k, n, o) in enumerate(group + [group[0]] * (MAX_RATES - len(group))):
            real = i < len(group)
            Tp, Hp, Wp = (cdiv(s, kk) for s, kk in zip(x.shape[2:], k))
            slots += [x, w, b if b is not None else w, *x.stride(), *w.stride(), *x.shape[2:], Tp, Hp, Wp, o,
                      B * n if real else 0, ends[i] if real else ends[-1]]
            k = k if real else (1, 1, 1)  # unused slots: fixed constexprs, no extra specialisations
            meta.update({f"KT{i}": k[0], f"KH{i}": k[1], f"KW{i}": k[2], f"BIAS{i}": real and b is not None})
        _patchify_pack_kernel[(ends[-1], triton.cdiv(D, bn))](
            res, *res.stride(), C, D, *slots, **meta, NUM_RATES=len(group), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            IEEE=res.dtype == torch.float32, INT64=int64, **extra,
        )
    return out if res is out else out.copy_(res)


def rope_pool_fwd(
    frame_indices: Sequence[torch.Tensor],
    kernels: Sequence[Sequence[int]],
    height: int,
    width: int,
    axes_dim: Sequence[int],
    freqs: torch.Tensor,
    *,
    block_r: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel of ``rope_pool_reference``: every row of every rate in one launch (per
    ``MAX_RATES`` rates). Inputs must already be validated.

    Args:
        frame_indices: R 1-D tensors (T_r,) of frame positions, fp32 (any stride), one device.
        kernels: R triples (kt, kh, kw) of positive ints, in post-patch grid units.
        height, width: the post-patch grid.
        axes_dim: (d_t, d_h, d_w), even.
        freqs: (sum(axes_dim),) fp32, each column's frequency (``rope_freqs``).
        block_r: rows per program (a power of two); default 64 on a GPU, 128 under the interpreter.

    Returns:
        (cos, sin): each (N, sum(axes_dim)) fp32, contiguous.
    """
    d_sum = sum(axes_dim)
    device = freqs.device
    rows = [patch_tokens((int(i.shape[0]), height, width), k) for i, k in zip(frame_indices, kernels)]
    cos = torch.empty((sum(rows), d_sum), dtype=torch.float32, device=device)
    sin = torch.empty_like(cos)
    rates, off = [], 0
    for idx, k, n in zip(frame_indices, kernels, rows):
        if n:
            rates.append((idx, tuple(int(v) for v in k), n, off))
        off += n
    if not rates:
        return cos, sin
    br = block_r or (128 if INTERPRET else 64)
    bc = max(16, next_pow2(d_sum))
    extra = {} if INTERPRET else {"num_warps": 4 if br * bc <= 8192 else 8}
    int64 = needs_int64(cos)
    for group in _groups(rates):
        ends = tile_table([r[2] for r in group], br)
        slots, meta = [], {}
        for i, (idx, k, n, o) in enumerate(group + [group[0]] * (MAX_RATES - len(group))):
            real = i < len(group)
            slots += [idx, idx.stride(0), idx.shape[0], o, ends[i] if real else ends[-1]]
            k = k if real else (1, 1, 1)  # unused slots: fixed constexprs, no extra specialisations
            meta.update({f"KT{i}": k[0], f"KH{i}": k[1], f"KW{i}": k[2], f"KM{i}": max(k)})
        _rope_pool_kernel[(ends[-1],)](
            freqs, cos, sin, height, width, *slots, **meta, D_T=axes_dim[0], D_H=axes_dim[1], D_SUM=d_sum,
            NUM_RATES=len(group), BLOCK_R=br, BLOCK_C=bc, INT64=int64, **extra,
        )
    return cos, sin
