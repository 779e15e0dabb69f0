"""fp8 quantization suite: e4m3 with a scale per row of cached K/V, Triton / CUDA vs the PyTorch
sequence (amax, divide, cast). GB/s counts x read once, x8 and the scales written once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastgen
from fastgen.benchmarks.core import DTYPES, Result, kernel_backends, max_diff, run_bandwidth_suite

SUITE = "quantize"


@dataclass(frozen=True)
class QuantizeCase:
    """(B, H, N, D) K or V of one layer, quantized to e4m3 with a scale per (b, h, n) row."""

    B: int
    H: int
    N: int
    D: int
    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"B{self.B} H{self.H} N{self.N} D{self.D} {self.dtype} -> e4m3"

    @property
    def bytes(self) -> int:  # read x once, write x8 and the scales once
        rows = self.B * self.H * self.N
        return rows * self.D * (DTYPES[self.dtype].itemsize + 1) + rows * 4

    def inputs(self, device, seed: int = 0) -> dict:
        g = torch.Generator(device="cpu").manual_seed(seed)
        # (B, N, H, D) seen as (B, H, N, D): the layout attention K/V come in
        x = torch.randn(self.B, self.N, self.H, self.D, generator=g).to(device, DTYPES[self.dtype]).transpose(1, 2)
        return dict(x=x)


def quantize_cases(device: torch.device | str) -> list[QuantizeCase]:
    if torch.device(device).type == "cuda":
        # a 1024^2 condition's K per Flux layer; KV-Edit's background at a 25% mask
        return [QuantizeCase(1, 24, 4096, 128), QuantizeCase(1, 24, 3072, 128)]
    return [QuantizeCase(1, 2, 77, 64, dtype="float32")]


def quantize_providers(device: torch.device | str) -> dict[str, Callable]:
    """{provider: make(inputs) -> run()} for the backends that run on ``device``."""
    def maker(backend):
        return lambda kw: (lambda: fastgen.ops.quantize_fp8(kw["x"], backend=backend))

    return {name: maker(b) for name, b in kernel_backends(device, "quantize_fp8").items()}


def quantize_reference(case: QuantizeCase, kw: dict):
    from fastgen.kernels.fp8 import quantize_fp8_reference

    return quantize_fp8_reference(kw["x"])


def quantize_diff(out, ref) -> float:
    """max |dequantized out - dequantized reference|: 0 when the rounding matches exactly."""
    from fastgen.kernels.fp8 import dequantize_fp8

    return max_diff(dequantize_fp8(*out, torch.float64), dequantize_fp8(*ref, torch.float64))


def run(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    return run_bandwidth_suite(SUITE, quantize_cases(device), quantize_providers(device), quantize_reference, device,
                               budget_s, progress, diff=quantize_diff, ref_kind="PyTorch e4m3 rounding")
