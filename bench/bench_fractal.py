"""FractalGen (issue #15): images per second of the reference sampler vs the block sampler, same model and
plan, same run. On a GPU the ImageNet 64 MAR and ImageNet 256 MAR-B / L / H configs (random weights, bf16)
at batch 1, 16 and 256, each timed over a subset of its top-level iterations and scaled to whole images;
on a CPU the small MAR config at batch 1, 4, 16 and 64 (under FASTGEN_DRY_RUN=1: batch 1 and 4 over 2
top-level iterations, one round; so too in the CPU test run, --benchmark-disable).
FASTGEN_FRACTAL_PRESETS / _BATCHES / _TOP_ITERATIONS override; on a GPU each case's timed rounds get
CASE_BUDGET_S seconds (judged by its warm-up; at least one round). Each row
goes into fastgen's table (benchmarks.fractal.fractal_table); pytest-benchmark's own time is the whole
case (warm-up and rounds of both samplers)."""

import os
from dataclasses import asdict, replace

import pytest

from fastgen.benchmarks import core
from fastgen.benchmarks import fractal as F

DEVICE = core.default_device()
DRY = os.environ.get("FASTGEN_DRY_RUN") == "1"


def _list(name: str, cast):
    value = os.environ.get(name)
    return [cast(v) for v in value.split(",")] if value else None


_top = os.environ.get("FASTGEN_FRACTAL_TOP_ITERATIONS")
CASES = F.fractal_cases(DEVICE, _list("FASTGEN_FRACTAL_BATCHES", int) or ([1, 4] if DRY else None),
                        _list("FASTGEN_FRACTAL_PRESETS", str), int(_top) if _top else (2 if DRY else None))
ROUNDS = 1 if DRY else F.ROUNDS
CASE_BUDGET_S = 10.0 if DEVICE.type == "cuda" else None  # 12 cases in run_gpu.sh's few minutes
_MODELS: dict = {}


def _model(case):
    key = (str(case.config), case.dtype)
    if key not in _MODELS:
        _MODELS.clear()
        core.free_memory(DEVICE)
        _MODELS[key] = F.build_model(case, DEVICE)
    return _MODELS[key]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.name.split(' ')[0]}-b{c.batch}" for c in CASES])
def test_samplers(benchmark, case):
    model = _model(case)
    rounds = ROUNDS
    if benchmark.disabled and DEVICE.type == "cpu":  # the test run (--benchmark-disable): the code path, cheaply
        case, rounds = replace(case, top_iterations=2), 1
    rows = []
    benchmark.pedantic(lambda: rows.extend(F.run_case(model, case, DEVICE, rounds, budget_s=CASE_BUDGET_S)), rounds=1, iterations=1)
    benchmark.group = f"fractal {case.name}"
    benchmark.extra_info.update(suite="fractal", case=rows[1].case, provider="reference, block",
                                rows=[asdict(r) for r in rows])
    reference, block = rows
    assert block.extra["images_per_s"] > 0 and reference.extra["images_per_s"] > 0
    if DEVICE.type == "cpu" and case.dtype == "float32":
        assert block.extra["equal_fraction"] == 1.0  # one seed, one image: bit for bit in fp32 on a CPU
