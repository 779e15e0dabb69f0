"""What every launcher needs to know about the Triton it runs on."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the library checks HAVE_TRITON and falls back; never crash on import
    triton = None
    tl = None
    TRITON_IMPORT_ERROR: str | None = f"triton is not importable ({exc})"
else:
    TRITON_IMPORT_ERROR = None

HAVE_TRITON = triton is not None

# Read once. Set TRITON_INTERPRET before Triton is first imported (importing diffusers imports it):
# Triton 3.7 set later runs simple kernels but fails on kernels that call other @triton.jit functions.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """``FASTGEN_AUTOTUNE``: on unless ``0``, ``false``, ``off`` or ``no``. Off, Triton kernels use one
    fixed tile configuration, and fastgen's ``backend="auto"`` its fixed table (fastgen.ops.autotune)."""
    return os.environ.get("FASTGEN_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def triton_can_run_on(device: torch.device) -> str | None:
    """Why a Triton kernel cannot run on ``device``, or ``None`` when it can."""
    if not HAVE_TRITON:
        return TRITON_IMPORT_ERROR
    if device.type == "cuda":
        if INTERPRET:
            return "TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only"
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    return f"Triton kernels do not run on {device.type} tensors"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


INT32_MAX = 2**31 - 1


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset from ``t``'s first element that indexing it reaches:
    ``sum((size - 1) * stride)``; 0 for an empty tensor. Needs only shapes and strides (meta
    tensors work)."""
    if t.numel() == 0:
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel indexing these tensors must compute offsets in int64.

    Triton multiplies an int32 index by an int32 stride in int32: past 2**31 - 1 the product wraps
    and the load reads the wrong address (e.g. a (B, S, H, D) view with H*D = 3072 at 700k tokens,
    long video). Launchers pass the answer as a constexpr, so the common case keeps cheaper int32
    arithmetic and only tensors this large pay for 64-bit offsets.
    """
    return any(t is not None and max_offset(t) > INT32_MAX for t in tensors)


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors view one storage. Reads storage identity, not ``data_ptr``, so it also
    works on meta and fake tensors."""
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """How the elements of two tensors share memory: ``"none"``; ``"same"`` (one view: same
    storage, offset, dtype, shape and strides); or ``"partial"``, anything else that may share an
    element. Exact for views of one shape and strides at different offsets (q and k slices of one
    fused qkv buffer interleave but share nothing: "none"); conservative otherwise."""
    if a.numel() == 0 or b.numel() == 0 or not same_storage(a, b):
        return "none"
    ea, eb = a.element_size(), b.element_size()
    a0, b0 = a.storage_offset() * ea, b.storage_offset() * eb
    if a0 + (max_offset(a) + 1) * ea <= b0 or b0 + (max_offset(b) + 1) * eb <= a0:
        return "none"
    if a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride():
        if a0 == b0:
            return "same"
        if not _reaches(b.storage_offset() - a.storage_offset(), a.shape, a.stride()):
            return "none"
    return "partial"


def _reaches(delta: int, shape, stride, budget: int = 4096) -> bool:
    # Is delta = sum_j c_j * stride_j for some |c_j| < shape_j, i.e. is there an element of one view
    # at the other's offset? Depth-first over dims by decreasing stride, keeping only the c_j the
    # smaller dims can still make up for: one or two per dim for ordinary layouts. Answers True
    # (overlap) when the search would be long.
    dims = sorted(((abs(s), n - 1) for n, s in zip(shape, stride) if n > 1 and s != 0), reverse=True)
    rest = [0] * (len(dims) + 1)  # rest[i]: the largest |sum| dims i.. can make
    for i in range(len(dims) - 1, -1, -1):
        rest[i] = rest[i + 1] + dims[i][0] * dims[i][1]

    def go(i: int, d: int) -> bool:
        nonlocal budget
        if i == len(dims):
            return d == 0
        budget -= 1
        if budget < 0:
            return True
        s, m = dims[i]
        lo, hi = max(-m, -((rest[i + 1] - d) // s)), min(m, (d + rest[i + 1]) // s)
        return any(go(i + 1, d - c * s) for c in range(lo, hi + 1))

    return go(0, delta)
