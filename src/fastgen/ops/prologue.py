"""``fastgen.ops.qk_norm_rope``: the fused attention prologue (RMS-norm of q and k, then RoPE)."""

from __future__ import annotations

import torch

from fastgen._cuda import cuda_ext_can_run_on
from fastgen._warnings import warn_once
from fastgen.constants import KERNEL_BACKENDS as BACKENDS
from fastgen.kernels import qk_norm_rope as _k
from fastgen.kernels._common import overlap, same_storage, triton_can_run_on
from fastgen.ops import autotune as tuning
from fastgen.ops.portable import is_portable

NORM_CODES, ROPE_CODES = _k.NORM_CODES, _k.ROPE_CODES


@torch.library.custom_op("fastgen::qk_norm_rope_triton", mutates_args=("out_q", "out_k"))
def _qk_norm_rope_triton(
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
    _k.qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, out_q, out_k)


@_qk_norm_rope_triton.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, out_q, out_k):
    return None


def _full_tables(cos, sin, rope, full=None):
    # (S, D) tables as diffusers applies them: each pair's frequency on both of its members.
    if full is not None:
        return full
    if rope == "interleaved":
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def qk_norm_rope_torch(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, full_tables=None):
    """The unfused PyTorch sequence diffusers runs (norm, round, rotate, round): the baseline and
    the CPU path. ``full_tables``: the caller's (S, D) tables, if it had them (saves expanding)."""
    if rope is not None:
        c, s = _full_tables(cos, sin, rope, full_tables)

    def one(x, w):
        B, H, S, D = x.shape
        if norm is not None:
            t = x if norm == "head" else x.transpose(1, 2).reshape(B, S, H * D)
            t = t * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + eps)
            t = t.to(x.dtype) * w if w is not None else t.to(x.dtype)
            x = t if norm == "head" else t.reshape(B, S, H, D).transpose(1, 2)
        if rope is not None:
            n = c.shape[0]
            head = x if n == S else x[:, :, :n]
            if rope == "interleaved":
                a, b = head.unflatten(-1, (-1, 2)).unbind(-1)
                rot = torch.stack([-b, a], dim=-1).flatten(3)
            else:
                a, b = head.chunk(2, dim=-1)
                rot = torch.cat([-b, a], dim=-1)
            head = (head.float() * c + rot.float() * s).to(x.dtype)
            x = head if n == S else torch.cat([head, x[:, :, n:]], dim=2)
        return x

    return one(q, q_weight), one(k, k_weight)


def _check_out(out, q):
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError("out must be a pair (out_q, out_k)")
    for name, t in zip(("out_q", "out_k"), out):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be a tensor of q's shape {tuple(q.shape)}, dtype and device")
    return tuple(out)


def _needs_temporaries(q, k, out) -> bool:
    """Whether ``out`` overlaps the inputs in a way no backend can write directly: then the result
    is computed into new tensors and copied. In place (``out_q`` is ``q``, ``out_k`` is ``k``, the
    same views) every backend takes directly. Raises when the two outputs overlap each other."""
    if torch.compiler.is_compiling():
        return False  # dynamo cannot read storages; compiled callers pass their own buffers
    out_q, out_k = out
    if overlap(out_q, out_k) != "none":
        raise ValueError("out_q and out_k overlap: each output needs memory of its own (an in-place call "
                         "needs q and k that do not overlap)")
    for o, own, other in ((out_q, q, k), (out_k, k, q)):
        # An output over the other input would be read after it was written; one that overlaps its own
        # input but is not that view reads elements other programs have written.
        if overlap(o, other) != "none" or overlap(o, own) == "partial":
            return True
    return False


def _check(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, backend):
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, S, D)")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if q.shape != k.shape or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(
            f"q and k must share shape, dtype and device; got {tuple(q.shape)} {q.dtype} {q.device} "
            f"and {tuple(k.shape)} {k.dtype} {k.device}"
        )
    if norm not in NORM_CODES:
        raise ValueError(f"norm must be one of {tuple(NORM_CODES)}, got {norm!r}")
    if rope not in ROPE_CODES:
        raise ValueError(f"rope must be one of {tuple(ROPE_CODES)}, got {rope!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    B, H, S, D = q.shape
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q_weight and k_weight, or neither")
    if q_weight is not None:
        if norm is None:
            raise ValueError("norm weights were given but norm is None")
        want = D if norm == "head" else H * D
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            if w.shape != (want,):
                raise ValueError(f"{name} must have shape ({want},) for norm={norm!r}, got {tuple(w.shape)}")
            if w.device != q.device:
                raise ValueError(f"{name} is on {w.device} but q is on {q.device}")
    if rope is None:
        return None, None, None
    if cos is None or sin is None:
        raise ValueError(f"rope={rope!r} needs cos and sin")
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {D}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    while cos.dim() > 2 and cos.shape[0] == 1:  # diffusers sometimes adds leading unit dims
        cos, sin = cos[0], sin[0]
    if cos.dim() != 2 or cos.shape[1] not in (D, D // 2) or cos.shape[0] > S:
        raise ValueError(f"cos/sin must be (S_rope, {D}) or (S_rope, {D // 2}) with S_rope <= {S}, got {tuple(cos.shape)}")
    if cos.device != q.device:
        raise ValueError(f"cos/sin are on {cos.device} but q is on {q.device}")
    full = None
    if cos.shape[1] == D:
        # Full tables repeat each frequency for both members of its pair: the kernels take one per
        # pair (a view); the PyTorch path uses the full ones as they are.
        full = (cos, sin)
        sl = slice(0, D, 2) if rope == "interleaved" else slice(0, D // 2)
        cos, sin = cos[:, sl], sin[:, sl]
    return cos.float(), sin.float(), full


def uses_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` would run a fused kernel (not the PyTorch sequence) here. No warnings."""
    if dtype not in _KERNEL_DTYPES:
        return False
    if backend in ("auto", "cuda") and cuda_ext_can_run_on(device) is None:
        return True
    return triton_can_run_on(device) is None and (backend == "triton" or (backend == "auto" and device.type == "cuda"))


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def choose_backend(backend: str, x: torch.Tensor, op: str, cuda_op: str) -> str:
    """The backend of an elementwise op with a Triton kernel, a CUDA twin (``fastgen_C::cuda_op``)
    and a PyTorch path: ``backend`` where it can run ``x``, else the automatic choice (warned
    once). One rule for every choice: a dtype the kernels do not take goes to PyTorch, "auto"
    included; "auto" prefers the CUDA extension, then Triton on a GPU, then PyTorch. Inside
    ``fastgen.ops.portable()`` (an export) always PyTorch, without a warning."""
    if is_portable():
        return "torch"
    supported = x.dtype in _KERNEL_DTYPES
    cuda_reason = cuda_ext_can_run_on(x.device, cuda_op)
    if not supported:
        auto = "torch"
    elif cuda_reason is None:
        auto = "cuda"
    elif x.device.type == "cuda" and triton_can_run_on(x.device) is None:
        auto = "triton"
    else:
        auto = "torch"
    if backend in ("auto", "torch"):
        return auto if backend == "auto" else "torch"
    reason = triton_can_run_on(x.device) if backend == "triton" else cuda_reason
    if reason is None and not supported:
        reason = f"dtype {x.dtype} is not supported (fp16, bf16, fp32 are)"
    if reason is None:
        return backend
    warn_once(f"{op}:{backend}:{reason}", f"fastgen.ops.{op}: backend {backend!r} unavailable ({reason}); using {auto!r}")
    return auto


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm: str | None = "head",
    rope: str | None = "interleaved",
    backend: str = "auto",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    autotune: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS-norm q and k, then apply rotary embedding; one pass, both tensors, one launch.

    Args:
        q, k: (B, H, S, D), same shape and dtype, any strides (e.g. a transposed (B, S, H, D)
            projection output, read in place).
        q_weight, k_weight: RMS-norm weights, (D,) for ``norm="head"`` (Flux, SD3, HunyuanVideo)
            or (H*D,) for ``norm="all"`` (Wan); both or neither.
        cos, sin: RoPE tables, (S_rope, D) as diffusers builds them (each frequency repeated
            for its pair) or (S_rope, D/2); the first S_rope <= S tokens are rotated.
        eps: RMS-norm epsilon (default 1e-6).
        norm: ``"head"``, ``"all"`` or ``None``.
        rope: ``"interleaved"`` (pairs 2i, 2i+1; Flux/Wan/HunyuanVideo), ``"half"`` (i, i+D/2)
            or ``None``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (the unfused sequence).
            ``"auto"`` on a GPU times the fused kernels against the unfused sequence the first
            time it meets a new key (device, versions, dtype, heads, head dim, token bucket, modes)
            and keeps the fastest correct one (``fastgen.ops.autotune``); on a CPU it is PyTorch.
        out: optional (out_q, out_k) to write into, each of q's shape and dtype, any strides
            (e.g. the text and image slices of one joint query buffer). ``out=(q, k)`` works in
            place on every backend. Outputs that overlap the inputs any other way (e.g. ``out_q``
            over ``k``) are computed into temporaries first, then copied (checked in eager mode;
            under ``torch.compile`` pass outputs that are the inputs or share nothing with them).
        autotune: whether ``"auto"`` may time candidates; default: unless ``FASTGEN_AUTOTUNE=0``.
            Off, keys not decided yet follow the fixed table: the CUDA extension where built, else
            Triton on a GPU, else PyTorch.

    Returns:
        (q_out, k_out): each (B, H, S, D) in q's dtype, ready for attention; unless ``out`` is
        given, laid out as (B, S, H, D) in memory so attention output flattens without a copy.

    Raises:
        ValueError: on bad shapes, modes, weights, tables or backend; when ``out_q`` and ``out_k``
        overlap each other.
    """
    tables = (cos, sin)
    cos, sin, full = _check(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, backend)
    out = _check_out(out, q)
    if out is not None and _needs_temporaries(q, k, out):
        a, b = qk_norm_rope(q, k, q_weight=q_weight, k_weight=k_weight, cos=tables[0], sin=tables[1], eps=eps,
                            norm=norm, rope=rope, backend=backend, autotune=autotune)
        # with nothing to do, the PyTorch path returns q and k themselves: copy them before writing
        a, b = (t.clone() if same_storage(t, q) or same_storage(t, k) else t for t in (a, b))
        return out[0].copy_(a), out[1].copy_(b)
    if is_portable():
        name = "torch"  # an export: standard operators only (fastgen.ops.portable)
    elif backend == "auto":
        name = _auto(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, full, autotune)
    else:
        name = choose_backend(backend, q, "qk_norm_rope", "qk_norm_rope")
        if name != "torch" and _needs_grad(q, k, q_weight, k_weight):
            warn_once(f"qk_norm_rope:{name}:grad", f"fastgen.ops.qk_norm_rope: backend {name!r} is forward-only and an "
                      "input requires grad; using 'torch'")
            name = "torch"
    return _run(name, q, k, q_weight, k_weight, cos, sin, eps, norm, rope, full, out)


def _run(name, q, k, q_weight, k_weight, cos, sin, eps, norm, rope, full, out):
    if name == "torch":
        a, b = qk_norm_rope_torch(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, full)
        return (out[0].copy_(a), out[1].copy_(b)) if out is not None else (a, b)
    out_q, out_k = out if out is not None else (_k.empty_like_bshd(q), _k.empty_like_bshd(k))
    if name == "triton":
        torch.ops.fastgen.qk_norm_rope_triton(q, k, q_weight, k_weight, cos, sin, float(eps), norm, rope, out_q, out_k)
    else:
        torch.ops.fastgen_C.qk_norm_rope(
            q, k, q_weight, k_weight, cos, sin, float(eps), NORM_CODES[norm], ROPE_CODES[rope], out_q, out_k
        )
    return out_q, out_k


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _candidates(q: torch.Tensor) -> list[str]:
    # The automatic choice times the fused kernels against the unfused sequence on a GPU; on a CPU
    # (the Triton interpreter is for correctness) PyTorch's sequence runs.
    if q.device.type != "cuda" or q.dtype not in _KERNEL_DTYPES:
        return ["torch"]
    names = ["torch"]
    if triton_can_run_on(q.device) is None:
        names.append("triton")
    if cuda_ext_can_run_on(q.device, "qk_norm_rope") is None:
        names.append("cuda")
    return names


@torch.compiler.assume_constant_result
def _decided_while_tracing(key: str, static: str, names: tuple, tune) -> str:
    return tuning.lookup_while_tracing(key, static, names, tune)


def _auto(q, k, q_weight, k_weight, cos, sin, eps, norm, rope, full, tune) -> str:
    names = _candidates(q)
    if len(names) == 1:
        return names[0]
    if _needs_grad(q, k, q_weight, k_weight):
        return "torch"  # the kernels are forward-only: autograd needs PyTorch's sequence
    static = choose_backend("auto", q, "qk_norm_rope", "qk_norm_rope")
    if not all(type(s) is int for s in q.shape) or q.numel() == 0:
        return static  # symbolic sizes while tracing (no key to look up), or nothing to measure
    B, H, S, D = q.shape
    n_rope = 0 if cos is None else cos.shape[0]
    shape = (f"{tuning.dtype_name(q.dtype)},H{H},D{D},n{tuning.bucket(B * S)}{tuning.layout(q)},norm={norm},"
             f"rope={rope}{',part' if 0 < n_rope < S else ''},w={'y' if q_weight is not None else 'n'}")
    key = tuning.make_key(q.device, "qk_norm_rope", shape)
    if torch.compiler.is_compiling():
        return _decided_while_tracing(key, static, tuple(names), tune)

    def candidate(name):  # into new buffers: the caller's ``out`` may be q and k themselves
        return lambda: _run(name, q, k, q_weight, k_weight, cos, sin, eps, norm, rope, full, None)

    def pytorch_error(ref):
        up = [None if t is None else t.float() for t in (q, k, q_weight, k_weight)]
        full32 = None if full is None else tuple(t.float() for t in full)
        return tuning.relative_error(ref, qk_norm_rope_torch(*up, cos, sin, eps, norm, rope, full32))

    decision = tuning.TUNER.decide("qk_norm_rope", key, q.device, {n: candidate(n) for n in names},
                                   candidate("torch"), pytorch_error, q.dtype, static, allow=tuning.enabled(tune))
    return decision.backend
