"""Tolerances relative to PyTorch's own error, as flash-attention measures them."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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
