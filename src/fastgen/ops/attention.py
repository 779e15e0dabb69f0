"""``fastgen.ops.attention``: scaled dot-product attention over cached K/V segments."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

from fastgen._cuda import cuda_ext_can_run_on
from fastgen._warnings import warn_once
from fastgen.constants import ATTENTION_BACKENDS as BACKENDS
from fastgen.kernels import attention as _k
from fastgen.kernels._common import triton_can_run_on
from fastgen.kernels.fp8 import FP8
from fastgen.ops import autotune as tuning
from fastgen.ops.autotune import bucket
from fastgen.ops.fp8 import Fp8KV
from fastgen.ops.portable import is_portable


try:
    import xformers.ops as _xops
except ImportError as exc:
    _xops = None
    _XFORMERS_ERROR = f"xformers is not importable ({exc})"
else:
    _XFORMERS_ERROR = None


# --------------------------------------------------------------------------------------------
# The Triton kernel as a custom op: torch.compile and torch.export trace through it.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastgen::attention_triton", mutates_args=())
def _attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: list[torch.Tensor],
    extra_v: list[torch.Tensor],
    extra_bias: list[float],
    scale: float,
    extra_k_scale: list[torch.Tensor | None],
    extra_v_scale: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.attention_fwd(q, k, v, extra_k, extra_v, extra_bias, scale, extra_k_scale, extra_v_scale)


@_attention_triton.register_fake
def _(q, k, v, extra_k, extra_v, extra_bias, scale, extra_k_scale, extra_v_scale):
    B, H, Nq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Nq), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_kv(name: str, k, v, q: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or q.dtype
    for n, t in ((f"{name} keys", k), (f"{name} values", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{n} must be 4-D (B, H, N, D) like q, got shape {_shape(t)}")
        if t.device != q.device:
            raise ValueError(f"{n} are on {t.device} but q is on {q.device}: move them to one device")
        if t.dtype != dtype:
            raise ValueError(f"{n} are {t.dtype} but {'fp8 segments must be ' + str(dtype) if dtype != q.dtype else 'q is ' + str(q.dtype)}: use one dtype")
    B, H, _, D = q.shape
    if k.shape[0] not in (1, B) or k.shape[1] != H or k.shape[3] != D:
        batch = "1" if B == 1 else f"{B} or 1"
        raise ValueError(
            f"{name} keys have shape {_shape(k)}; expected ({batch}, {H}, N, {D}) to match q {_shape(q)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name} values have shape {_shape(v)}, which does not match keys {_shape(k)} in (B, H, N)")


def _check_fp8(name: str, e: Fp8KV, q: torch.Tensor) -> None:
    _check_kv(name, e.k, e.v, q, dtype=FP8)
    for n, t, of in ((f"{name} key scales", e.k_scale, e.k), (f"{name} value scales", e.v_scale, e.v)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device != q.device:
            raise ValueError(f"{n} must be a float32 tensor on {q.device}")
        if tuple(t.shape) != tuple(of.shape[:3]) or t.stride(-1) != 1:
            raise ValueError(f"{n} must be ({', '.join(map(str, of.shape[:3]))}) and contiguous along N, "
                             f"got shape {_shape(t)}, strides {tuple(t.stride())}")


def _check_inputs(q, k, v, extra_kv, extra_bias, scale, backend):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = _shape(q) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 4-D tensor (B, H, Nq, D), got {got}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")
    _check_kv("main", k, v, q)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    if extra_kv is None:
        extra_kv = []
    if isinstance(extra_kv, tuple) and len(extra_kv) == 2 and isinstance(extra_kv[0], torch.Tensor):
        raise ValueError("extra_kv must be a list of (k_i, v_i) pairs; wrap a single pair in a list: [(k_i, v_i)]")
    extra_kv = list(extra_kv)
    for i, pair in enumerate(extra_kv):
        if isinstance(pair, Fp8KV):
            _check_fp8(f"extra_kv[{i}]", pair, q)
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"extra_kv[{i}] must be a (k, v) pair or a fastgen.ops.Fp8KV")
        _check_kv(f"extra_kv[{i}]", pair[0], pair[1], q)

    n = len(extra_kv)
    biases = _biases(extra_bias, n)
    for b in biases:
        if math.isnan(b) or b == math.inf:
            raise ValueError(f"extra_bias entries must be finite or -inf (which drops the segment), got {b}")

    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite float, got {scale}")
    # No key at all (k and every segment empty) is allowed: like a fully masked row, out 0, lse -inf.
    return extra_kv, biases, float(scale)


_BIAS_FORMS = "a float, a 0-d tensor, or one float per segment (a sequence or a 1-D tensor)"


def _biases(extra_bias, n: int) -> list[float]:
    # A tensor is read on the host (.tolist / float): one device sync when it lives on a GPU.
    if extra_bias is None:
        return [0.0] * n
    if isinstance(extra_bias, torch.Tensor):
        if extra_bias.dim() == 0:
            return [float(extra_bias)] * n
        if extra_bias.dim() > 1:
            raise ValueError(f"extra_bias must be {_BIAS_FORMS}, got a tensor of shape {_shape(extra_bias)}")
        extra_bias = extra_bias.tolist()
    elif isinstance(extra_bias, numbers.Real) or getattr(extra_bias, "ndim", None) == 0:  # NumPy scalars too
        return [float(extra_bias)] * n
    elif isinstance(extra_bias, (str, bytes)):
        raise ValueError(f"extra_bias must be {_BIAS_FORMS}, got {type(extra_bias).__name__} {extra_bias!r}")
    try:
        biases = [float(b) for b in extra_bias]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"extra_bias must be {_BIAS_FORMS}, got {type(extra_bias).__name__} ({exc})") from None
    if len(biases) != n:
        raise ValueError(f"extra_bias has {len(biases)} entries but extra_kv has {n} segments")
    return biases


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------


def _why_not_triton(q: torch.Tensor, tensors: Sequence[torch.Tensor]) -> str | None:
    reason = triton_can_run_on(q.device)
    if reason:
        return reason
    if q.dtype not in _k.SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (fp16, bf16, fp32 are)"
    D = q.shape[-1]
    if not _k.MIN_HEAD_DIM <= D <= _k.MAX_HEAD_DIM:
        return f"head dim {D} is outside [{_k.MIN_HEAD_DIM}, {_k.MAX_HEAD_DIM}]"
    if any(t.shape[-1] != D for t in tensors):
        return "values have a head dim other than the queries'"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "the kernel is forward-only and an input requires grad"
    return None


def _why_not_xformers(q: torch.Tensor, biases: Sequence[float], return_lse: bool) -> str | None:
    if _xops is None:
        return _XFORMERS_ERROR
    if q.device.type != "cuda":
        return "xformers has no CPU kernels"
    if any(b != 0.0 for b in biases):
        return "segment biases are not supported on the xformers path"
    if return_lse:
        return "the xformers path does not return the log-sum-exp"
    return None


# SDPA's own backends, timed one by one where PyTorch has them on the device.
SDPA_BACKENDS = {
    "flash": (SDPBackend.FLASH_ATTENTION, "flash_sdp_enabled"),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, "mem_efficient_sdp_enabled"),
    "cudnn": (SDPBackend.CUDNN_ATTENTION, "cudnn_sdp_enabled"),
}


def sdpa_candidates(device: torch.device) -> list[str]:
    """``"sdpa:<backend>"`` for each SDPA backend enabled on ``device`` (CUDA only: on a CPU PyTorch
    has one kernel and picks it itself)."""
    if device.type != "cuda":
        return []
    return [f"sdpa:{name}" for name, (_, flag) in SDPA_BACKENDS.items() if getattr(torch.backends.cuda, flag)()]


def static_choice(q: torch.Tensor, tensors: Sequence[torch.Tensor], n_segments: int,
                  triton_ok: bool | None = None) -> str:
    """The fixed table, used with ``FASTGEN_AUTOTUNE=0`` and, before a key is decided, under
    ``torch.compile`` or CUDA-graph capture:

    - fp16 / bf16 on a CUDA GPU with at least one extra segment, where the Triton kernel can run:
      ``"triton"`` (segments read in place: no concatenation copy);
    - everything else: ``"sdpa"`` (PyTorch's own backend choice).
    """
    if triton_ok is None:  # ``triton_ok``: whether the kernel takes these inputs, if the caller knows
        triton_ok = _why_not_triton(q, tensors) is None
    if n_segments and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and triton_ok:
        return "triton"
    return "sdpa"


def _candidates(q, tensors, biases, return_lse) -> list[str]:
    # On a CPU the Triton interpreter is for correctness, never speed: PyTorch runs there.
    if q.device.type != "cuda":
        return ["sdpa"]
    # PyTorch's own choice is always a candidate: the reference itself, so one correct candidate exists
    # even where every other one is wrong or cannot run (then never the table's possibly wrong guess).
    names = ["sdpa"] + sdpa_candidates(q.device)
    if _why_not_triton(q, tensors) is None:
        names.append("triton")
    if _why_not_xformers(q, biases, return_lse) is None:
        names.append("xformers")
    return names


def _shape_key(q, k, extra_kv, biases, return_lse) -> str:
    B, H, Nq, D = q.shape
    parts = [tuning.dtype_name(q.dtype), f"D{D}", f"bh{bucket(B * H)}", f"q{bucket(Nq)}{tuning.layout(q)}",
             f"k{bucket(k.shape[2])}{tuning.layout(k)}" + ("/b1" if k.shape[0] == 1 and B > 1 else "")]
    for pair, b in zip(extra_kv, biases):
        ki = pair.k if isinstance(pair, Fp8KV) else pair[0]
        flags = ("/b1" if ki.shape[0] == 1 and B > 1 else "") + ("/fp8" if isinstance(pair, Fp8KV) else "")
        flags += "/drop" if b == -math.inf else ("/bias" if b != 0.0 else "")
        parts.append(f"seg{bucket(ki.shape[2])}{flags}")
    if return_lse:
        parts.append("lse")
    return ",".join(parts)


@torch.compiler.assume_constant_result
def _decided_while_tracing(key: str, static: str, names: tuple, tune) -> str:
    return tuning.lookup_while_tracing(key, static, names, tune)


def _auto(q, k, v, extra_kv, biases, scale, return_lse, tensors, tune: bool | None) -> str:
    names = _candidates(q, tensors, biases, return_lse)
    if len(names) == 1:
        return names[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "sdpa"  # autograd: PyTorch's backward
    if torch.is_autocast_enabled(q.device.type):
        # PyTorch's SDPA casts under autocast, fastgen's op does not: the output dtype never depends on a timing
        return "sdpa"
    static = static_choice(q, tensors, len(extra_kv), triton_ok="triton" in names)  # no second check of the kernel's limits
    if not all(type(s) is int for s in q.shape) or q.numel() == 0:
        return static  # symbolic sizes while tracing (no key to look up), or nothing to measure
    key = tuning.make_key(q.device, "attention", _shape_key(q, k, extra_kv, biases, return_lse))
    if torch.compiler.is_compiling():
        return _decided_while_tracing(key, static, tuple(names), tune)

    def candidate(name):  # the output, and the log-sum-exp where asked for: both are checked
        return lambda: _run(name, q, k, v, extra_kv, biases, scale, return_lse, strict=True)[: 2 if return_lse else 1]

    def pytorch_error(ref):  # ref: the candidates' form, (out,) or (out, lse)
        up = [t.float() for t in (q, k, v)]
        ref32 = _run("sdpa", *up, _plain(extra_kv, torch.float32), biases, scale, return_lse)[: len(ref)]
        return tuning.relative_error(ref, ref32)

    decision = tuning.TUNER.decide(
        "attention", key, q.device, {n: candidate(n) for n in names}, candidate("sdpa"), pytorch_error, q.dtype,
        static, allow=tuning.enabled(tune))
    return decision.backend


def resolve_backend(
    backend: str, q: torch.Tensor, tensors: Sequence[torch.Tensor], biases: Sequence[float] = (), return_lse: bool = False
) -> str:
    """The backend that runs a request by name (not ``"auto"``): the one asked for, or a correct
    fallback, warned once."""
    if backend == "sdpa":
        return "sdpa"
    if backend == "triton":
        reason = _why_not_triton(q, tensors)
    elif backend == "cuda":
        reason = cuda_ext_can_run_on(q.device) or "the CUDA extension has no attention kernel yet (only the prologue)"
    else:
        reason = _why_not_xformers(q, biases, return_lse)
    if reason is None:
        return backend
    chosen = "sdpa"
    warn_once(f"attention:{backend}:{reason}", f"fastgen.ops.attention: backend {backend!r} unavailable ({reason}); using {chosen!r}")
    return chosen


def uses_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` may run one of fastgen's kernels (not PyTorch SDPA) for inputs of this
    device and dtype: for ``"auto"``, whether fastgen's kernel is among the candidates it times. No
    warnings: for planning, e.g. whether a patched path is worth taking."""
    if backend in ("auto", "triton"):
        if triton_can_run_on(device) is not None or dtype not in _k.SUPPORTED_DTYPES:
            return False
        return backend == "triton" or device.type == "cuda"
    if backend == "xformers":
        return _xops is not None and device.type == "cuda"
    return False  # "sdpa"; "cuda" has no attention kernel yet


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """{backend: None where it can run fp16 inputs on ``device``, else the reason it cannot}."""
    device = torch.device(device)
    return {
        "sdpa": None,
        "triton": triton_can_run_on(device),
        "cuda": cuda_ext_can_run_on(device) or "the CUDA extension has no attention kernel yet (only the prologue)",
        "xformers": _XFORMERS_ERROR or (None if device.type == "cuda" else "xformers has no CPU kernels"),
    }


# --------------------------------------------------------------------------------------------
# Backends other than the custom op
# --------------------------------------------------------------------------------------------


def _fp8_in_kernel(device: torch.device) -> bool:
    # Triton converts e4m3 in registers on sm_89+ (and in the interpreter); older GPUs get a copy.
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _plain(extra_kv, dtype) -> list:
    """Every segment as a (k, v) pair in ``dtype``: fp8 ones dequantized (a copy)."""
    return [p.dequantize(dtype) if isinstance(p, Fp8KV) else p for p in extra_kv]


def _concat(q, k, v, extra_kv, biases):
    B = q.shape[0]
    if not extra_kv:  # nothing to concatenate: no copy (expand is a view)
        return k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), None
    ks = [k.expand(B, -1, -1, -1)] + [ki.expand(B, -1, -1, -1) for ki, _ in extra_kv]
    vs = [v.expand(B, -1, -1, -1)] + [vi.expand(B, -1, -1, -1) for _, vi in extra_kv]
    mask = None
    if any(b != 0.0 for b in biases):
        cols = [torch.zeros(k.shape[2], dtype=torch.float32, device=q.device)]
        cols += [torch.full((ki.shape[2],), b, dtype=torch.float32, device=q.device) for (ki, _), b in zip(extra_kv, biases)]
        mask = torch.cat(cols).to(q.dtype).view(1, 1, 1, -1)
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2), mask


def _lse_chunked(q, k_all, mask, scale) -> torch.Tensor:
    # Log-sum-exp of the logits in fp32, a few rows at a time so (Nq, Nk) is never whole.
    Nk = k_all.shape[2]
    rows = max(1, (1 << 24) // max(1, Nk * q.shape[0] * q.shape[1]))
    parts = []
    for s in range(0, q.shape[2], rows):
        logits = q[:, :, s : s + rows].float() @ k_all.float().transpose(-1, -2) * scale
        if mask is not None:
            logits = logits + mask.float()  # (1, 1, 1, Nk) broadcasts
        parts.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(parts, dim=-1)


def _sdpa(q, k, v, extra_kv, biases, scale, return_lse):
    kk, vv, mask = _concat(q, k, v, extra_kv, biases)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
    lse = _lse_chunked(q, kk, mask, scale) if return_lse else None
    return out, lse


def _xformers(q, k, v, extra_kv, biases, scale):
    kk, vv, _ = _concat(q, k, v, extra_kv, biases)
    if kk.shape[2] == 0:  # no key at all: out 0, as the other backends give (module doc of the kernel)
        return torch.zeros_like(q)
    # xformers takes (B, N, H, D): these transposes are views
    out = _xops.memory_efficient_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    extra_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    extra_bias: float | Sequence[float] | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    autotune: bool | None = None,
):
    """Scaled dot-product attention whose keys come in segments read in place.

    Args:
        q: (B, H, Nq, D) queries, the layout of ``F.scaled_dot_product_attention``; any strides.
        k, v: (B or 1, H, Nk, D) fresh keys and values. A batch of 1 broadcasts.
        extra_kv: list of (k_i, v_i), each (B or 1, H, N_i, D): cached segments attended after
            ``k, v`` as if concatenated, without concatenating them. Same dtype and device as q;
            or a ``fastgen.ops.Fp8KV`` (``fastgen.ops.quantize_kv``), which the Triton kernel
            dequantizes as it reads (other backends dequantize a copy first).
        extra_bias: a float (or 0-d tensor) for every segment, or one float per segment (a
            sequence or a 1-D tensor), added to the logits of that segment's keys (OminiControl's
            ``log(condition_scale)``, KV-Edit's ``attn_scale``). ``-inf`` drops a segment.
            Default 0. A tensor is read on the host (one sync on a GPU).
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"sdpa"`` (concatenate, then PyTorch; the
            reference), or ``"xformers"``. ``"auto"`` on a GPU times fastgen's kernel and each SDPA
            backend the first time it meets a new key (device, versions, dtype, head dim, shape
            bucket, segment layout) and keeps the fastest correct one (``fastgen.ops.autotune``);
            on a CPU it is SDPA. A named backend that cannot take these inputs falls back to a
            correct one with one warning.
        return_lse: also return the natural-log log-sum-exp of each query row's logits,
            (B, H, Nq) float32, to merge partial attention over disjoint keys
            (``fastgen.ops.merge_partials``).

    Returns:
        (B, H, Nq, D) in q's dtype; with ``return_lse``, ``(out, lse)``. A query row with no
        admissible key (``k`` and every segment empty, or dropped by a ``-inf`` bias) gets out 0,
        as ``F.scaled_dot_product_attention`` gives a fully masked row, and lse ``-inf`` (the log
        of an empty sum, as ``torch.logsumexp``); every backend agrees, and ``merge_partials``
        gives such a part weight 0.

    Raises:
        ValueError: on mismatched shapes, wrong ranks, mixed devices or dtypes, bad biases.
    """
    extra_kv, biases, scale = _check_inputs(q, k, v, extra_kv, extra_bias, scale, backend)
    tensors = [q, k, v] + [t for pair in extra_kv for t in ((pair.k, pair.v) if isinstance(pair, Fp8KV) else pair)]
    if is_portable():
        name = "sdpa"  # an export: standard operators only (fastgen.ops.portable)
    elif backend == "auto":
        name = _auto(q, k, v, extra_kv, biases, scale, return_lse, tensors, autotune)
    else:
        name = resolve_backend(backend, q, tensors, biases, return_lse)
    out, lse = _run(name, q, k, v, extra_kv, biases, scale, return_lse)
    return (out, lse) if return_lse else out


def _run(name: str, q, k, v, extra_kv, biases, scale, return_lse, strict: bool = False):
    """(out, lse or None) of backend ``name``: ``"triton"``, ``"xformers"``, ``"sdpa"`` (PyTorch picks
    its kernel) or ``"sdpa:<backend>"`` (that SDPA backend alone). ``strict``: raise where that SDPA
    backend cannot take the inputs (measuring); else PyTorch's own choice runs them, warned once."""
    if name == "triton":
        if not _fp8_in_kernel(q.device):
            extra_kv = _plain(extra_kv, q.dtype)
        fp8 = [isinstance(p, Fp8KV) for p in extra_kv]
        return torch.ops.fastgen.attention_triton(
            q, k, v, [p.k if f else p[0] for p, f in zip(extra_kv, fp8)], [p.v if f else p[1] for p, f in zip(extra_kv, fp8)],
            biases, scale, [p.k_scale if f else None for p, f in zip(extra_kv, fp8)],
            [p.v_scale if f else None for p, f in zip(extra_kv, fp8)],
        )
    extra_kv = _plain(extra_kv, q.dtype)
    if name == "xformers":
        return _xformers(q, k, v, extra_kv, biases, scale), None
    kept = [(p, b) for p, b in zip(extra_kv, biases) if b != -math.inf]
    extra_kv, biases = [p for p, _ in kept], [b for _, b in kept]
    if name == "sdpa":
        return _sdpa(q, k, v, extra_kv, biases, scale, return_lse)
    backend = SDPA_BACKENDS[name.split(":", 1)[1]][0]
    if strict or torch.compiler.is_compiling():
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v, extra_kv, biases, scale, return_lse)
    try:
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v, extra_kv, biases, scale, return_lse)
    except RuntimeError as exc:  # a shape of this key the measured backend does not take
        warn_once(f"attention:{name}:cannot take:{tuple(q.shape)}:{q.dtype}",
                  f"fastgen.ops.attention: SDPA backend {name.split(':', 1)[1]!r}, measured fastest for these "
                  f"inputs' key, cannot take shape {tuple(q.shape)} ({str(exc).strip().splitlines()[0][:120]}); "
                  "PyTorch's own choice runs it")
        return _sdpa(q, k, v, extra_kv, biases, scale, return_lse)
