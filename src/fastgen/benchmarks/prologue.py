"""Attention prologue suite (RMS-norm of q and k + RoPE): fused Triton / CUDA vs the unfused PyTorch
sequence diffusers runs. GB/s counts the fewest bytes: q and k read once and written once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastgen
from fastgen.benchmarks.core import DTYPES, Result, kernel_backends, run_bandwidth_suite

SUITE = "prologue"


@dataclass(frozen=True)
class PrologueCase:
    B: int
    S: int
    H: int
    D: int
    norm: str | None = "head"
    rope: str | None = "interleaved"
    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"B{self.B} S{self.S} H{self.H} D{self.D} norm={self.norm} rope={self.rope} {self.dtype}"

    @property
    def bytes(self) -> int:
        # The fewest bytes: read q and k once, write them once (tables and weights are tiny).
        return 4 * self.B * self.S * self.H * self.D * DTYPES[self.dtype].itemsize

    def inputs(self, device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        dt = DTYPES[self.dtype]
        # The (B, S, H, D) projection output seen as (B, H, S, D): the layout models produce.
        q = torch.randn(self.B, self.S, self.H, self.D, generator=g).to(device, dt).transpose(1, 2)
        k = torch.randn(self.B, self.S, self.H, self.D, generator=g).to(device, dt).transpose(1, 2)
        wd = self.D if self.norm == "head" else self.H * self.D
        w = [torch.rand(wd, generator=g).to(device, dt) + 0.5 for _ in range(2)] if self.norm else [None, None]
        ang = torch.rand(self.S, self.D // 2, generator=g) * 6.28
        cos, sin = ang.cos().to(device), ang.sin().to(device)
        return dict(q=q, k=k, q_weight=w[0], k_weight=w[1], cos=cos, sin=sin, norm=self.norm, rope=self.rope)


def prologue_cases(device: torch.device | str) -> list[PrologueCase]:
    if torch.device(device).type == "cuda":
        return [
            PrologueCase(1, 4096 + 512, 24, 128),  # Flux-dev 1024^2: image + text tokens
            PrologueCase(2, 4096 + 512, 24, 128),  # CFG batch
            PrologueCase(1, 32760, 12, 128, norm="all"),  # Wan 1.3B 480p, 33 frames
        ]
    return [PrologueCase(1, 64, 2, 64, dtype="float32"), PrologueCase(1, 32, 2, 32, norm="all", dtype="float32")]


def prologue_providers(device: torch.device | str) -> dict[str, Callable]:
    """{provider: make(inputs) -> run()} for the backends that run on ``device``."""
    def maker(backend):
        return lambda kw: (lambda: fastgen.ops.qk_norm_rope(**kw, backend=backend))

    providers = {name: maker(b) for name, b in kernel_backends(device).items()}
    if torch.device(device).type == "cuda":  # what "auto" measured and chose (fastgen.ops.autotune)
        providers["fastgen-auto"] = maker("auto")
    return providers


def prologue_reference(case: PrologueCase, kw: dict) -> torch.Tensor:
    from fastgen.kernels.qk_norm_rope import qk_norm_rope_reference

    return qk_norm_rope_reference(kw["q"], kw["q_weight"], kw["cos"], kw["sin"], 1e-6, case.norm, case.rope)


def run(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    return run_bandwidth_suite(SUITE, prologue_cases(device), prologue_providers(device), prologue_reference, device,
                               budget_s, progress)
