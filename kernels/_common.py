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

# Read once, as Triton itself does: the interpreter is chosen when ``@triton.jit`` runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
