"""Benchmark cases, providers, timing and tables, shared by ``bench/`` (pytest-benchmark) and the
``fastgen bench`` command, so both measure the same thing the same way.

Rules kept here: baseline and fastgen are timed in the same run on the same device; medians;
analytic FLOPs (attention: 4 * B * H * Nq * Nk * D); every result carries the environment
(device name, torch/triton/CUDA versions, commit).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgen
from fastgen.kernels._common import HAVE_TRITON, INTERPRET

# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _commit() -> str:
    if os.environ.get("FASTGEN_COMMIT"):
        return os.environ["FASTGEN_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: torch.device | str) -> dict:
    """Where a measurement was taken: device name, versions, commit, date."""
    device = torch.device(device)
    triton_version = None
    if HAVE_TRITON:
        import triton

        triton_version = triton.__version__
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        cap = None
    return {
        "device": name,
        "compute_capability": cap,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpreter": INTERPRET,
        "python": platform.python_version(),
        "fastgen": fastgen.__version__,
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def synced(fn: Callable, device: torch.device) -> Callable:
    """``fn`` followed by a device sync, so host timers measure the work, not the launch."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def time_ms(fn: Callable, device: torch.device, budget_s: float = 1.0) -> float:
    """Median milliseconds of ``fn``: CUDA events via triton's do_bench on a GPU, a host clock on CPU."""
    if device.type == "cuda" and HAVE_TRITON:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=int(budget_s * 1000), return_mode="median"))
    fn()  # warm-up (compilation, caches)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
        dt = _DTYPES[self.dtype]

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
    return provider.startswith("sdpa-")


# --------------------------------------------------------------------------------------------
# Prologue
# --------------------------------------------------------------------------------------------


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
        return 4 * self.B * self.S * self.H * self.D * _DTYPES[self.dtype].itemsize

    def inputs(self, device, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        dt = _DTYPES[self.dtype]
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
    device = torch.device(device)
    from fastgen._cuda import cuda_ext_can_run_on
    from fastgen.kernels._common import triton_can_run_on

    out = {"torch-unfused": "torch"}
    if triton_can_run_on(device) is None:
        out["fastgen-triton"] = "triton"
    if cuda_ext_can_run_on(device) is None:
        out["fastgen-cuda"] = "cuda"

    def maker(backend):
        return lambda kw: (lambda: fastgen.ops.qk_norm_rope(**kw, backend=backend))

    return {name: maker(b) for name, b in out.items()}


# --------------------------------------------------------------------------------------------
# fp8 quantization of cached K/V
# --------------------------------------------------------------------------------------------


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
        return rows * self.D * (_DTYPES[self.dtype].itemsize + 1) + rows * 4

    def inputs(self, device, seed: int = 0) -> dict:
        g = torch.Generator(device="cpu").manual_seed(seed)
        # (B, N, H, D) seen as (B, H, N, D): the layout attention K/V come in
        x = torch.randn(self.B, self.N, self.H, self.D, generator=g).to(device, _DTYPES[self.dtype]).transpose(1, 2)
        return dict(x=x)


def quantize_cases(device: torch.device | str) -> list[QuantizeCase]:
    if torch.device(device).type == "cuda":
        # a 1024^2 condition's K per Flux layer; KV-Edit's background at a 25% mask
        return [QuantizeCase(1, 24, 4096, 128), QuantizeCase(1, 24, 3072, 128)]
    return [QuantizeCase(1, 2, 77, 64, dtype="float32")]


def quantize_providers(device: torch.device | str) -> dict[str, Callable]:
    from fastgen._cuda import cuda_ext_can_run_on
    from fastgen.kernels._common import triton_can_run_on

    device = torch.device(device)
    out = {"torch-unfused": "torch"}
    if triton_can_run_on(device) is None:
        out["fastgen-triton"] = "triton"
    if cuda_ext_can_run_on(device, "quantize_fp8") is None:
        out["fastgen-cuda"] = "cuda"

    def maker(backend):
        return lambda kw: (lambda: fastgen.ops.quantize_fp8(kw["x"], backend=backend))

    return {name: maker(b) for name, b in out.items()}


def quantize_reference(case: QuantizeCase, kw: dict):
    from fastgen.kernels.fp8 import quantize_fp8_reference

    return quantize_fp8_reference(kw["x"])


def quantize_diff(out, ref) -> float:
    """max |dequantized out - dequantized reference|: 0 when the rounding matches exactly."""
    from fastgen.kernels.fp8 import dequantize_fp8

    return max_diff(dequantize_fp8(*out, torch.float64), dequantize_fp8(*ref, torch.float64))


# --------------------------------------------------------------------------------------------
# Results and tables
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    suite: str
    case: str
    provider: str
    ms: float
    tflops: float | None = None
    gbps: float | None = None
    speedup: float | None = None  # over the best baseline of the same case
    max_diff: float | None = None  # max |out - reference| (see ``extra["reference"]``)
    peak_mb: float | None = None  # peak device memory above what was allocated before (CUDA only)
    extra: dict = field(default_factory=dict)


def add_speedups(results: list[Result], baseline: Callable[[str], bool]) -> None:
    """Fill ``speedup`` of every row: best baseline ms of its case / its ms."""
    by_case: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by_case.setdefault((r.suite, r.case), []).append(r)
    for rows in by_case.values():
        base = [r.ms for r in rows if baseline(r.provider)]
        if base:
            for r in rows:
                r.speedup = min(base) / r.ms


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(results: list[Result], env: dict) -> str:
    lines = [
        f"Device: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} "
        f"| fastgen {env['fastgen']} commit {env['commit']} | {env['date']}",
        "",
    ]
    if env.get("triton_interpreter"):
        lines += ["Triton ran under its CPU interpreter: its times show correctness, not kernel speed.", ""]
    if env.get("compute_capability") is None:
        lines += ["Peak memory is measured on CUDA devices only.", ""]
    if any(r.suite not in ("condition", "edit") for r in results):
        lines += [
            "| suite | case | provider | median ms | TFLOP/s | GB/s | speed-up vs best baseline | max abs diff | peak MB |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for r in results:
        if r.suite in ("condition", "edit"):
            continue
        lines.append(
            f"| {r.suite} | {r.case} | {r.provider} | {r.ms:.3f} | {_fmt(r.tflops, '.1f')} | {_fmt(r.gbps, '.0f')} "
            f"| {_fmt(r.speedup, '.3g', 'x')} | {_fmt(r.max_diff, '.2e')} | {_fmt(r.peak_mb, '.1f')} |"
        )
    cond = [r for r in results if r.suite == "condition"]
    if cond:
        lines += ["", "Conditions: per image = first forward + (steps - 1) later forwards (the first fills the cache).",
                  "", "| case | variant | ms / image | first fwd ms | later fwd ms | tokens / image | cache MB "
                  "| vs (a) | vs (b) | max diff vs (b) | peak MB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: | ---: | ---: |"]
        base_b = {r.case: r.ms for r in cond if r.provider.startswith("(b)")}
        for r in cond:
            e = r.extra
            vs_b = base_b[r.case] / r.ms if r.case in base_b else None
            lines.append(f"| {r.case} | {r.provider} | {r.ms:.1f} | {e['first_forward_ms']:.2f} | "
                         f"{e['later_forward_ms']:.2f} | {e['tokens_per_image']} | {e['cache_mb']:.1f} | "
                         f"{_fmt(r.speedup, '.3g', 'x')} | {_fmt(vs_b, '.3g', 'x')} | {_fmt(r.max_diff, '.2e')} | "
                         f"{_fmt(r.peak_mb, '.1f')} |")
    lines += _edit_table([r for r in results if r.suite == "edit"])
    return "\n".join(lines) + "\n"


def _edit_table(rows: list[Result]) -> list[str]:
    if not rows:
        return []
    lines = ["", "KV-Edit: edit = denoising the foreground only, from one inversion (timed apart: one inversion "
             "serves many edits); speed-up of the edit over the best full generation; peak MB over inversion + edit.",
             "", "| case | path | edit ms | inversion ms | inversion + edit ms | edit speed-up | GPU cache MB "
             "| host cache MB | max resident layers | background bit-exact | max diff vs exact | peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        e = r.extra
        if "error" in e:
            lines.append(f"| {r.case} | {r.provider} | {e['error']} |  |  |  |  |  |  |  |  |  |")
            continue
        lines.append(f"| {r.case} | {r.provider} | {r.ms:.1f} | {_fmt(e.get('inversion_ms'), '.1f')} | "
                     f"{e['total_ms']:.1f} | {_fmt(r.speedup, '.3g', 'x')} | {_fmt(e.get('cache_mb'), '.1f')} | "
                     f"{_fmt(e.get('host_mb'), '.1f')} | {_fmt(e.get('max_resident_layers'), 'd')} | "
                     f"{e.get('background_exact', '')} | {_fmt(r.max_diff, '.2e')} | {_fmt(r.peak_mb, '.1f')} |")
    return lines


def save(results: list[Result], env: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2))
    m.write_text(markdown_table(results, env))
    return j, m


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_once(run: Callable, device: torch.device):
    """(output, peak MB allocated above what was live before, or None off CUDA) of one call."""
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def max_diff(out, ref) -> float:
    out = out[0] if isinstance(out, tuple) else out
    ref = ref[0] if isinstance(ref, tuple) else ref
    return float((out.double() - ref.double()).abs().max())


def attention_reference_for(case: AttentionCase, q, k, v, extra) -> tuple[torch.Tensor, str]:
    """float64 reference where the logits fit in ~0.5 GB; PyTorch's default SDPA above that."""
    from fastgen.kernels.attention import attention_reference

    # fp8 segments: the reference attends to their dequantized values
    if case.B * case.H * case.Nq * case.keys <= 1 << 26:
        return attention_reference(q, k, v, _plain(extra, torch.float32), [0.0] * len(extra))[0], "float64"
    return fastgen.ops.attention(q, k, v, extra_kv=_plain(extra, q.dtype), backend="sdpa"), "sdpa (default dispatch)"


def run_attention(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    results = []
    for case in attention_cases(device):
        q, k, v, extra = case.inputs(device)
        ref, ref_kind = attention_reference_for(case, q, k, v, extra)
        for name, make in attention_providers(device, case.dtype).items():
            run = make(q, k, v, extra)
            out, peak = run_once(run, device)
            ms = time_ms(synced(run, device), device, budget_s)
            results.append(Result("attention", case.name, name, ms, tflops=case.flops / ms / 1e9,
                                  max_diff=max_diff(out, ref), peak_mb=peak, extra={"reference": ref_kind}))
            if progress:
                progress()
        del ref
    add_speedups(results, is_sdpa)
    return results


def _run_bandwidth(suite: str, cases, providers: dict, reference: Callable, device, budget_s, progress,
                   diff: Callable = None, ref_kind: str = "float64") -> list[Result]:
    """A memory-bound op's suite: GB/s of each provider per case, against ``reference(case, kw)``."""
    diff = diff or max_diff
    results = []
    for case in cases:
        kw = case.inputs(device)
        ref = reference(case, kw)
        for name, make in providers.items():
            run = make(kw)
            out, peak = run_once(run, device)
            ms = time_ms(synced(run, device), device, budget_s)
            results.append(Result(suite, case.name, name, ms, gbps=case.bytes / ms / 1e6, max_diff=diff(out, ref),
                                  peak_mb=peak, extra={"reference": ref_kind}))
            if progress:
                progress()
    add_speedups(results, lambda p: p == "torch-unfused")
    return results


def prologue_reference(case: PrologueCase, kw: dict) -> torch.Tensor:
    from fastgen.kernels.qk_norm_rope import qk_norm_rope_reference

    return qk_norm_rope_reference(kw["q"], kw["q_weight"], kw["cos"], kw["sin"], 1e-6, case.norm, case.rope)


def run_prologue(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    return _run_bandwidth("prologue", prologue_cases(device), prologue_providers(device), prologue_reference, device,
                          budget_s, progress)


def run_quantize(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    return _run_bandwidth("quantize", quantize_cases(device), quantize_providers(device), quantize_reference, device,
                          budget_s, progress, diff=quantize_diff, ref_kind="PyTorch e4m3 rounding")


def run_denoisers(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    """Per-step time and peak memory of each denoiser, diffusers vs fastgen.patch, same run."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for case in denoiser_cases(device):
        model = case.build(device, dtype)
        inputs = case.inputs(device, dtype)
        step = denoiser_step(model, inputs, case.forwards_per_step)
        ref = None
        for provider in ("diffusers", "fastgen"):
            if provider == "fastgen":
                fastgen.patch(model)
            run_once(step, device)  # warm-up: compilation, autotuning, first K/V cache fill
            out, peak = run_once(step, device)
            ref = out if ref is None else ref
            ms = time_ms(synced(step, device), device, budget_s)
            results.append(Result("denoiser", f"{case.name} ({case.forwards_per_step} fwd/step)", provider, ms,
                                  max_diff=max_diff(out, ref), peak_mb=peak, extra={"reference": "diffusers, same run"}))
            if progress:
                progress()
        fastgen.unpatch(model)
        del model, inputs, step, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(results, lambda p: p == "diffusers")
    return results


SUITES = {"attention": run_attention, "prologue": run_prologue, "quantize": run_quantize, "denoiser": run_denoisers}


# --------------------------------------------------------------------------------------------
# Denoisers: time per denoising step, diffusers vs fastgen.patch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenoiserCase:
    """One denoiser at one size: its diffusers class, config, inputs, and forwards per step."""

    name: str
    cls: str
    config: dict
    inputs: Callable  # (device, dtype) -> kwargs of one forward
    forwards_per_step: int = 1  # Wan runs CFG as two calls

    def build(self, device, dtype) -> torch.nn.Module:
        import diffusers

        # Built on the device in the target dtype: a 12B Flux initialises there, with no fp32 copy.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = getattr(diffusers, self.cls)(**self.config)
        finally:
            torch.set_default_dtype(previous)
        return model.to(device, dtype).eval()


def _randn(device, dtype, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(device, dtype)


def _flux_inputs(B, tokens, txt, ch, joint, pooled, guidance):
    side = int(tokens**0.5)

    def make(device, dtype):
        ids = torch.zeros(tokens, 3, device=device)
        ids[:, 1], ids[:, 2] = torch.arange(tokens) // side, torch.arange(tokens) % side
        kw = dict(hidden_states=_randn(device, dtype, B, tokens, ch), encoder_hidden_states=_randn(device, dtype, B, txt, joint),
                  pooled_projections=_randn(device, dtype, B, pooled), timestep=torch.full((B,), 0.5, device=device, dtype=dtype),
                  img_ids=ids, txt_ids=torch.zeros(txt, 3, device=device))
        if guidance:
            kw["guidance"] = torch.full((B,), 3.5, device=device, dtype=dtype)
        return kw

    return make


def _unet_inputs(B, side, ch, txt, ctx, xl):
    def make(device, dtype):
        kw = dict(sample=_randn(device, dtype, B, ch, side, side), timestep=torch.full((B,), 500.0, device=device),
                  encoder_hidden_states=_randn(device, dtype, B, txt, ctx))
        if xl:
            kw["added_cond_kwargs"] = dict(text_embeds=_randn(device, dtype, B, 1280),
                                           time_ids=torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * B, device=device, dtype=dtype))
        return kw

    return make


def _sd3_inputs(B, side, ch, txt, joint, pooled):
    def make(device, dtype):
        return dict(hidden_states=_randn(device, dtype, B, ch, side, side), encoder_hidden_states=_randn(device, dtype, B, txt, joint),
                    pooled_projections=_randn(device, dtype, B, pooled), timestep=torch.full((B,), 500.0, device=device))

    return make


def _wan_inputs(B, frames, h, w, ch, txt, text_dim):
    def make(device, dtype):
        return dict(hidden_states=_randn(device, dtype, B, ch, frames, h, w), encoder_hidden_states=_randn(device, dtype, B, txt, text_dim),
                    timestep=torch.full((B,), 500.0, device=device))

    return make


def _hunyuan_inputs(B, frames, h, w, ch, txt, real_txt, text_dim, pooled):
    def make(device, dtype):
        mask = torch.zeros(B, txt, dtype=torch.long, device=device)
        mask[:, :real_txt] = 1  # the prompt's real tokens; the rest is padding, masked
        return dict(hidden_states=_randn(device, dtype, B, ch, frames, h, w), timestep=torch.full((B,), 500.0, device=device),
                    encoder_hidden_states=_randn(device, dtype, B, txt, text_dim), encoder_attention_mask=mask,
                    pooled_projections=_randn(device, dtype, B, pooled), guidance=torch.full((B,), 6.0, device=device, dtype=dtype))

    return make


def denoiser_cases(device: torch.device | str) -> list[DenoiserCase]:
    """Real configs on a GPU (issue #3: Flux-dev, SDXL, SD3.5-medium at 1024^2, Wan 1.3B 480p 33
    frames, HunyuanVideo 544x960 33 frames); small ones on a CPU, where the suite shows only that
    patching costs nothing."""
    if torch.device(device).type == "cuda":
        sdxl_unet = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                         addition_embed_type="text_time", addition_time_embed_dim=256,
                         projection_class_embeddings_input_dim=2816, use_linear_projection=True)
        return [
            DenoiserCase("flux-dev 1024^2", "FluxTransformer2DModel",
                         dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                              guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                         _flux_inputs(1, 4096, 512, 64, 4096, 768, True)),
            DenoiserCase("sdxl 1024^2 cfg", "UNet2DConditionModel", sdxl_unet, _unet_inputs(2, 128, 4, 77, 2048, True)),
            DenoiserCase("sd3.5-medium 1024^2 cfg", "SD3Transformer2DModel",
                         dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                              num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                              dual_attention_layers=tuple(range(13))),
                         _sd3_inputs(2, 128, 16, 333, 4096, 2048)),
            DenoiserCase("wan2.1-1.3b 480p 33f cfg", "WanTransformer3DModel",
                         dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                              out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                              cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024),
                         _wan_inputs(1, 9, 60, 104, 16, 512, 4096), forwards_per_step=2),
            # 544x960, 33 frames: 9 latent frames x 34 x 60 patches = 18360 video tokens + 256 text
            DenoiserCase("hunyuanvideo 544x960 33f", "HunyuanVideoTransformer3DModel",
                         dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                              num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                              patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                              pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
                         _hunyuan_inputs(1, 9, 68, 120, 16, 256, 40, 4096, 768)),
        ]
    return [
        DenoiserCase("flux small 256^2", "FluxTransformer2DModel",
                     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)),
                     _flux_inputs(1, 256, 32, 16, 64, 32, False)),
        DenoiserCase("sd15 small 256^2 cfg", "UNet2DConditionModel",
                     dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                          attention_head_dim=(1, 2), norm_num_groups=8),
                     _unet_inputs(2, 32, 4, 77, 64, False)),
        DenoiserCase("wan small cfg", "WanTransformer3DModel",
                     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                          out_channels=4, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
                     _wan_inputs(1, 3, 16, 16, 4, 32, 32), forwards_per_step=2),
        DenoiserCase("hunyuanvideo small", "HunyuanVideoTransformer3DModel",
                     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                          num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                          qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
                          rope_axes_dim=(8, 12, 12)),
                     _hunyuan_inputs(1, 3, 16, 16, 4, 32, 20, 32, 16)),
    ]


def denoiser_step(model, inputs: dict, forwards: int) -> Callable:
    """One denoising step: ``forwards`` calls of the model (CFG as separate calls when 2)."""

    def step():
        with torch.no_grad():
            out = None
            for _ in range(forwards):
                out = model(**inputs, return_dict=False)[0]
            return out

    return step


# --------------------------------------------------------------------------------------------
# Conditions (OminiControl2): per-image cost of conditioning, four ways
# --------------------------------------------------------------------------------------------

CONDITION_VARIANTS = ("(a) symmetric", "(b) asymmetric", "(c) cached", "(d) cached+compact")


@dataclass(frozen=True)
class ConditionCase:
    """A Flux model, an output size and conditions (token grids, full and compact), 28 steps."""

    name: str
    model: DenoiserCase
    grid: int  # output token grid side (1024^2 -> 64)
    conditions: int
    compact_grid: int  # condition token grid side in the compact variant (512^2 -> 32)
    steps: int = 28


def condition_cases(device: torch.device | str) -> list[ConditionCase]:
    """Flux-dev at 1024^2 with 1 and 3 conditions of 1024^2 (compact: 512^2) on a GPU; a small
    Flux at 256^2 on a CPU, where the times show the work saved, not kernel speed."""
    if torch.device(device).type == "cuda":
        flux = denoiser_cases(device)[0]
        return [ConditionCase(f"flux-dev 1024^2, {n} x 1024^2 cond", flux, 64, n, 32) for n in (1, 3)]
    flux = denoiser_cases(device)[0]
    return [ConditionCase(f"flux small 256^2, {n} x 256^2 cond", flux, 16, n, 8) for n in (1, 3)]


def _condition_setup(case: ConditionCase, variant: str, device, dtype):
    from fastgen.condition import ConditionConfig
    from fastgen.condition.branches import Branch
    from fastgen.flux_latents import grid_ids

    side = case.compact_grid if variant.startswith("(d)") else case.grid
    ch = case.model.config["in_channels"]
    branches = []
    for i in range(case.conditions):
        tokens = torch.randn(1, side * side, ch, generator=torch.Generator().manual_seed(100 + i)).to(device, dtype)
        ids = grid_ids(side, side, scale=case.grid / side, delta=(0, -case.grid * (i + 1)), device=device)
        branches.append(Branch(tokens, ids))
    config = {"(a)": ConditionConfig(attention="symmetric"), "(b)": ConditionConfig(kv_cache=False)}.get(
        variant[:3], ConditionConfig())
    return branches, config


def condition_runs(model, inputs: dict, branches, config) -> tuple[Callable, Callable, Callable]:
    """(first, step, state_of): ``first`` runs a generation's first forward (it fills the cache
    where there is one), ``step`` a later forward, each returning the model output."""
    from fastgen.condition.branches import BranchState, branch_forward

    warm = BranchState.create(model, branches, config)

    def first():
        with torch.no_grad():
            return branch_forward(model, BranchState.create(model, branches, config), **inputs, return_dict=False)[0]

    def step():
        with torch.no_grad():
            return branch_forward(model, warm, **inputs, return_dict=False)[0]

    step()  # the first call of ``warm``: later calls are steady-state steps
    return first, step, lambda: warm


def run_conditions(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    """Per-image time (first forward + (steps - 1) later ones) and peak memory of each variant."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    model = None
    for case in condition_cases(device):
        if model is None:
            model = case.model.build(device, dtype)
        inputs = case.model.inputs(device, dtype)
        ref_step = None
        for variant in CONDITION_VARIANTS:  # warm-up of every path (allocator, kernels, autotuning)
            run_once(condition_runs(model, inputs, *_condition_setup(case, variant, device, dtype))[0], device)
        for variant in CONDITION_VARIANTS:
            branches, config = _condition_setup(case, variant, device, dtype)
            first, step, state_of = condition_runs(model, inputs, branches, config)
            out, peak = run_once(first, device)
            step_out = step()
            first_ms = time_ms(synced(first, device), device, budget_s)
            step_ms = first_ms if not config.use_cache else time_ms(synced(step, device), device, budget_s)
            per_image = first_ms + (case.steps - 1) * step_ms
            main = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
            cond = sum(b.tokens.shape[1] for b in branches)
            tokens = (main + cond) * (1 if config.use_cache else case.steps) + main * (case.steps - 1) * config.use_cache
            diff = None
            if variant.startswith("(b)"):
                ref_step = step_out
            elif ref_step is not None:
                diff = max_diff(step_out, ref_step)
            cache = state_of().cache
            results.append(Result(
                "condition", case.name, variant, per_image, max_diff=diff, peak_mb=peak,
                extra={"reference": "(b) asymmetric, same inputs" if diff is not None else None, "steps": case.steps,
                       "first_forward_ms": first_ms, "later_forward_ms": step_ms, "tokens_per_image": tokens,
                       "cache_mb": cache.nbytes / 2**20 if cache is not None else 0.0},
            ))
            if progress:
                progress()
            del first, step, out, step_out
        del inputs
    add_speedups(results, lambda p: p.startswith("(a)"))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


SUITES["condition"] = run_conditions


# --------------------------------------------------------------------------------------------
# KV-Edit: inversion + edit per cache option, vs a full re-generation
# --------------------------------------------------------------------------------------------

EDIT_BASELINES = ("full generation (diffusers)", "full generation (fastgen.patch)")
# KVEditor.edit options per path; the first is the exact reference of the others' foreground.
EDIT_PATHS = {
    "kv-edit, device cache": {},
    "kv-edit, device fp8 cache": dict(cache_dtype="fp8"),
    "kv-edit, cpu cache (pinned)": dict(cache_device="cpu"),
    "kv-edit, cpu fp8 cache": dict(cache_device="cpu", cache_dtype="fp8"),
    "kv-edit, inversion-free": dict(inversion_free=True),
}


@dataclass(frozen=True)
class EditCase:
    """A Flux model, an image side in pixels, a centred square mask of ``mask_fraction``."""

    name: str
    model: DenoiserCase | None  # None: the pipeline is built elsewhere (``fastgen demo --task edit``)
    side: int
    mask_fraction: float = 0.25
    steps: int = 28
    skip_steps: int = 4


def edit_cases(device: torch.device | str) -> list[EditCase]:
    """Flux-dev at 1024^2 on a GPU (issue #4); a small Flux at 256^2 on a CPU."""
    flux = denoiser_cases(device)[0]
    if torch.device(device).type == "cuda":
        return [EditCase("flux-dev 1024^2, 25% mask", flux, 1024)]
    return [EditCase("flux small 256^2, 25% mask", flux, 256)]


@dataclass
class EditBench:
    """A Flux pipeline around the case's transformer (a small VAE: timing is the transformer's),
    its text inputs, a source image and mask, and the KVEditor."""

    case: EditCase
    pipe: object
    text: dict  # prompt_embeds, pooled_prompt_embeds
    image: torch.Tensor  # (3, side, side) in [0, 1]
    mask: torch.Tensor  # (side, side) bool
    editor: object
    target_text: dict | None = None  # target_prompt_embeds, target_pooled_prompt_embeds (default: reversed source)

    def generate(self):
        """A full ``steps``-step generation at the image's size: what an edit replaces."""
        with torch.no_grad():
            return self.pipe(**self.text, num_inference_steps=self.case.steps, height=self.case.side,
                             width=self.case.side, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    @property
    def source(self) -> dict:
        return dict(source_prompt_embeds=self.text["prompt_embeds"],
                    source_pooled_prompt_embeds=self.text["pooled_prompt_embeds"])

    @property
    def target(self) -> dict:
        if self.target_text is not None:
            return self.target_text
        return dict(target_prompt_embeds=self.text["prompt_embeds"].flip(1),  # the same tokens, reversed
                    target_pooled_prompt_embeds=self.text["pooled_prompt_embeds"])

    @property
    def schedule(self) -> dict:
        return dict(num_inference_steps=self.case.steps, skip_steps=self.case.skip_steps)

    def invert(self, options: dict):
        cache = {k: v for k, v in options.items() if k.startswith("cache_")}
        return self.editor.invert(self.image, self.mask, **self.source, **self.schedule, **cache)

    def denoise(self, inversion):
        return self.editor.denoise(inversion, **self.target, output_type="latent")

    def edit(self, options: dict):
        return self.editor.edit(self.image, self.mask, **self.source, **self.target, **self.schedule, **options,
                                output_type="latent", generator=torch.Generator().manual_seed(0))

    @functools.cached_property
    def source_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (1, N, C) the encoded source, fg (N,) bool the edited tokens); encoded once per bench."""
        from fastgen import flux_latents as fl

        x0, _ = fl.encode_image(self.pipe, self.image)
        return x0, fl.token_mask(self.mask, self.case.side, self.case.side, fl.pixels_per_token(self.pipe)).to(x0.device)


def edit_bench(case: EditCase, device, dtype) -> EditBench:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fastgen.demo import _vae
    from fastgen.edit import KVEditor

    model = case.model.build(device, dtype)
    vae = _vae(case.model.config["in_channels"] // 4, flux_style=True).eval().to(device, dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    inputs = case.model.inputs(device, dtype)
    text = dict(prompt_embeds=inputs["encoder_hidden_states"], pooled_prompt_embeds=inputs["pooled_projections"])
    image = torch.rand(3, case.side, case.side, generator=torch.Generator().manual_seed(5))
    return EditBench(case, pipe, text, image, centre_mask(case.side, case.mask_fraction), KVEditor(pipe))


def centre_mask(side: int, fraction: float) -> torch.Tensor:
    """(side, side) bool: a centred square of ``fraction`` of the image, on the 16-px token grid."""
    mask = torch.zeros(side, side, dtype=torch.bool)
    half = round(side * fraction**0.5 / 32) * 16
    mask[side // 2 - half : side // 2 + half, side // 2 - half : side // 2 + half] = True
    return mask


def time_runs_ms(fn: Callable, device: torch.device, repeats: int) -> float:
    """Median ms of ``repeats`` synced calls: for runs of seconds (do_bench would call ~10 times)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned chunks of an offloaded cache
            torch._C._host_emptyCache()


def edit_path_result(bench: EditBench, path: str, device, repeats: int, reference=None,
                     edit_timer: Callable | None = None) -> tuple[Result, object]:
    """One path's row: edit ms (without inversion), inversion ms, peak memory, cache sizes, whether
    the background is bit-exact, foreground difference from ``reference`` = (path, latents) of
    an exact path; and its output latents. ``edit_timer(fn) -> ms`` times the edit (default:
    ``repeats`` synced runs; bench/ hands in pytest-benchmark's)."""
    options = EDIT_PATHS[path]
    edit_timer = edit_timer or (lambda fn: time_runs_ms(fn, device, repeats))
    if options.get("inversion_free"):  # no separate inversion: the whole edit is the time
        out, peak = run_once(lambda: bench.edit(options), device)
        ms = edit_timer(lambda: bench.edit(options))
        inv_ms, total = None, ms
    else:
        (inv, out), peak = run_once(lambda: (lambda i: (i, bench.denoise(i)))(bench.invert(options)), device)
        ms = edit_timer(lambda: bench.denoise(inv))  # one inversion serves many edits
        inv.release()
        del inv
        _free(device)
        inv_ms = time_runs_ms(lambda: bench.invert(options).release(), device, repeats)
        total = inv_ms + ms
    x0, fg = bench.source_latents
    diff = None  # inversion-free is another method; fp8 and offload are compared with the exact cache
    if reference is not None and not options.get("inversion_free"):
        diff = max_diff(out.latents, reference[1])
    stats = out.stats
    _free(device)
    return Result("edit", bench.case.name, path, ms, max_diff=diff, peak_mb=peak, extra={
        "reference": f"{reference[0]} (same run)" if diff is not None else None,
        "inversion_ms": inv_ms, "total_ms": total, "cache_mb": stats["cache_bytes"] / 2**20,
        "host_mb": stats["host_cache_bytes"] / 2**20, "max_resident_layers": stats["max_resident_layers"],
        "forwards": stats["forwards"], "edited_tokens": stats["edited_tokens"], "tokens": stats["tokens"],
        "background_exact": torch.equal(out.latents[:, ~fg], x0[:, ~fg])}), out.latents


def edit_baseline_result(bench: EditBench, provider: str, device, repeats: int,
                         timer: Callable | None = None) -> Result:
    """A full generation's row, diffusers' own or under ``fastgen.patch``."""
    handle = fastgen.patch(bench.pipe) if "fastgen" in provider else None
    try:
        out, peak = run_once(bench.generate, device)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{provider}: non-finite latents")
        ms = (timer or (lambda fn: time_runs_ms(fn, device, repeats)))(bench.generate)
    finally:
        if handle is not None:
            handle.remove()
    _free(device)
    return Result("edit", bench.case.name, provider, ms, peak_mb=peak,
                  extra={"inversion_ms": None, "total_ms": ms, "forwards": bench.case.steps})


def _oom_result(case: EditCase, path: str, err: Exception) -> Result:
    return Result("edit", case.name, path, float("nan"), extra={"error": f"{type(err).__name__}: {str(err)[:120]}"})


def run_edits(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    """KV-Edit per cache option vs a full generation: edit ms, inversion ms, peak memory, cache."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = 2 if device.type == "cuda" else 3
    results = []
    for case in edit_cases(device):
        bench = edit_bench(case, device, dtype)
        for provider in EDIT_BASELINES:
            results.append(edit_baseline_result(bench, provider, device, repeats))
            if progress:
                progress()
        reference = None  # the first exact path that fits: the device cache, else the offloaded one
        for path in EDIT_PATHS:
            try:
                row, latents = edit_path_result(bench, path, device, repeats, reference)
                if reference is None and set(EDIT_PATHS[path]) <= {"cache_device"}:
                    reference = (path, latents)
            except torch.cuda.OutOfMemoryError as err:  # a 28-step device cache may not fit: say so
                row = _oom_result(case, path, err)
                _free(device)
            results.append(row)
            if progress:
                progress()
        del bench
        _free(device)
    add_speedups(results, lambda p: p.startswith("full generation"))
    return results


SUITES["edit"] = run_edits
