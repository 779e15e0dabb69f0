"""The attention prologue: RMS-norm of q and k, then rotary embedding, in one pass.

Every Flux / SD3 / Wan / HunyuanVideo attention runs ``norm_q, norm_k`` and then RoPE before the
attention itself: four or more elementwise passes over q and k in PyTorch. Here one program reads
a token's row of every head once, normalises it (per head, or over all heads as Wan does), rotates
it and writes it in the (B, H, S, D) layout the attention kernel reads.

Conventions (those of diffusers):
- norm ``"head"``: RMS over D of each head; ``"all"``: RMS over H*D of the token; ``None``: none.
  ``y = x * rsqrt(mean(x^2) + eps) * weight``; weight (D,) for "head", (H*D,) for "all", or None.
- rope ``"interleaved"``: pairs (2i, 2i+1) (Flux, HunyuanVideo, Wan);
  ``"half"``: pairs (i, i + D/2). ``out = y * cos + rotate(y) * sin``, rotate(y) of a pair (a, b)
  is (-b, a). cos/sin are (S_rope, D/2), one entry per pair, fp32; the first S_rope tokens are
  rotated, the rest (e.g. HunyuanVideo's trailing text tokens) are only normalised.

The kernel computes in fp32 and rounds once at the end; diffusers rounds after the norm too, so
the two differ by at most one rounding of the output dtype. Outputs are written where the caller
says (any strides): e.g. text and image tokens, normalised with different weights, straight into
the slices of one joint buffer. In place (an output *is* its input, the same view) is safe for
every norm, rope mode and D; outputs that overlap the inputs any other way are the caller's to
avoid (``fastgen.ops.qk_norm_rope`` computes those into temporaries).
"""

from __future__ import annotations

import torch

from ._common import HAVE_TRITON, INTERPRET, needs_int64, next_pow2, same_storage, tl, triton

# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _rope_partner(d: int, rope: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = torch.arange(d)
    if rope == "interleaved":
        return idx ^ 1, idx // 2, torch.where(idx % 2 == 0, -1.0, 1.0)
    half = d // 2
    return (idx + half) % d, idx % half, torch.where(idx < half, -1.0, 1.0)


def empty_like_bshd(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (B, H, S, D) tensor laid out as (B, S, H, D): attention reads it in place
    and its output flattens to (B, S, H*D) for the out-projection without a copy."""
    B, H, S, D = x.shape
    return torch.empty((B, S, H, D), dtype=dtype or x.dtype, device=x.device).transpose(1, 2)


def qk_norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float = 1e-6,
    norm: str | None = "head",
    rope: str | None = "interleaved",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Prologue of one tensor in ``dtype``. x (B, H, S, D) any strides -> (B, H, S, D) contiguous."""
    B, H, S, D = x.shape
    y = x.to(dtype)
    if norm == "head":
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight.to(dtype)
    elif norm == "all":
        t = y.transpose(1, 2).reshape(B, S, H * D)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            t = t * weight.to(dtype)
        y = t.reshape(B, S, H, D).transpose(1, 2)
    if rope is not None:
        n = cos.shape[0]
        partner, pair, sign = (t.to(y.device) for t in _rope_partner(D, rope))
        c = cos.to(dtype)[:, pair]
        s = sin.to(dtype)[:, pair]
        head = y[:, :, :n]
        rot = head[..., partner] * sign.to(dtype)
        y = torch.cat([head * c + rot * s, y[:, :, n:]], dim=2)
    return y.contiguous()


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _token_prologue(
        X, W, COS, SIN, OUT, b, s,
        sx_b, sx_h, sx_s, sx_d, so_b, so_h, so_s, so_d, sc_s, sc_d, ss_s, ss_d,
        H, S_ROPE, eps,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROPE: tl.constexpr,
        INT64: tl.constexpr, IN_PLACE: tl.constexpr,
    ):
        # NORM: 0 none, 1 per head, 2 over all heads. ROPE: 0 none, 1 interleaved, 2 half.
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        if INT64:
            # a tensor spans 2**31 elements or more: head * stride would wrap in int32
            offs_h = offs_h.to(tl.int64)
            offs_d = offs_d.to(tl.int64)
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < HEAD_DIM)
        base = X + b * sx_b + s * sx_s
        x = tl.load(base + offs_h[:, None] * sx_h + offs_d[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)

        if ROPE == 1:
            partner = offs_d ^ 1
            pair = offs_d // 2
            sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        else:
            partner = (offs_d + HEAD_DIM // 2) % HEAD_DIM
            pair = offs_d % (HEAD_DIM // 2)
            sign = tl.where(offs_d < HEAD_DIM // 2, -1.0, 1.0)
        if ROPE != 0:
            # The partner element is in the same row (cache-hot); normalise it the same way.
            xp = tl.load(base + offs_h[:, None] * sx_h + partner[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)

        if NORM == 1:
            rstd = tl.math.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]
        elif NORM == 2:
            rstd = tl.math.rsqrt(tl.sum(tl.sum(x * x, 1), 0) / (H * HEAD_DIM) + eps)
        else:
            rstd = 1.0
        y = x * rstd
        if ROPE != 0:
            yp = xp * rstd
        if HAS_WEIGHT:
            if NORM == 1:
                w = tl.load(W + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
                y = y * w
                if ROPE != 0:
                    yp = yp * tl.load(W + partner, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
            else:
                w_idx = offs_h[:, None] * HEAD_DIM + offs_d[None, :]
                y = y * tl.load(W + w_idx, mask=mask, other=0.0).to(tl.float32)
                if ROPE != 0:
                    wp_idx = offs_h[:, None] * HEAD_DIM + partner[None, :]
                    yp = yp * tl.load(W + wp_idx, mask=mask, other=0.0).to(tl.float32)
        if ROPE != 0:
            if s < S_ROPE:
                c = tl.load(COS + s * sc_s + pair * sc_d, mask=offs_d < HEAD_DIM, other=0.0)
                sn = tl.load(SIN + s * ss_s + pair * ss_d, mask=offs_d < HEAD_DIM, other=0.0)
                y = y * c[None, :] + yp * (sign * sn)[None, :]

        if IN_PLACE:
            # OUT is X: the element a thread stores may be the RoPE partner another thread (another
            # warp) has yet to load. Every load of the row completes before any store.
            tl.debug_barrier()
        o_ptrs = OUT + b * so_b + s * so_s + offs_h[:, None] * so_h + offs_d[None, :] * so_d
        tl.store(o_ptrs, y.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_fwd(
        Q, K, WQ, WK, COS, SIN, OQ, OK,
        sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d,
        soq_b, soq_h, soq_s, soq_d, sok_b, sok_h, sok_s, sok_d,
        sc_s, sc_d, ss_s, ss_d,
        H, S, S_ROPE, eps,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROPE: tl.constexpr,
        INT64: tl.constexpr, IN_PLACE: tl.constexpr,
    ):
        # One program per token; axis 1 picks q or k, so both are done by one launch.
        pid = tl.program_id(0)
        if INT64:
            pid = pid.to(tl.int64)
        b = pid // S
        s = pid % S
        if tl.program_id(1) == 0:
            _token_prologue(Q, WQ, COS, SIN, OQ, b, s, sq_b, sq_h, sq_s, sq_d, soq_b, soq_h, soq_s, soq_d,
                            sc_s, sc_d, ss_s, ss_d, H, S_ROPE, eps, HEAD_DIM, BLOCK_H, BLOCK_D, NORM, HAS_WEIGHT, ROPE,
                            INT64, IN_PLACE)
        else:
            _token_prologue(K, WK, COS, SIN, OK, b, s, sk_b, sk_h, sk_s, sk_d, sok_b, sok_h, sok_s, sok_d,
                            sc_s, sc_d, ss_s, ss_d, H, S_ROPE, eps, HEAD_DIM, BLOCK_H, BLOCK_D, NORM, HAS_WEIGHT, ROPE,
                            INT64, IN_PLACE)


# Modes by name and their integer codes, shared by this kernel and the CUDA extension (csrc/qk_norm_rope.h).
NORM_CODES = {None: 0, "head": 1, "all": 2}
ROPE_CODES = {None: 0, "interleaved": 1, "half": 2}


def qk_norm_rope_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    norm: str | None,
    rope: str | None,
    out_q: torch.Tensor,
    out_k: torch.Tensor,
) -> None:
    """Triton prologue of q and k in one launch, written into ``out_q``/``out_k``. Inputs must
    already be validated.

    q, k, out_q, out_k: (B, H, S, D), one shape and dtype, any strides (outputs may be slices of a
    larger buffer). q_weight/k_weight: both None or both given, (D,) or (H*D,) per ``norm``.
    cos/sin: (S_rope, D/2) float32, S_rope <= S, or None. ``out_q`` may be ``q`` itself and
    ``out_k`` ``k`` (in place); no other overlap between outputs and inputs is allowed.
    """
    B, H, S, D = q.shape
    if q.numel() == 0:
        return
    if INTERPRET and q.dtype == torch.bfloat16:  # bf16 is wrong in the interpreter: compute in fp32
        oq32, ok32 = torch.empty(q.shape, dtype=torch.float32), torch.empty(k.shape, dtype=torch.float32)
        qk_norm_rope_fwd(q.float(), k.float(), q_weight, k_weight, cos, sin, eps, norm, rope, oq32, ok32)
        out_q.copy_(oq32)
        out_k.copy_(ok32)
        return
    has_w = q_weight is not None
    if INTERPRET and has_w:  # bf16 weights would be misread there too
        q_weight, k_weight = q_weight.float(), k_weight.float()
    wq = q_weight if has_w else q
    wk = k_weight if has_w else k
    if rope is None:
        cos = sin = q.new_empty((1, 1), dtype=torch.float32)
    block_h, block_d = next_pow2(H), max(2, next_pow2(D))
    warps = 4 if block_h * block_d <= 2048 else 8 if block_h * block_d <= 8192 else 16
    extra = {} if INTERPRET else {"num_warps": warps}
    # In place, a program's stores must wait for all of its loads (IN_PLACE adds one barrier):
    # only then, when the caller passed the input itself as the output.
    in_place = same_storage(out_q, q) or same_storage(out_k, k)
    _qk_norm_rope_fwd[(B * S, 2)](
        q, k, wq, wk, cos, sin, out_q, out_k,
        *q.stride(), *k.stride(), *out_q.stride(), *out_k.stride(),
        *cos.stride(), *sin.stride(),
        H, S, cos.shape[0] if rope is not None else 0, float(eps),
        HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d,
        NORM=NORM_CODES[norm], HAS_WEIGHT=has_w, ROPE=ROPE_CODES[rope],
        INT64=needs_int64(q, k, out_q, out_k, cos, sin), IN_PLACE=in_place, **extra,
    )
