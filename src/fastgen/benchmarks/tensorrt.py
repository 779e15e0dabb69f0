"""TensorRT suite (issue #13): fp16 engines built from ``fastgen.export.to_onnx`` exports against PyTorch
eager fp16 and ``fastgen.patch``-ed PyTorch fp16, same inputs, same run; engine build time and memory; a
weight-streaming engine at several budgets.

Per case (default: the small Flux and SD 1.5 configs of ``fastgen.models.small_denoisers``; tiny ones with
``engine_cases(("tiny",))``), the model (random weights, seed 0) is exported in float16 at the case's batch and
size (``to_onnx(..., dtype=torch.float16, validate=False, batch=, height=, width=, target=)``, the target the
installed TensorRT's operator table, ``fastgen.export.tensorrt.operator_target``), and two engines are built
from it with one static profile at the case's input shapes (``build_engine(precision="fp16", rebuild=True)``,
no timing cache: cold builds): a plain one and one with ``weight_streaming=True``. Build rows: TensorRT's
parse + build seconds (``EngineBuild.build_seconds``), the peak host RSS and the peak device memory in use while
``build_engine`` ran, each above its level at the call's start, and the engine file's size.

Step rows: one forward of each runtime on the same inputs (the case's float tensors in float16): PyTorch
eager, a ``fastgen.patch``-ed copy, the plain engine (``TensorRTDenoiser``; CUDA-graph replay, its default for
a static profile on a GPU) and the streaming engine at 100 %, 50 % and 25 % of its ``streamable_weights_size``
(``set_weight_streaming_budget``; a budget switch and one untimed call happen outside the timed part). Timing: one
untimed call of each (onnxruntime sessions, CUDA-graph capture, fastgen's autotuning), then ``merging.interleaved``:
a first call of each (its output is the row's), then ``rounds`` rounds that run every runtime in turn (a call
longer than a third of ``budget_s`` once per round, on a CPU its first call counting as the first; a shorter one
with ``core.time_ms``: CUDA events on a GPU). Per row: median ms, the rounds' min-max, the ratios of medians
eager / this, fastgen.patch / this and (for the streaming rows) plain engine / this, each with
``core.speedup_text``'s check whether the rounds' ranges are apart; the largest absolute difference from eager
fp16's output and from a float32 forward of the same (fp16-rounded) weights on the same inputs (so each
runtime's error stands beside PyTorch's own fp16 error); for the streaming rows the budget and the device memory
in use (device-wide, read after the budget's untimed call: models and both engines included, so the differences
between budgets are what streaming saves).

fp8: no row is timed. An fp8 engine needs QuantizeLinear / DequantizeLinear nodes to FLOAT8E4M3FN in the graph
(e.g. from NVIDIA ModelOpt), which ``to_onnx`` does not write; the row carries ``build_engine``'s refusal of
``precision="fp8"`` for the case's export, asked in the run.

Where it runs. TensorRT engines need TensorRT (10.1 or newer) and an NVIDIA GPU: without them, or on a
``device`` that is not CUDA, each case gets one row saying what is missing. The measurements go through a
``Meter`` (the device, which picks the clock, and a reader of device memory in use), so the same code runs on
the CPU against a stand-in ``tensorrt`` module (``tests/trt_standin.py``) with device memory "n/a"
(``measure``; ``tests/test_tensorrt_bench.py``).

``fastgen bench --suite tensorrt`` runs it and prints its tables (``tensorrt_table``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import fastgen
from fastgen.benchmarks import export
from fastgen.benchmarks.core import (PeakMemory, Result, free_memory, measured_speedup, range_text, register_table,
                                     speedup_text)
from fastgen.benchmarks.merging import interleaved, peak_kind

if TYPE_CHECKING:
    from fastgen.export.tensorrt import EngineBuild

SUITE = "tensorrt"
ROUNDS = 3
EAGER, PATCHED, ENGINE = "pytorch eager fp16", "fastgen.patch fp16", "tensorrt fp16"
FP8 = "tensorrt fp8"
BUDGETS = (1.0, 0.5, 0.25)  # fractions of the streaming engine's streamable_weights_size
FP8_STATUS = ("not measured: an fp8 engine needs QuantizeLinear / DequantizeLinear (FLOAT8E4M3FN) nodes, which "
              "to_onnx does not write; build_engine refuses precision='fp8' for this export")


def streaming(fraction: float) -> str:
    """The step row label of the streaming engine at ``fraction`` of its streamable weights."""
    return f"{ENGINE} streaming {fraction:.0%}"


@dataclass(frozen=True)
class EngineCase:
    """A model case of the export suite (``case.make()`` -> float32 CPU model and one forward's kwargs) and the
    batch and size in pixels its inputs have: the export's fixed ranges."""

    case: export.ExportCase
    batch: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return self.case.name


# Batch and pixels of each case's inputs (fastgen.models: tiny Flux 16 tokens and the tiny UNet's 8 x 8 latents
# are 64 px; the small ones 256 px, SD 1.5 with a CFG batch).
_SHAPES = {"flux tiny": (2, 64, 64), "unet tiny": (2, 64, 64), "flux small 256^2": (1, 256, 256),
           "sd15 small 256^2 cfg": (2, 256, 256)}


def engine_cases(sizes: tuple[str, ...] = ("small",)) -> list[EngineCase]:
    """The export suite's cases (``export.export_cases(sizes)``: Flux, then the SD 1.5-layout UNet) with their
    shapes; default the small ones."""
    return [EngineCase(c, *_SHAPES[c.name]) for c in export.export_cases(sizes)]


# --------------------------------------------------------------------------------------------
# Where and how it measures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Meter:
    """The seam between the cases and the GPU.

    - ``device``: where the models, engines and inputs live; timing follows it (``core.time_ms``: CUDA events
      on a GPU, the host clock elsewhere; ``core.call_ms`` synchronizes a CUDA device).
    - ``gpu_bytes``: device memory in use, bytes, device-wide (TensorRT allocates outside PyTorch's allocator,
      so ``torch.cuda.max_memory_allocated`` would miss it); None where there is none to read (reported n/a).
    """

    device: torch.device
    gpu_bytes: Callable[[], int] | None = None

    @classmethod
    def on(cls, device: torch.device | str) -> Meter:
        """``device``'s meter: on CUDA, memory in use = total - free from ``torch.cuda.mem_get_info``
        (cudaMemGetInfo: every process on the device counts); elsewhere none."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        def in_use() -> int:
            free, total = torch.cuda.mem_get_info(device)
            return total - free

        return cls(device, in_use)


class _Sampled(PeakMemory):
    """``core.PeakMemory``'s sampling thread (every 10 ms, and at entry and exit) over another reader of bytes;
    ``mb`` None where ``read`` is None."""

    def __init__(self, read: Callable[[], int] | None, kind: str):
        super().__init__("cpu")
        self._read, self.kind = read, kind


@contextlib.contextmanager
def build_memory(meter: Meter) -> Iterator[dict]:
    """Peak host RSS and peak device memory in use while the block runs, MiB above their levels at entry: the
    yielded dict gets ``rss_mb`` and ``gpu_mb`` (None where not measured) when the block ends."""
    found: dict = {}
    with PeakMemory("cpu") as start:
        pass
    gpu0 = meter.gpu_bytes() if meter.gpu_bytes is not None else None
    with PeakMemory("cpu") as rss, _Sampled(meter.gpu_bytes, "device memory in use") as gpu:
        yield found
    found["rss_mb"] = rss.mb - start.mb if rss.mb is not None and start.mb is not None else None
    found["gpu_mb"] = gpu.mb - gpu0 / 2**20 if gpu.mb is not None else None


def missing_dependency(device: torch.device | str) -> str | None:
    """None where this suite can run on ``device``, else what is missing: onnx / onnxscript (to export),
    TensorRT 10.1+ (``fastgen.export.tensorrt``'s install line), or a CUDA device."""
    from fastgen.export import tensorrt as ft

    missing = export.missing_dependency(("onnx", "onnxscript"))
    if missing:
        return f"{missing}: {export.INSTALL}"
    try:
        ft.tensorrt_version()
    except ImportError as e:
        return str(e)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return (f"TensorRT engines run on NVIDIA GPUs; this run's device is {device} (torch.cuda.is_available() is "
                f"{torch.cuda.is_available()})")
    return None


# --------------------------------------------------------------------------------------------
# A case, prepared
# --------------------------------------------------------------------------------------------


def _cast(value, device: torch.device, dtype: torch.dtype):
    """A forward's kwargs on ``device``, float tensors in ``dtype`` (nested dicts too: SDXL's added conditions)."""
    if isinstance(value, dict):
        return {k: _cast(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if value.is_floating_point() else value.dtype)
    return value


def _forward(model, inputs: dict) -> Callable:
    def run():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    return run


@dataclass
class Build:
    """One engine build: the ``EngineBuild``, and ``build_memory``'s peaks while ``build_engine`` ran."""

    engine: EngineBuild
    rss_mb: float | None
    gpu_mb: float | None

    @property
    def seconds(self) -> float:
        return self.engine.build_seconds

    @property
    def file_mb(self) -> float:
        return self.engine.sidecar["engine_bytes"] / 2**20


@dataclass
class Prepared:
    """A case exported, built and loaded: ``runs`` {label: (forward, around)} for ``merging.interleaved`` (in
    row order), the float32 reference output, the export's seconds, the two builds ("plain", "streaming"), the
    streaming engine's streamable bytes, each streaming label's budget in bytes, the device memory in use after
    each streaming label's untimed call (filled as they run), and fp8's refusal."""

    runs: dict[str, tuple[Callable, Callable]]
    reference: torch.Tensor
    export_s: float
    builds: dict[str, Build]
    streamable_bytes: int
    budgets: dict[str, int]
    fp8_refusal: str
    gpu_in_use_mb: dict[str, float | None] = field(default_factory=dict)
    cuda_graphs: bool = False


def _static_profile(inputs: dict, names: list[str]) -> dict:
    """One profile with min = opt = max = the shapes the graph's inputs (``names``) get from ``inputs``."""
    return {n: (tuple(a.shape),) * 3 for n, a in export.ort_feed(inputs, names).items()}


def _budget(denoiser, fraction: float, label: str, warm: Callable, meter: Meter, prepared: Prepared) -> Callable:
    """The ``around`` of a streaming label: set the budget where another one is set (or on first use), then one
    untimed call (contexts and CUDA graphs are made again after a budget change) and a read of device memory in
    use."""

    @contextlib.contextmanager
    def around():
        if denoiser.weight_streaming_budget != prepared.budgets[label] or label not in prepared.gpu_in_use_mb:
            denoiser.set_weight_streaming_budget(fraction)
            warm()
            prepared.gpu_in_use_mb[label] = meter.gpu_bytes() / 2**20 if meter.gpu_bytes is not None else None
        yield

    return around


def prepare(case: EngineCase, folder: Path, meter: Meter) -> Prepared:
    """Export ``case`` in float16, build both engines, load them and the PyTorch models on ``meter.device``
    (module doc). Needs TensorRT (or its stand-in) and, for a real engine, a CUDA ``meter.device``."""
    from fastgen.export import read_metadata, tensorrt as ft, to_onnx

    model, inputs = case.case.make()
    stem = folder / "".join(ch if ch.isalnum() else "_" for ch in case.name)
    path = stem.with_suffix(".onnx")
    t0 = time.perf_counter()
    to_onnx(model, path, dtype=torch.float16, validate=False, batch=case.batch, height=case.height, width=case.width,
            target=ft.operator_target(ft.tensorrt_version()))
    export_s = time.perf_counter() - t0
    device = meter.device
    eager = model.to(device, torch.float16)
    inputs = _cast(inputs, device, torch.float16)
    with torch.no_grad():  # float32 on the fp16-rounded weights and inputs
        reference = copy.deepcopy(eager).float()(**_cast(inputs, device, torch.float32), return_dict=False)[0]
    patched = copy.deepcopy(eager)
    fastgen.patch(patched)
    profile = _static_profile(inputs, read_metadata(path)["inputs"])
    builds = {}
    for kind, streams in (("plain", False), ("streaming", True)):
        with build_memory(meter) as peaks:
            built = ft.build_engine(path, stem.parent / f"{stem.name}-{kind}.engine", precision="fp16",
                                    profiles=[profile], weight_streaming=streams, rebuild=True)
        builds[kind] = Build(built, peaks["rss_mb"], peaks["gpu_mb"])
    try:
        ft.build_engine(path, stem.parent / f"{stem.name}-fp8.engine", precision="fp8", profiles=[profile])
    except ValueError as e:
        fp8_refusal = str(e)
    else:
        raise RuntimeError("build_engine accepted precision='fp8' for a to_onnx export: time fp8 engines in this "
                           "suite now")
    plain = ft.TensorRTDenoiser.load(builds["plain"].engine, device=device)
    streamer = ft.TensorRTDenoiser.load(builds["streaming"].engine, device=device)
    size = streamer.streamable_weights_size
    prepared = Prepared({}, reference, export_s, builds, size,
                        {streaming(f): ft.streaming_budget(f, size) for f in BUDGETS}, fp8_refusal,
                        cuda_graphs=plain.cuda_graphs)
    prepared.runs = {label: (_forward(m, inputs), contextlib.nullcontext)
                     for label, m in ((EAGER, eager), (PATCHED, patched), (ENGINE, plain))}
    stream_run = _forward(streamer, inputs)
    for f in BUDGETS:
        label = streaming(f)
        prepared.runs[label] = (stream_run, _budget(streamer, f, label, stream_run, meter, prepared))
    return prepared


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _ratio(base: list[float], this: list[float], base_ms: float, ms: float) -> dict:
    return dict(ratio=base_ms / ms, measured=measured_speedup(base, this), text=speedup_text(base, this))


def case_rows(case: EngineCase, folder: Path, meter: Meter, budget_s: float = 1.0, rounds: int = ROUNDS,
              progress=None) -> list[Result]:
    """The step rows of one case and its fp8 row (module doc); the build figures ride on the engines' rows."""
    from fastgen.export import tensorrt as ft

    p = prepare(case, folder, meter)
    for fn, around in p.runs.values():  # warm-up apart: onnxruntime sessions, CUDA graphs, fastgen's autotuning
        with around():
            fn()
    timed = interleaved(p.runs, meter.device, budget_s, rounds, progress)
    base, fast, plain = timed[EAGER], timed[PATCHED], timed[ENGINE]
    ref = p.reference.double()
    common = dict(tensorrt=ft.tensorrt_version(), peak_kind=peak_kind(meter.device), export_s=p.export_s,
                  cuda_graphs=p.cuda_graphs, reference="PyTorch eager fp16, same inputs, same run; fp32: the same "
                  "weights and inputs in float32")
    rows = []
    for label, t in timed.items():
        out = t.out.double()
        extra = dict(common, round_ms=t.round_ms, fp32_diff=float((out - ref).abs().max()),
                     vs_eager=_ratio(base.round_ms, t.round_ms, base.ms, t.ms),
                     vs_patched=_ratio(fast.round_ms, t.round_ms, fast.ms, t.ms))
        kind = {ENGINE: "plain", streaming(BUDGETS[0]): "streaming"}.get(label)
        if kind is not None:  # each engine's build, on its first row
            b = p.builds[kind]
            extra.update(engine=kind, build_s=b.seconds, build_rss_mb=b.rss_mb, build_gpu_mb=b.gpu_mb,
                         engine_mb=b.file_mb)
        if label in p.budgets:
            extra.update(vs_engine=_ratio(plain.round_ms, t.round_ms, plain.ms, t.ms),
                         budget_mb=p.budgets[label] / 2**20, streamable_mb=p.streamable_bytes / 2**20,
                         gpu_in_use_mb=p.gpu_in_use_mb.get(label))
        rows.append(Result(SUITE, case.name, label, t.ms, speedup=base.ms / t.ms,
                           max_diff=float((out - base.out.double()).abs().max()), peak_mb=t.peak_mb, extra=extra))
    rows.append(Result(SUITE, case.name, FP8, math.nan, extra=dict(status=FP8_STATUS, refusal=p.fp8_refusal)))
    del p, timed, base, fast, plain
    free_memory(meter.device)
    return rows


def measure(cases: list[EngineCase], meter: Meter, budget_s: float = 1.0, rounds: int = ROUNDS,
            progress=None) -> list[Result]:
    """Rows of ``cases`` measured with ``meter`` (no dependency check: ``run`` does that), in a temporary
    folder for the exports and engines."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastgen-tensorrt-bench-") as folder:
        for case in cases:
            rows += case_rows(case, Path(folder), meter, budget_s, rounds, progress)
    return rows


def run(device: torch.device | str = "cuda", budget_s: float = 1.0, progress=None, *,
        cases: list[EngineCase] | None = None, rounds: int = ROUNDS) -> list[Result]:
    """Rows of every case (``engine_cases()`` unless given) on ``device``; one row per case saying what is
    missing where onnx / onnxscript, TensorRT or a CUDA device are (``missing_dependency``)."""
    cases = engine_cases() if cases is None else cases
    missing = missing_dependency(device)
    if missing:
        return [Result(SUITE, c.name, ENGINE, math.nan, extra=dict(status=missing)) for c in cases]
    return measure(cases, Meter.on(device), budget_s, rounds, progress)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


_BASES = (("vs_eager", EAGER), ("vs_patched", PATCHED), ("vs_engine", ENGINE))


def _ratio_cell(r: Result, key: str, base: dict[str, float]) -> str:
    """A ratio column: from the row's rounds where recorded (``(ranges overlap)`` where they are not apart),
    else from the medians of ``base`` (case -> ms) and the row."""
    found = r.extra.get(key)
    if found is not None:
        return export.cell(found["ratio"], ".2f", "x") + (" (ranges overlap)" if found["measured"] is None else "")
    return export.cell(base[r.case] / r.ms, ".2f", "x") if r.case in base else ""


def _applies(r: Result, key: str, base_provider: str) -> bool:
    """Whether row ``r`` has a ratio over ``base_provider`` (not itself; the plain engine's for streaming rows)."""
    return r.provider != base_provider and (key != "vs_engine" or r.provider.startswith(f"{ENGINE} streaming"))


def _mb(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def tensorrt_table(rows: list[Result]) -> list[str]:
    """Lines of this suite's tables (a blank line and a heading first; empty without rows): per case and
    runtime, ms per forward (median; the rounds' range), the three ratios and the differences from eager fp16
    and fp32, with the streaming budget and device memory in use; then each engine's build. Rows from
    ``bench/`` carry medians only: the ratios come from the medians."""
    if not rows:
        return []
    lines = ["", "TensorRT: ms per forward, fp16 engines vs PyTorch eager fp16 and fastgen.patch fp16, same inputs, "
             "same run (interleaved rounds); ratio = that runtime's median / this median (\"ranges overlap\": the "
             "rounds' ranges are not apart); streaming: the weight-streaming engine at a budget of its streamable "
             "weights (MiB kept on the GPU), with the device memory in use at that budget.", "",
             "| case | runtime | ms / forward | min-max | eager / this | fastgen.patch / this | engine / this | "
             "max abs diff vs eager fp16 | vs fp32 | budget MiB | GPU in use MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    medians = {key: {r.case: r.ms for r in rows if r.provider == p and not r.extra.get("status")} for key, p in _BASES}
    for r in rows:
        e = r.extra
        if e.get("status"):
            lines.append(f"| {r.case} | {r.provider} | {e['status']} |  |  |  |  |  |  |  |  |")
            continue
        spread = range_text(e["round_ms"], ".3f") if e.get("round_ms") else ""
        ratios = " | ".join(_ratio_cell(r, k, medians[k]) if _applies(r, k, p) else "" for k, p in _BASES)
        budget = export.cell(e.get("budget_mb"), ".2f")
        in_use = _mb(e["gpu_in_use_mb"]) if "gpu_in_use_mb" in e else ""
        lines.append(f"| {r.case} | {r.provider} | {r.ms:.3f} | {spread} | {ratios} | {export.cell(r.max_diff, '.2e')} "
                     f"| {export.cell(e.get('fp32_diff'), '.2e')} | {budget} | {in_use} |")
    built = [r for r in rows if "build_s" in r.extra]
    if built:
        lines += ["", "TensorRT engine builds (fp16, one static profile, no timing cache): TensorRT's parse + build "
                  "seconds; peak host RSS and peak device memory in use while build_engine ran, above their levels "
                  "at its start (n/a: not measured here).", "",
                  "| case | engine | build s | peak host RSS MiB | peak GPU MiB | engine MiB | streamable MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in built:
            e = r.extra
            lines.append(f"| {r.case} | {e['engine']} | {e['build_s']:.2f} | {_mb(e['build_rss_mb'])} | "
                         f"{_mb(e['build_gpu_mb'])} | {e['engine_mb']:.2f} | "
                         f"{export.cell(e.get('streamable_mb'), '.2f')} |")
    return lines


register_table(SUITE, tensorrt_table)  # fastgen bench / bench/ tables show this suite's own columns
