"""Attention suite: fastgen (Triton, CUDA where built, xformers where present) vs every SDPA backend
PyTorch has on the device, with cached extra segments (plain or fp8) where a case has them. TFLOP/s
from analytic FLOPs: 4 * B * H * Nq * (Nk + cached keys) * D."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastgen
from fastgen.benchmarks.core import DTYPES, Result, add_speedups, max_diff, run_once, synced, time_ms

SUITE = "attention"


@dataclass(frozen=True)
class AttentionCase:
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    segments: tuple[int, ...] = ()  # lengths of cached extra segments after the Nk fresh keys
    dtype: str = "bfloat16"
    cache: str = "compute"  # "fp8": the segments stored as fastgen.ops.Fp8KV (e4m3 + per-row scales)

    @property
    def keys(self) -> int:
        return self.Nk + sum(self.segments)

    @property
    def name(self) -> str:
        seg = "+" + "+".join(map(str, self.segments)) + "cached" if self.segments else ""
        fp8 = " fp8-cache" if self.cache == "fp8" else ""
        return f"B{self.B} H{self.H} Nq{self.Nq} Nk{self.Nk}{seg}{fp8} D{self.D} {self.dtype}"

    @property
    def flops(self) -> int:
        return 4 * self.B * self.H * self.Nq * self.keys * self.D

    def inputs(self, device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        dt = DTYPES[self.dtype]

        def r(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

        q = r(self.B, self.H, self.Nq, self.D)
        k, v = r(self.B, self.H, self.Nk, self.D), r(self.B, self.H, self.Nk, self.D)
        extra = [(r(1, self.H, n, self.D), r(1, self.H, n, self.D)) for n in self.segments]
        if self.cache == "fp8":
            extra = [fastgen.ops.quantize_kv(*e) for e in extra]
        return q, k, v, extra


def _plain(extra, dtype) -> list:
    """(k, v) pairs of segments, fp8 ones dequantized to ``dtype`` (what runs without fastgen)."""
    from fastgen.ops.fp8 import Fp8KV

    return [e.dequantize(dtype) if isinstance(e, Fp8KV) else e for e in extra]


def attention_cases(device: torch.device | str) -> list[AttentionCase]:
    """Flux-sized cases on a GPU (issue #2); small ones elsewhere so the suite runs as a test."""
    if torch.device(device).type == "cuda":
        cases = [AttentionCase(1, 24, n, n, 128) for n in (1024, 4096, 8192, 16384)]
        # Segment path vs plain path at equal total keys: 4608 fresh + 4096 cached = 8704 keys.
        cases += [AttentionCase(1, 24, 4608, 4608, 128, (4096,)), AttentionCase(1, 24, 4608, 8704, 128)]
        # Issue #4: the cached condition K/V in fp8, read in place (SDPA: dequantize, cat, attend).
        cases += [AttentionCase(1, 24, 4608, 4608, 128, (4096,), cache="fp8")]
        return cases
    return [
        AttentionCase(1, 2, 256, 256, 64, dtype="float32"),
        AttentionCase(1, 2, 160, 160, 64, (96,), dtype="float32"),
        AttentionCase(1, 2, 160, 256, 64, dtype="float32"),
        AttentionCase(1, 2, 160, 160, 64, (96,), dtype="float32", cache="fp8"),
    ]


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _sdpa_provider(backend):
    def make(q, k, v, extra):
        from torch.nn.attention import sdpa_kernel

        def run():
            # The baseline a user has without fastgen: dequantize fp8 segments, concatenate the
            # cached segments, then SDPA.
            segs = _plain(extra, q.dtype)
            kk = torch.cat([k] + [e[0].expand(q.shape[0], -1, -1, -1) for e in segs], dim=2) if segs else k
            vv = torch.cat([v] + [e[1].expand(q.shape[0], -1, -1, -1) for e in segs], dim=2) if segs else v
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kk, vv)

        return run

    return make


def _fastgen_provider(backend: str):
    def make(q, k, v, extra):
        return lambda: fastgen.ops.attention(q, k, v, extra_kv=extra, backend=backend)

    return make


def _all_attention_providers(device: torch.device) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    reasons = fastgen.ops.available_backends(device)
    for name in ("triton", "cuda", "xformers"):
        if reasons[name] is None:
            out[f"fastgen-{name}" if name != "xformers" else "xformers"] = _fastgen_provider(name)
    if device.type == "cuda":  # what "auto" measured and chose for the key (fastgen.ops.autotune)
        out["fastgen-auto"] = _fastgen_provider("auto")
    for name, backend in _sdpa_backends().items():
        out[f"sdpa-{name}"] = _sdpa_provider(backend)
    return out


@functools.lru_cache(maxsize=None)
def _runs(provider: str, device: str, dtype: str) -> bool:
    # Whether a provider takes this dtype on this device at all (e.g. SDPA's flash has no fp32).
    make = _all_attention_providers(torch.device(device))[provider]
    try:
        make(*AttentionCase(1, 1, 64, 64, 64, (16,), dtype=dtype).inputs(device))()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def attention_providers(device: torch.device | str, dtype: str = "bfloat16") -> dict[str, Callable]:
    """{provider: make(q, k, v, extra) -> run()} for the providers that run here in ``dtype``."""
    device = torch.device(device)
    return {n: m for n, m in _all_attention_providers(device).items() if _runs(n, str(device), dtype)}


def is_sdpa(provider: str) -> bool:
    """Whether ``provider`` is a baseline (one of PyTorch's SDPA backends)."""
    return provider.startswith("sdpa-")


def attention_reference_for(case: AttentionCase, q, k, v, extra) -> tuple[torch.Tensor, str]:
    """float64 reference where the logits fit in ~0.5 GB; PyTorch's default SDPA above that."""
    from fastgen.kernels.attention import attention_reference

    # fp8 segments: the reference attends to their dequantized values
    if case.B * case.H * case.Nq * case.keys <= 1 << 26:
        return attention_reference(q, k, v, _plain(extra, torch.float32), [0.0] * len(extra))[0], "float64"
    return fastgen.ops.attention(q, k, v, extra_kv=_plain(extra, q.dtype), backend="sdpa"), "sdpa (default dispatch)"


def run(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    """Median ms, TFLOP/s, max difference from the reference and peak memory of every provider
    per case; speed-ups over the best SDPA backend."""
    results = []
    for case in attention_cases(device):
        q, k, v, extra = case.inputs(device)
        ref, ref_kind = attention_reference_for(case, q, k, v, extra)
        for name, make in attention_providers(device, case.dtype).items():
            call = make(q, k, v, extra)
            out, peak = run_once(call, device)
            ms = time_ms(synced(call, device), device, budget_s)
            results.append(Result(SUITE, case.name, name, ms, tflops=case.flops / ms / 1e9,
                                  max_diff=max_diff(out, ref), peak_mb=peak, extra={"reference": ref_kind}))
            if progress:
                progress()
        del ref
    add_speedups(results, is_sdpa)
    return results
