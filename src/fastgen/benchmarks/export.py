"""ONNX export suite (issue #13): onnxruntime's CPU execution provider against PyTorch eager on the same
inputs, in the same run, for the tiny and small Flux and UNet (SD 1.5 layout) configs.

Per case, the model (float32, random weights, seed 0) is exported with ``fastgen.export.to_onnx`` at
its defaults (dynamic batch, size and text length: the graph a user ships) into a temporary folder, and
one forward of each runtime is timed: a first call of each (warm-up; its output is compared and its
peak memory kept), then ``rounds`` rounds that run both in turn (``merging.interleaved``: a call
longer than a third of ``budget_s`` once per round, a shorter one with ``core.time_ms``), so a change
in the machine's load hits both alike. Rows: median ms per forward, the rounds' min-max, the ratio of
medians PyTorch / onnxruntime (``core.speedup_text`` says whether the ranges are apart), the largest
absolute difference of onnxruntime's output from PyTorch's and that relative to the largest |output|,
export seconds and the file size. onnxruntime runs with as many intra-op threads as torch
(``torch.get_num_threads()``), its default graph optimizations on.

This suite measures the CPU, whatever ``device`` the caller names (the issue's comparison; CUDA and
TensorRT execution providers are other suites' concern). Without onnx / onnxscript / onnxruntime each
case gets one row saying what to install.

``fastgen bench --suite export`` runs it and prints its table (``export_table``).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgen import models
from fastgen.benchmarks.core import Result, measured_speedup, range_text, register_table, speedup_text
from fastgen.benchmarks.merging import interleaved, peak_kind

SUITE = "export"
ROUNDS = 3
EAGER, ORT = "pytorch eager", "onnxruntime cpu"
RUNTIMES = (EAGER, ORT)
INSTALL = "pip install 'fastgen[onnx]' (onnx, onnxscript, onnxruntime)"


@dataclass(frozen=True)
class ExportCase:
    """A model and one forward's inputs: ``make()`` -> (model in eval mode, kwargs), float32 on the CPU."""

    name: str
    make: Callable[[], tuple[torch.nn.Module, dict]]


def _tiny(name: str) -> Callable:
    return lambda: models.tiny_denoiser(name)


def _small(cls: str) -> Callable:
    def make():
        spec = next(s for s in models.small_denoisers() if s.cls == cls)
        torch.manual_seed(0)
        return spec.build("cpu", torch.float32), spec.inputs("cpu", torch.float32)

    return make


def export_cases(sizes: tuple[str, ...] = ("tiny", "small")) -> list[ExportCase]:
    """Tiny (``models.tiny_denoiser``: Flux with 16 image tokens, the SD 1.5-layout UNet at 8 x 8
    latents, batch 2) and small (``models.small_denoisers``: Flux at 256^2, SD 1.5 at 256^2 with a CFG
    batch) cases, in that order, for the sizes named."""
    cases = {"tiny": [ExportCase("flux tiny", _tiny("flux")), ExportCase("unet tiny", _tiny("unet"))],
             "small": [ExportCase("flux small 256^2", _small("FluxTransformer2DModel")),
                       ExportCase("sd15 small 256^2 cfg", _small("UNet2DConditionModel"))]}
    unknown = [s for s in sizes if s not in cases]
    if unknown:
        raise ValueError(f"sizes must be among {tuple(cases)}, got {unknown}")
    return [c for s in sizes for c in cases[s]]


def missing_dependency(modules: tuple[str, ...] = ("onnx", "onnxscript", "onnxruntime")) -> str | None:
    """None where ``modules`` (default onnx, onnxscript and onnxruntime) import, else what is missing."""
    for module in modules:
        try:
            __import__(module)
        except ImportError as e:
            return f"{module} is not installed ({e})"
    return None


def ort_session(path, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` of ``path`` on the CPU provider with ``threads`` intra-op
    threads (default: ``torch.get_num_threads()``, so both runtimes use the same cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_feed(inputs: dict, names: list[str]) -> dict:
    """The graph's inputs (``names``, from ``read_metadata``) as numpy arrays, from a forward's kwargs
    (a UNet's ``added_cond_kwargs`` flattened: the graph takes ``text_embeds`` / ``time_ids`` as inputs)."""
    flat = dict(inputs)
    flat.update(flat.pop("added_cond_kwargs", None) or {})
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(f"the forward's inputs lack {missing} of the graph's {names}")
    return {n: flat[n].detach().cpu().numpy() for n in names}


@dataclass
class Exported:
    """A case exported: the model and inputs, the two runtimes' forwards, export seconds and file bytes."""

    model: torch.nn.Module
    inputs: dict
    runs: dict[str, Callable]
    export_s: float
    file_bytes: int


def export_case(case: ExportCase, folder: Path) -> Exported:
    """Build, export (``to_onnx`` defaults, no validation: this suite compares) and load ``case``."""
    from fastgen.export import read_metadata, to_onnx

    model, inputs = case.make()
    path = folder / ("".join(ch if ch.isalnum() else "_" for ch in case.name) + ".onnx")
    t0 = time.perf_counter()
    report = to_onnx(model, path, validate=False)
    export_s = time.perf_counter() - t0
    session = ort_session(path)
    meta = read_metadata(path)
    output, feed = meta["output"], ort_feed(inputs, meta["inputs"])

    def eager():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    def onnxruntime():
        return torch.from_numpy(session.run([output], feed)[0])

    return Exported(model, inputs, {EAGER: eager, ORT: onnxruntime}, export_s, report.file_bytes)


def case_rows(case: ExportCase, folder: Path, budget_s: float = 1.0, rounds: int = ROUNDS,
              progress=None) -> list[Result]:
    """The two rows of one case (module doc)."""
    import onnxruntime

    cpu = torch.device("cpu")
    exported = export_case(case, folder)
    timed = interleaved({k: (fn, contextlib.nullcontext) for k, fn in exported.runs.items()}, cpu, budget_s, rounds,
                        progress)
    base = timed[EAGER]
    ref = base.out.double()
    scale = float(ref.abs().max())
    rows = []
    for label, t in timed.items():
        diff = float((t.out.double() - ref).abs().max())
        extra = dict(round_ms=t.round_ms, rel_diff=diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf),
                     export_s=exported.export_s, file_mb=exported.file_bytes / 2**20, threads=torch.get_num_threads(),
                     onnxruntime=onnxruntime.__version__, peak_kind=peak_kind(cpu),
                     reference="PyTorch eager, same inputs, same run",
                     measured_speedup=measured_speedup(base.round_ms, t.round_ms),
                     speedup_text=speedup_text(base.round_ms, t.round_ms))
        rows.append(Result(SUITE, case.name, label, t.ms, speedup=base.ms / t.ms, max_diff=diff, peak_mb=t.peak_mb,
                           extra=extra))
    return rows


def run(device: torch.device | str = "cpu", budget_s: float = 1.0, progress=None, *,
        cases: list[ExportCase] | None = None, rounds: int = ROUNDS) -> list[Result]:
    """Rows of every case (``export_cases()`` unless given), on the CPU whatever ``device`` is (module
    doc); one row per case saying what to install where onnx / onnxscript / onnxruntime are missing."""
    cases = export_cases() if cases is None else cases
    missing = missing_dependency()
    if missing:
        return [Result(SUITE, c.name, ORT, float("nan"), extra=dict(status=f"{missing}: {INSTALL}")) for c in cases]
    results = []
    with tempfile.TemporaryDirectory(prefix="fastgen-export-bench-") as folder:
        for case in cases:
            results += case_rows(case, Path(folder), budget_s, rounds, progress)
    return results


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def cell(x, spec: str, suffix: str = "") -> str:
    """A table cell: ``x`` formatted with ``spec`` and ``suffix``; empty for None or NaN."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def export_table(rows: list[Result]) -> list[str]:
    """Lines of this suite's table (a blank line and a heading first; empty without rows): per case and
    runtime, ms per forward (median; the rounds' range where recorded), PyTorch / onnxruntime, the
    difference from PyTorch, export seconds and file size. Rows from ``bench/`` carry no rounds: the
    ratio is then computed from the two medians."""
    if not rows:
        return []
    threads = next((r.extra["threads"] for r in rows if "threads" in r.extra), None)
    each = f" ({threads} thread{'s' if threads != 1 else ''} each)" if threads else ""
    lines = ["", f"ONNX export: ms per forward on the CPU{each}, onnxruntime (CPU execution provider) vs PyTorch "
             "eager, same inputs, same run (fastgen bench: interleaved rounds; bench/: pytest-benchmark); ratio = "
             "PyTorch median / this median (\"ranges overlap\": the rounds' ranges are not apart); max abs diff from "
             "PyTorch's output and that relative to its largest |value|.", "",
             "| case | runtime | ms / forward | min-max | PyTorch / this | max abs diff | rel. diff | export s | "
             "ONNX MiB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    eager = {r.case: r.ms for r in rows if r.provider == EAGER}
    for r in rows:
        e = r.extra
        if e.get("status"):
            lines.append(f"| {r.case} | {r.provider} | {e['status']} |  |  |  |  |  |  |")
            continue
        ratio = eager[r.case] / r.ms if r.case in eager and r.provider != EAGER else None
        ratio_text = cell(ratio, ".2f", "x")
        if ratio is not None and "measured_speedup" in e and e["measured_speedup"] is None:
            ratio_text += " (ranges overlap)"
        spread = range_text(e["round_ms"], ".3f") if e.get("round_ms") else ""
        lines.append(f"| {r.case} | {r.provider} | {r.ms:.3f} | {spread} | {ratio_text} | {cell(r.max_diff, '.2e')} "
                     f"| {cell(e.get('rel_diff'), '.2e')} | {cell(e.get('export_s'), '.1f')} | "
                     f"{cell(e.get('file_mb'), '.2f')} |")
    return lines


register_table(SUITE, export_table)  # fastgen bench / bench/ tables show this suite's own columns
