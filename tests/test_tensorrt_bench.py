"""The TensorRT benchmark suite end to end on the CPU against the stand-in ``tensorrt`` (``tests/trt_standin.py``:
engines are the ONNX graph run by onnxruntime; see tests/test_export_tensorrt.py), on the tiny Flux case: the
rows of every runtime and budget with finite times from interleaved rounds, ratios computed from those times,
each runtime's fp16 error within twice PyTorch's own (eager fp16 against float32, flash-attention's rule), the
build figures, the fp8 row carrying build_engine's refusal, device memory "n/a" where the meter has no reader
(and measured through the meter's seam where it has one), the suite's own tables, and the rows saying what is
missing (TensorRT, a CUDA device, onnxscript)."""

from __future__ import annotations

import logging
import math
import statistics
import sys

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import trt_standin  # noqa: E402

from fastgen.benchmarks import SUITES, environment, markdown_table  # noqa: E402
from fastgen.benchmarks import tensorrt as T  # noqa: E402
from fastgen.benchmarks.core import Result, measured_speedup  # noqa: E402
from fastgen.export import tensorrt as ft  # noqa: E402

STREAMING = [T.streaming(f) for f in T.BUDGETS]
TIMED = [T.EAGER, T.PATCHED, T.ENGINE, *STREAMING]


@pytest.fixture(scope="module")
def standin():
    """The stand-in as ``tensorrt`` and a fixed compute capability (no GPU here)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", trt_standin.module())
        mp.setattr(ft, "compute_capability", lambda device=None: "9.0")
        yield mp


@pytest.fixture(scope="module")
def measured(standin):
    """(rows, the budgets the streaming engine was set to) of the tiny Flux case, 2 rounds."""
    budgets = []
    set_budget = ft.TensorRTDenoiser.set_weight_streaming_budget

    def spy(self, value):
        budgets.append((value, set_budget(self, value)))
        return budgets[-1][1]

    standin.setattr(ft.TensorRTDenoiser, "set_weight_streaming_budget", spy)
    logging.disable(logging.WARNING)  # torch.onnx logs a warning per torchvision op it cannot register
    try:
        rows = T.measure(T.engine_cases(("tiny",))[:1], T.Meter.on("cpu"), budget_s=0.01, rounds=2)
    finally:
        logging.disable(logging.NOTSET)
    return rows, budgets


def _row(rows, provider) -> Result:
    return next(r for r in rows if r.provider == provider)


def test_rows_and_ratios_from_measured_times(measured):
    rows, _ = measured
    assert [(r.case, r.provider) for r in rows] == [("flux tiny", p) for p in [*TIMED, T.FP8]]
    eager, patched, engine = (_row(rows, p) for p in (T.EAGER, T.PATCHED, T.ENGINE))
    for r in rows[:-1]:
        e = r.extra
        assert len(e["round_ms"]) == 2 and all(math.isfinite(t) and t > 0 for t in e["round_ms"])
        assert r.ms == statistics.median(e["round_ms"])
        assert r.speedup == eager.ms / r.ms
        for key, base in (("vs_eager", eager), ("vs_patched", patched)):
            assert e[key]["ratio"] == base.ms / r.ms
            assert e[key]["measured"] == measured_speedup(base.extra["round_ms"], e["round_ms"])
            text = "no measurable" if e[key]["measured"] is None else f"{e[key]['ratio']:.3f}x"
            assert e[key]["text"].startswith(text)
        assert ("vs_engine" in e) == (r.provider in STREAMING)
        if r.provider in STREAMING:
            assert e["vs_engine"]["ratio"] == engine.ms / r.ms
        assert e["tensorrt"] == trt_standin.__version__ and e["export_s"] > 0 and e["cuda_graphs"] is False


def test_outputs_within_pytorchs_own_fp16_error(measured):
    rows, _ = measured
    eager = _row(rows, T.EAGER)
    own = eager.extra["fp32_diff"]  # PyTorch eager fp16 against float32 on the same weights and inputs
    assert 0 < own < 1e-2 and eager.max_diff == 0
    assert _row(rows, T.PATCHED).max_diff == 0  # fastgen.patch's defaults are exact
    for p in (T.ENGINE, *STREAMING):
        r = _row(rows, p)
        assert r.extra["fp32_diff"] <= 2 * own, (p, r.extra["fp32_diff"], own)
        assert 0 < r.max_diff <= 3 * own  # another fp16 graph: not bit-equal to eager


def test_builds_budgets_and_memory(measured):
    rows, budgets = measured
    plain, first = _row(rows, T.ENGINE).extra, _row(rows, STREAMING[0]).extra
    assert plain["engine"] == "plain" and first["engine"] == "streaming"
    for e in (plain, first):
        assert e["build_s"] > 0 and e["engine_mb"] > 0
        assert e["build_rss_mb"] is not None and e["build_gpu_mb"] is None  # host RSS read; no GPU reader here
    assert not any("build_s" in _row(rows, p).extra for p in (T.EAGER, T.PATCHED, *STREAMING[1:]))
    size = first["streamable_mb"] * 2**20
    assert size > 0
    for f, p in zip(T.BUDGETS, STREAMING):
        e = _row(rows, p).extra
        assert e["budget_mb"] * 2**20 == int(f * size) and e["gpu_in_use_mb"] is None
    # Every budget was set (and so timed) at least once, to the bytes its row reports.
    assert {v for v, _ in budgets} == set(T.BUDGETS)
    assert {b for _, b in budgets} == {int(f * size) for f in T.BUDGETS}


def test_fp8_row_states_the_refusal(measured):
    r = measured[0][-1]
    assert r.provider == T.FP8 and math.isnan(r.ms) and r.extra["status"] == T.FP8_STATUS
    assert "QuantizeLinear" in r.extra["refusal"] and "to_onnx does not quantize" in r.extra["refusal"]


def test_tables(measured):
    rows, _ = measured
    assert SUITES["tensorrt"] is T.run
    table = markdown_table(rows, environment("cpu"))
    assert "| suite | case | provider |" not in table  # none of its rows in the shared table
    lines = table.splitlines()
    eager, engine = _row(rows, T.EAGER), _row(rows, T.ENGINE)
    line = next(x for x in lines if x.startswith(f"| flux tiny | {T.ENGINE} |"))
    assert f"| {engine.ms:.3f} | " in line and f"| {eager.ms / engine.ms:.2f}x" in line
    line = next(x for x in lines if x.startswith(f"| flux tiny | {STREAMING[1]} |"))
    assert line.endswith(" | n/a |")  # device memory in use: not measured under the stand-in
    assert any(x.startswith(f"| flux tiny | {T.FP8} | not measured: an fp8 engine needs") for x in lines)
    builds = [x for x in lines if x.startswith("| flux tiny | plain |") or x.startswith("| flux tiny | streaming |")]
    assert len(builds) == 2 and all("| n/a |" in x for x in builds)


def test_table_without_rounds():
    # rows as bench/conftest.py makes them: medians only; the ratios come from the medians
    rows = [Result("tensorrt", "c", T.EAGER, 4.0), Result("tensorrt", "c", T.PATCHED, 2.0),
            Result("tensorrt", "c", T.ENGINE, 1.0, max_diff=1e-3), Result("tensorrt", "c", STREAMING[2], 2.0)]
    lines = T.tensorrt_table(rows)
    assert next(x for x in lines if x.startswith(f"| c | {T.ENGINE} |")).startswith(
        f"| c | {T.ENGINE} | 1.000 |  | 4.00x | 2.00x |  | 1.00e-03 |")
    assert next(x for x in lines if x.startswith(f"| c | {STREAMING[2]} |")).startswith(
        f"| c | {STREAMING[2]} | 2.000 |  | 2.00x | 1.00x | 0.50x |")
    assert not any(x.startswith("TensorRT engine builds") for x in lines)


def test_build_memory_through_the_meter(monkeypatch):
    used = [3 << 30]
    meter = T.Meter(torch.device("cpu"), gpu_bytes=lambda: used[0])
    with T.build_memory(meter) as peaks:
        used[0] += 512 << 20  # an allocation still held at exit: the exit sample sees it
    assert peaks["gpu_mb"] == 512 and peaks["rss_mb"] is not None
    assert T.Meter.on("cpu").gpu_bytes is None
    with T.build_memory(T.Meter.on("cpu")) as peaks:
        pass
    assert peaks["gpu_mb"] is None


def test_missing_dependencies_are_rows(standin, monkeypatch):
    cases = T.engine_cases(("tiny",))
    rows = T.run("cpu", cases=cases)  # the stand-in imports, but the device is not CUDA
    assert [r.case for r in rows] == ["flux tiny", "unet tiny"] and all(math.isnan(r.ms) for r in rows)
    assert all("run on NVIDIA GPUs; this run's device is cpu" in r.extra["status"] for r in rows)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    rows = T.run("cuda", cases=cases)
    assert all("pip install tensorrt" in r.extra["status"] for r in rows)
    assert all("TensorRT is not installed" in line for line in T.tensorrt_table(rows)[5:])
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert "onnxscript is not installed" in T.run("cuda", cases=cases)[0].extra["status"]


def test_cases():
    assert [(c.name, c.batch, c.height, c.width) for c in T.engine_cases()] == [
        ("flux small 256^2", 1, 256, 256), ("sd15 small 256^2 cfg", 2, 256, 256)]
    for c in T.engine_cases(("tiny", "small")):  # the shapes are those of the case's inputs
        model, inputs = c.case.make()
        if "hidden_states" in inputs:  # Flux: packed 2x2 patches of 8x latents -> 16 px per token
            assert inputs["hidden_states"].shape[:2] == (c.batch, (c.height // 16) * (c.width // 16))
        else:
            assert inputs["sample"].shape[0] == c.batch and inputs["sample"].shape[2:] == (c.height // 8, c.width // 8)
