"""FramePack (issue #14): wall time and peak memory of every section of one long video, diffusers'
HunyuanVideoFramepackPipeline vs fastgen (patched, through fastgen.framepack.sections) on the same
pipeline, then the transformer's output patched vs unpatched on section 2's inputs, then the
low-VRAM mode (enable_low_vram; last, as offloading is not undone). FramePackI2V_HY's 13B
transformer (random weights, bf16) at 640x608, window 9, 20 sections of 2 steps on a GPU; the small
stand-in on a CPU (the tiny one, 3 sections of 1 step, under FASTGEN_DRY_RUN=1).
FASTGEN_FRAMEPACK_SECTIONS / FASTGEN_FRAMEPACK_STEPS override the sections and steps. Each row's
per-section lists go into fastgen's table (benchmarks.framepack.framepack_table); pytest-benchmark's
own time is the whole call's (a 1-section warm-up video, then the video)."""

import math
import os
from dataclasses import asdict, replace

import pytest
import torch

from fastgen.benchmarks import core
from fastgen.benchmarks import framepack as F

DEVICE = core.default_device()
DRY = os.environ.get("FASTGEN_DRY_RUN") == "1"


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


CASE = F.framepack_cases(DEVICE, _int("FASTGEN_FRAMEPACK_SECTIONS") or (3 if DRY else None),
                         _int("FASTGEN_FRAMEPACK_STEPS") or (1 if DRY else None), "tiny" if DRY else None)[0]
if DRY:
    CASE = replace(CASE, low_vram_sections=1)

_ROWS: dict = {}  # provider -> (row, its benchmark's extra_info): the later tests complete the earlier rows


@pytest.fixture(scope="module")
def bench():
    b = F.framepack_bench(CASE, DEVICE)
    yield b
    del b
    core.free_memory(DEVICE)


def _record(benchmark, row) -> None:
    benchmark.group = f"framepack {CASE.name}"
    _ROWS[row.provider] = (row, benchmark.extra_info)
    _refresh()


def _refresh(diff=None, reference=None) -> None:
    rows = [r for r, _ in _ROWS.values()]
    F.add_comparison(rows, diff, reference)
    for row, info in _ROWS.values():
        info.update(suite="framepack", case=row.case, provider=row.provider, row=asdict(row))


def _timed(benchmark, run):
    meters = []
    benchmark.pedantic(lambda: meters.append(run()), rounds=1, iterations=1)
    return meters


@pytest.mark.parametrize("provider", [F.DIFFUSERS, F.FASTGEN])
def test_sections(benchmark, bench, provider):
    meters = _timed(benchmark, lambda: F.timed_run(bench, provider))
    row = F.provider_row(bench, provider, meters)
    _record(benchmark, row)
    assert row.extra["sections"] == CASE.sections and all(ms > 0 for ms in row.extra["section_ms"])


def test_transformer_outputs_match(bench):
    if bench.inputs is None:
        pytest.skip("diffusers' row did not run: its section 2 inputs are the ones compared")
    diff = F.transformer_difference(bench)
    _refresh(diff, bench.reference)
    scale = max(1.0, float(bench.reference.abs().max()))
    assert math.isfinite(diff)
    if bench.reference.dtype == torch.float32:  # bf16 on a GPU: the table says how far; no fp32 13B to judge by
        assert diff <= 1e-4 * scale, diff


def test_low_vram(benchmark, bench):
    if not CASE.low_vram_sections:
        pytest.skip("no low-VRAM sections in this case")
    meters = _timed(benchmark, lambda: F.low_vram_run(bench, CASE.low_vram_sections))
    row = F.provider_row(bench, F.LOW_VRAM, meters)
    _record(benchmark, row)
    assert row.extra["sections"] == CASE.low_vram_sections
    if DEVICE.type == "cuda":
        assert row.peak_mb is not None and row.peak_mb > 0
