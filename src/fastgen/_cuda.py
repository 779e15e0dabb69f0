"""The optional compiled extension ``fastgen._C`` (built from ``csrc/`` where CUDA is present)."""

from __future__ import annotations

import importlib

import torch

try:
    _C = importlib.import_module("fastgen._C")  # registers the fastgen_C:: ops
except ImportError as exc:
    _C = None
    CUDA_EXT_ERROR: str | None = (
        "fastgen's CUDA extension is not built (it is built from csrc/ by `pip install "
        "--no-build-isolation .` where CUDA torch and nvcc are present): " + str(exc)
    )
else:
    CUDA_EXT_ERROR = None

HAVE_CUDA_EXT = _C is not None

if HAVE_CUDA_EXT:

    @torch.library.register_fake("fastgen_C::qk_norm_rope")
    def _qk_norm_rope_fake(q, k, q_weight, k_weight, cos, sin, eps, norm_mode, rope_mode, out_q, out_k):
        return None

    if hasattr(torch.ops.fastgen_C, "quantize_fp8"):

        @torch.library.register_fake("fastgen_C::quantize_fp8")
        def _quantize_fp8_fake(x, out, scale):
            return None


def cuda_ext_can_run_on(device: torch.device, op: str | None = None) -> str | None:
    """Why the compiled kernels (``fastgen_C::op``, if named) cannot run on ``device``, or
    ``None`` when they can."""
    if not HAVE_CUDA_EXT:
        return CUDA_EXT_ERROR
    if device.type != "cuda":
        return f"fastgen's CUDA kernels run on CUDA tensors, not {device.type}"
    if op is not None and not hasattr(torch.ops.fastgen_C, op):
        return f"the built CUDA extension predates fastgen_C::{op}: rebuild it"
    return None
