"""Tolerances relative to PyTorch's own error, as flash-attention measures them."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# bench/run_gpu.sh quick: the kernel tests at reduced parametrization (fewer shapes and head dims;
# every dtype, bf16 included), so they fit one short GPU window.
QUICK = os.environ.get("FASTGEN_QUICK") == "1"

# A floor for cases where PyTorch's error is ~0 (e.g. one key: softmax is exactly 1).
FLOOR = {torch.float16: 2e-5, torch.bfloat16: 2e-4, torch.float32: 2e-7, torch.float64: 1e-12}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def assert_within_pytorch_error(out, ref, pytorch_out, factor: float = 2.0, what: str = "output") -> None:
    """|out - ref|_max <= factor * |pytorch_out - ref|_max + floor, every element written.

    ref is the high-precision reference; pytorch_out is PyTorch computing the same thing in the
    same low precision as out.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values where the reference has none"
    ours, theirs = max_err(out, ref), max_err(pytorch_out, ref)
    bound = factor * theirs + FLOOR[out.dtype]
    assert ours <= bound, f"{what}: max error {ours:.3e} > {factor} x PyTorch's {theirs:.3e} + floor"


class KernelRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the launch
    instead of running it, so a launcher can be driven with meta tensors (nothing allocated) to see
    what it decides, e.g. the INT64 constexpr at sizes past 2**31 elements."""

    def __init__(self):
        self.grid = self.args = self.kwargs = None

    def __getitem__(self, grid):
        self.grid = grid
        return self

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


# (B, S, H, D) with H*D = 3072 (Flux, HunyuanVideo): element offsets reach 2**31 from this many tokens
INT32_TOKENS = -(-(2**31) // 3072)  # 699051: max offset S * 3072 - 1 > 2**31 - 1


class KernelSpy:
    """Wraps a ``@triton.jit`` kernel: launches it as usual and keeps each launch's keyword
    arguments (the constexprs a launcher chose) in ``launches``."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch
