"""Attention forward with cached K/V segments, FlashAttention-2 style.

Layout is that of ``F.scaled_dot_product_attention``: q (B, H, Nq, D), k/v (B, H, Nk, D). Keys come
in segments: the main ``k, v`` and up to ``MAX_EXTRA`` extra ``(k_i, v_i)`` pairs, each
(B or 1, H, N_i, D), attended after the main keys *as if concatenated*, but read in place by one
launch. Every segment has an additive logit bias. Any tensor may be strided; a batch dimension of
1 broadcasts (stride 0), so one cached condition serves both halves of a CFG pair.

A query row with no admissible key (every segment empty, or dropped by a ``-inf`` bias) gets
out = 0, as PyTorch's ``F.scaled_dot_product_attention`` gives for a fully masked row (torch 2.5+),
and lse = -inf, the log of an empty sum (``torch.logsumexp`` over nothing); ``merge_partials``
gives such a part weight 0. The kernel, the reference and the merge all follow this.

Three layers here, nothing else: the ``@triton.jit`` kernel, the launcher ``attention_fwd`` that
picks tiles and grid, and the float64 reference ``attention_reference``. ``merge_partials`` merges
partial results of disjoint key sets through their log-sum-exp (more than ``MAX_EXTRA`` segments,
or attention split across devices).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ._common import HAVE_TRITON, INTERPRET, autotune_enabled, needs_int64, next_pow2, tl, triton

MAX_EXTRA = 4  # extra segments fused in one launch; more are merged through the LSE
LOG2E = 1.4426950408889634
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    extra_bias: Sequence[float] = (),
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention over concatenated segments, computed in ``dtype``.

    Returns ``(out, lse)``: out (B, H, Nq, D) in ``dtype``, lse (B, H, Nq) natural-log
    log-sum-exp of the scaled, biased logits. Materialises the full (Nq, Nk) logits. A row with no
    admissible key (no keys, or every logit -inf) gets out 0 and lse -inf (see the module doc).
    """
    B = q.shape[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys, values, biases = [k], [v], [0.0]
    for (ki, vi), bi in zip(extra_kv, extra_bias, strict=True):
        keys.append(ki)
        values.append(vi)
        biases.append(float(bi))
    qf = q.to(dtype)
    logits, vs = [], []
    for ki, vi, bi in zip(keys, values, biases, strict=True):
        ki = ki.to(dtype).expand(B, -1, -1, -1)
        vs.append(vi.to(dtype).expand(B, -1, -1, -1))
        logits.append(qf @ ki.transpose(-1, -2) * scale + bi)
    s = torch.cat(logits, dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1) @ torch.cat(vs, dim=-2)
    # softmax of an all -inf row is NaN; PyTorch's SDPA returns 0 there, and so does the kernel
    out = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, out)
    return out, lse


def merge_partials(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets: ``out = sum_i exp(lse_i - lse) * out_i``.

    outs: each (B, H, Nq, D); lses: each (B, H, Nq) float32. Returns (out in outs[0].dtype, lse).
    A part with no admissible key for a row (lse -inf there) has weight 0; a row with none in any
    part gets out 0 and lse -inf, as the kernel gives. NaN in a part's out or lse propagates.
    """
    lse = torch.stack([x.float() for x in lses]).logsumexp(dim=0)
    acc = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for o, l in zip(outs, lses, strict=True):
        # exp(-inf - lse) is NaN where lse is -inf too: such a part weighs 0. Only -inf is zeroed,
        # so a NaN lse (NaN inputs) still poisons the row as it does the reference.
        w = torch.where(torch.isneginf(l), 0.0, torch.exp(l.float() - lse))
        acc += w.unsqueeze(-1) * o.float()
    return acc.to(outs[0].dtype), lse


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _attend_block(
        acc, m_i, l_i, q, k_ptrs, v_ptrs, ks_ptrs, vs_ptrs, start, n_keys, bias, qk_scale, offs_n, d_mask,
        MASK_N: tl.constexpr, MASK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
    ):
        # One BLOCK_N tile of keys: online softmax in the log2 domain, running max m_i and sum l_i
        # (fp32). Full tiles skip the key mask, and power-of-two head dims the channel mask: masks
        # in the inner loop cost ALU time and keep loads from vectorising.
        col_ok = (start + offs_n) < n_keys
        if MASK_N and MASK_D:
            k = tl.load(k_ptrs, mask=col_ok[None, :] & d_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_mask[None, :], other=0.0)
        elif MASK_N:
            k = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        elif MASK_D:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if QUANT:
            # fp8 keys/values with one scale per key. Keys: QK runs on the fp8 values (exact in q's
            # dtype) and the key scale multiplies the fp32 logit column, exact to fp32. Values are
            # dequantized here, in fp32 then rounded once to q's dtype, as dequantize_fp8 rounds
            # them: scaling p by the value scale instead underflows when the product is cast to fp16
            # for the PV dot (|v| ~ 1e-4 gave 0.3 relative error; dequantize + SDPA 7e-4).
            if MASK_N:
                ks = tl.load(ks_ptrs, mask=col_ok, other=0.0)
                vs = tl.load(vs_ptrs, mask=col_ok, other=0.0)
            else:
                ks = tl.load(ks_ptrs)
                vs = tl.load(vs_ptrs)
            k = k.to(q.dtype)
            v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION)
        if QUANT:
            qk = qk * ks[None, :]
        qk = qk * qk_scale + bias
        if MASK_N:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _attend_segment(
        acc, m_i, l_i, q,
        K, V, k_off, v_off, s_kn, s_kd, s_vn, s_vd,
        KS, VS, s_off,
        n_keys, bias, qk_scale,
        offs_d, d_mask,
        BLOCK_N: tl.constexpr, MASK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, QUANT: tl.constexpr,
        INT64: tl.constexpr,
    ):
        # One key segment, read in place: full tiles unmasked, then the tail tile masked. With
        # QUANT, KS/VS hold one fp32 scale per key, contiguous along the keys.
        offs_n = tl.arange(0, BLOCK_N)
        step_k = BLOCK_N * s_kn
        step_v = BLOCK_N * s_vn
        if INT64:
            offs_n = offs_n.to(tl.int64)
            step_k = tl.cast(s_kn, tl.int64) * BLOCK_N
            step_v = tl.cast(s_vn, tl.int64) * BLOCK_N
        k_ptrs = K + k_off + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd
        v_ptrs = V + v_off + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd
        ks_ptrs = KS + s_off + offs_n
        vs_ptrs = VS + s_off + offs_n
        n_full = (n_keys // BLOCK_N) * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, ks_ptrs, vs_ptrs, start, n_keys, bias,
                                          qk_scale, offs_n, d_mask, False, MASK_D, INPUT_PRECISION, QUANT)
            k_ptrs += step_k
            v_ptrs += step_v
            ks_ptrs += BLOCK_N
            vs_ptrs += BLOCK_N
        if n_full < n_keys:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, ks_ptrs, vs_ptrs, n_full, n_keys, bias,
                                          qk_scale, offs_n, d_mask, True, MASK_D, INPUT_PRECISION, QUANT)
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd(
        Q, K0, V0, K1, V1, K2, V2, K3, V3, K4, V4, Out, Lse,
        KS1, VS1, KS2, VS2, KS3, VS3, KS4, VS4,  # fp8 segments' per-key scales (B or 1, H, N_i)
        # strides (batch, head, token, dim); a broadcast batch has stride 0
        sq_b, sq_h, sq_n, sq_d,
        so_b, so_h, so_n, so_d,
        sk0_b, sk0_h, sk0_n, sk0_d, sv0_b, sv0_h, sv0_n, sv0_d,
        sk1_b, sk1_h, sk1_n, sk1_d, sv1_b, sv1_h, sv1_n, sv1_d,
        sk2_b, sk2_h, sk2_n, sk2_d, sv2_b, sv2_h, sv2_n, sv2_d,
        sk3_b, sk3_h, sk3_n, sk3_d, sv3_b, sv3_h, sv3_n, sv3_d,
        sk4_b, sk4_h, sk4_n, sk4_d, sv4_b, sv4_h, sv4_n, sv4_d,
        ss1_b, ss1_h, ss2_b, ss2_h, ss3_b, ss3_h, ss4_b, ss4_h,  # scale strides (keys: 1)
        N0, N1, N2, N3, N4,
        bias0, bias1, bias2, bias3, bias4,  # log2 units
        H, N_Q, qk_scale,  # qk_scale = scale * log2(e)
        BUCKET_Q, BUCKET_K,  # autotune keys only
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_EXTRA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        QUANT1: tl.constexpr, QUANT2: tl.constexpr, QUANT3: tl.constexpr, QUANT4: tl.constexpr,
        INT64: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        if INT64:
            # Some tensor spans 2**31 elements or more (long video): index * stride products
            # would wrap in int32. The launcher decides (kernels/_common.needs_int64).
            b = b.to(tl.int64)
            h = h.to(tl.int64)
            offs_m = offs_m.to(tl.int64)
            offs_d = offs_d.to(tl.int64)
        d_mask = offs_d < HEAD_DIM
        row_ok = offs_m < N_Q

        q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, K0, V0, b * sk0_b + h * sk0_h, b * sv0_b + h * sv0_h,
            sk0_n, sk0_d, sv0_n, sv0_d, Lse, Lse, 0, N0, bias0, qk_scale, offs_d, d_mask, BLOCK_N, HEAD_DIM != BLOCK_D,
            INPUT_PRECISION, False, INT64)
        if NUM_EXTRA >= 1:
            acc, m_i, l_i = _attend_segment(
                acc, m_i, l_i, q, K1, V1, b * sk1_b + h * sk1_h, b * sv1_b + h * sv1_h,
                sk1_n, sk1_d, sv1_n, sv1_d, KS1, VS1, b * ss1_b + h * ss1_h, N1, bias1, qk_scale,
                offs_d, d_mask, BLOCK_N, HEAD_DIM != BLOCK_D, INPUT_PRECISION, QUANT1, INT64)
        if NUM_EXTRA >= 2:
            acc, m_i, l_i = _attend_segment(
                acc, m_i, l_i, q, K2, V2, b * sk2_b + h * sk2_h, b * sv2_b + h * sv2_h,
                sk2_n, sk2_d, sv2_n, sv2_d, KS2, VS2, b * ss2_b + h * ss2_h, N2, bias2, qk_scale,
                offs_d, d_mask, BLOCK_N, HEAD_DIM != BLOCK_D, INPUT_PRECISION, QUANT2, INT64)
        if NUM_EXTRA >= 3:
            acc, m_i, l_i = _attend_segment(
                acc, m_i, l_i, q, K3, V3, b * sk3_b + h * sk3_h, b * sv3_b + h * sv3_h,
                sk3_n, sk3_d, sv3_n, sv3_d, KS3, VS3, b * ss3_b + h * ss3_h, N3, bias3, qk_scale,
                offs_d, d_mask, BLOCK_N, HEAD_DIM != BLOCK_D, INPUT_PRECISION, QUANT3, INT64)
        if NUM_EXTRA >= 4:
            acc, m_i, l_i = _attend_segment(
                acc, m_i, l_i, q, K4, V4, b * sk4_b + h * sk4_h, b * sv4_b + h * sv4_h,
                sk4_n, sk4_d, sv4_n, sv4_d, KS4, VS4, b * ss4_b + h * ss4_h, N4, bias4, qk_scale,
                offs_d, d_mask, BLOCK_N, HEAD_DIM != BLOCK_D, INPUT_PRECISION, QUANT4, INT64)

        # A row with no admissible key (every segment empty or dropped) has l = 0, acc = 0 and
        # m = -inf: dividing by 1 instead gives out 0, as PyTorch's SDPA gives a fully masked row
        # (not 0/0), and lse = m = -inf, the log of an empty sum.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptrs = Out + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
        # natural-log LSE: (m + log2 l) * ln 2
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        tl.store(Lse + (b * H + h) * N_Q + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, warps, stages). Checked without a GPU by bench/aot_check.py: on sm_90 fp16
# and bf16 compile to wgmma with no register spills for D <= 128; for D = 256 (SD 1.5's head dim
# 160 pads to it) 64x32 is spill-free on sm_90 and 32x32 nearly so on sm_80. fp32 (IEEE) runs on
# FMAs and spills with every tile; 32x32 spills least.
# fp8 segments convert each K/V tile to q's dtype in registers (values through fp32, to apply their
# scale before rounding): on sm_90 at D = 128 only 128x32 (8 warps, 3 stages) stays spill-free
# (241 registers; 128x64 spills 192 B). INT64 (tensors past 2**31 elements) keeps the fixed
# configs spill-free on sm_90.
GPU_CONFIGS = [
    (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2),
    (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (128, 32, 8, 3),
]


def fixed_config(block_d: int, dtype: torch.dtype, capability: tuple[int, int] = (9, 0),
                 fp8: bool = False) -> tuple[int, int, int, int]:
    """The config used on a GPU when autotuning is off (FASTGEN_AUTOTUNE=0); ``fp8``: some
    segment is e4m3."""
    if dtype == torch.float32:
        return (32, 32, 4, 2)
    if block_d <= 128:
        return (128, 32, 8, 3) if fp8 else (128, 64, 8, 3)
    return (64, 32, 4, 2) if capability[0] >= 9 else (32, 32, 4, 2)


def _gpu_configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in GPU_CONFIGS]


def _prune_configs(configs, named_args, **kwargs):
    # Large head dims need small tiles: keep q, k, v tiles and the fp32 accumulator in budget.
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] * d <= 128 * 128 and c.kwargs["BLOCK_N"] * d <= 128 * 128]
    return keep or configs[-2:]


_autotuned = None


def _kernel_for(device: torch.device):
    """The plain kernel under the interpreter; an autotuned one on a GPU."""
    global _autotuned
    if device.type != "cuda" or not autotune_enabled():
        return None
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=_gpu_configs(),
            key=["BUCKET_Q", "BUCKET_K", "HEAD_DIM", "NUM_EXTRA", "INPUT_PRECISION", "QUANT1", "QUANT2", "QUANT3",
                 "QUANT4", "INT64"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_attn_fwd)
    return _autotuned


def _strides(t: torch.Tensor, batch: int) -> list[int]:
    s = list(t.stride())
    if t.shape[0] == 1 and batch != 1:
        s[0] = 0  # broadcast over the batch
    return s


def _launch(q, segments, scale, out, lse, input_precision, config=None):
    """One launch over up to MAX_EXTRA + 1 segments, each (k, v, bias, k_scale, v_scale) with
    scales None unless k/v are fp8. ``config`` (BLOCK_M, BLOCK_N, warps, stages) forces a tile
    config: on a GPU all four; under the interpreter the tiles (it has no warps or stages), so
    tests check every autotune candidate's tiling on a CPU too."""
    B, H, Nq, D = q.shape
    num_extra = len(segments) - 1
    block_d = max(16, next_pow2(D))
    pad = segments + [segments[0]] * (MAX_EXTRA + 1 - len(segments))
    ptrs, strides, lens, biases, scale_ptrs, scale_strides, quant = [], [], [], [], [], [], []
    for i, (k, v, bias, ks, vs) in enumerate(pad):
        ptrs += [k, v]
        strides += _strides(k, B) + _strides(v, B)
        lens.append(k.shape[2] if i <= num_extra else 0)
        biases.append(float(bias) * LOG2E if i <= num_extra else 0.0)
        if i == 0:
            continue
        q8 = ks is not None and i <= num_extra
        scale_ptrs += [ks, vs] if q8 else [lse, lse]
        scale_strides += _strides(ks, B)[:2] if q8 else [0, 0]
        quant.append(q8)
    n_keys = sum(lens)
    int64 = needs_int64(q, out, lse, *(t for seg in segments for t in (seg[0], seg[1], seg[3], seg[4])))
    args = (
        q, *ptrs, out, lse, *scale_ptrs,
        *q.stride(), *out.stride(), *strides, *scale_strides, *lens, *biases,
        H, Nq, scale * LOG2E, next_pow2(Nq), next_pow2(n_keys),
    )
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, NUM_EXTRA=num_extra, INPUT_PRECISION=input_precision,
                QUANT1=quant[0], QUANT2=quant[1], QUANT3=quant[2], QUANT4=quant[3], INT64=int64)
    tuned = _kernel_for(q.device) if config is None else None
    if tuned is not None:
        grid = lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)  # noqa: E731
        tuned[grid](*args, **meta)
        return
    if q.device.type == "cuda":  # autotuning switched off, or a forced config
        bm, bn, warps, stages = config or fixed_config(block_d, q.dtype, torch.cuda.get_device_capability(q.device),
                                                       any(quant))
        extra = dict(num_warps=warps, num_stages=stages)
    elif config is not None:  # interpreter, forced tiles
        bm, bn = config[:2]
        extra = {}
    else:  # interpreter: cost grows with the number of tiles, so take them large
        bm = min(128, max(16, next_pow2(Nq)))
        bn = min(128, max(16, next_pow2(max(lens[: num_extra + 1]))))
        extra = {}
    _attn_fwd[(triton.cdiv(Nq, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta, **extra)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: Sequence[torch.Tensor] = (),
    extra_v: Sequence[torch.Tensor] = (),
    extra_bias: Sequence[float] = (),
    scale: float | None = None,
    extra_k_scale: Sequence[torch.Tensor | None] | None = None,
    extra_v_scale: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton attention forward over segments. Inputs must already be validated.

    q (B, H, Nq, D); k/v and each extra pair (B or 1, H, N_i, D), one dtype (fp16, bf16, fp32),
    any strides; D in [16, 256]; k/v and any extra segment may have no keys. extra_bias: one float
    per extra segment (finite or -inf, which drops it). Rows with no admissible key get out 0 and
    lse -inf (module doc).
    An extra pair may instead be fp8 e4m3 with per-key scales ``extra_k_scale[i]`` and
    ``extra_v_scale[i]`` (B or 1, H, N_i) fp32, contiguous along N (``kernels/fp8.py``).
    Returns ``(out, lse)``: out like q (same dtype, same memory layout when q is dense),
    lse (B, H, Nq) float32, natural log.
    """
    B, H, Nq, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    n = len(extra_k)
    extra_k_scale = list(extra_k_scale) if extra_k_scale is not None else [None] * n
    extra_v_scale = list(extra_v_scale) if extra_v_scale is not None else [None] * n
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if Nq == 0:
        return out, lse

    # A -inf bias removes its segment: exp(-inf) = 0 weight, so skip the reads altogether.
    segments = [(k, v, 0.0, None, None)] + [
        (ki, vi, bi, ksi, vsi)
        for ki, vi, bi, ksi, vsi in zip(extra_k, extra_v, extra_bias, extra_k_scale, extra_v_scale, strict=True)
        if ki.shape[2] > 0 and bi != -math.inf
    ]
    if q.dtype == torch.float32:
        # Honour PyTorch's TF32 switch, as SDPA does; IEEE by default.
        precision = "tf32" if (q.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        precision = None

    if INTERPRET and q.dtype == torch.bfloat16:
        # The interpreter stores bf16 as uint16 and computes garbage: run it in fp32 there (fp8
        # segments stay fp8: the interpreter converts those exactly).
        def up(t):
            return t.float() if t.dtype == torch.bfloat16 else t

        o32, lse = attention_fwd(
            q.float(), k.float(), v.float(), [up(t) for t in extra_k], [up(t) for t in extra_v],
            list(extra_bias), scale, extra_k_scale, extra_v_scale,
        )
        out.copy_(o32)
        return out, lse

    chunks = [segments[: MAX_EXTRA + 1]]
    rest = segments[MAX_EXTRA + 1 :]
    while rest:
        chunks.append(rest[: MAX_EXTRA + 1])
        rest = rest[MAX_EXTRA + 1 :]
    if len(chunks) == 1:
        _launch(q, chunks[0], scale, out, lse, precision)
        return out, lse
    outs, lses = [], []
    for chunk in chunks:
        o = torch.empty_like(q, dtype=torch.float32)  # partials merge in fp32
        l = torch.empty_like(lse)
        _launch(q, _main_first(chunk, q.dtype), scale, o, l, precision)
        outs.append(o)
        lses.append(l)
    merged, lse_all = merge_partials(outs, lses)
    out.copy_(merged)
    lse.copy_(lse_all)
    return out, lse


def _main_first(chunk, dtype):
    """The kernel's first segment is never fp8: lead a chunk with a plain segment, or, when every
    segment of the chunk is fp8, with the first one dequantized into ``dtype`` (a small copy)."""
    if chunk[0][3] is None:
        return chunk
    for i, seg in enumerate(chunk):
        if seg[3] is None:
            return [seg] + chunk[:i] + chunk[i + 1 :]
    from .fp8 import dequantize_fp8

    k, v, bias, ks, vs = chunk[0]
    return [(dequantize_fp8(k, ks, dtype), dequantize_fp8(v, vs, dtype), bias, None, None)] + chunk[1:]
