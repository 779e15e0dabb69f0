"""The FramePack benchmark suite at its tiny stand-in on the CPU (2 sections of 1 step: rows of diffusers,
fastgen and low-VRAM with one time and peak per section, the transformer's output patched vs unpatched,
its own table), and its GPU case built on the meta device (the 13B config, the released token counts),
so that a config error never costs a GPU window. bench/run_gpu.sh's framepack phase: tests/test_run_gpu.py."""

import math
from dataclasses import replace

import pytest
import torch

from fastgen.benchmarks import SUITES, environment, markdown_table
from fastgen.benchmarks import framepack as F


def test_tiny_run_rows_and_table():
    case = F.framepack_cases("cpu", sections=2, steps=1, size="tiny")[0]
    rows = F.run(torch.device("cpu"), case=replace(case, low_vram_sections=1))
    assert SUITES["framepack"] is F.run
    assert [r.provider for r in rows] == [F.DIFFUSERS, F.FASTGEN, F.LOW_VRAM]
    for r in rows:
        e = r.extra
        assert e["sections"] == (1 if r.provider == F.LOW_VRAM else 2) and e["steps"] == 1
        assert all(math.isfinite(ms) and ms > 0 for ms in e["section_ms"]) and r.ms == pytest.approx(
            sorted(e["section_ms"])[0] / 2 + sorted(e["section_ms"])[-1] / 2)
        assert r.peak_mb > 0 and e["peak_kind"] == "host RSS" and e["tokens"]["noisy"] == 36
    fast = rows[1]
    assert fast.speedup == pytest.approx(rows[0].ms / fast.ms) and fast.extra["flatness"] is not None
    assert fast.max_diff <= 1e-5 * max(1.0, fast.extra["ref_max_abs"])  # fp32: the same computation
    assert "no GPU memory" in rows[2].extra["note"]
    table = markdown_table(rows, environment("cpu"))
    assert "FramePack: one video, per section" in table and "| suite | case |" not in table
    assert "| framepack tiny stand-in, window 9 | fastgen low-VRAM | 1 |" in table
    assert table.count("\n| 2 | ") == 1  # the per-section table: section 2 of diffusers and fastgen


def test_gpu_case_builds_on_meta():
    case = F.framepack_cases("cuda")[0]
    assert (case.size, case.sections, case.steps, case.height, case.width) == ("released", 20, 2, 608, 640)
    bench = F.framepack_bench(case, "meta")
    t = bench.about["tokens"]
    assert (t["noisy"], t["clean"], t["2x"], t["4x"]) == (13680, 3040, 380, 400)  # issue #14's figures
    assert 12.5e9 < sum(p.numel() for p in bench.pipe.transformer.parameters()) < 13.5e9
    assert bench.pipe.image_encoder.config.hidden_size == bench.pipe.transformer.config.image_proj_dim == 1152
    with pytest.raises(ValueError, match="output_type"):
        replace(case, output_type="np")
    with pytest.raises(ValueError, match="sections"):
        replace(case, sections=0)
