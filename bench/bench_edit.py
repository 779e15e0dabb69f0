"""KV-Edit on Flux: time of the edit (foreground-only denoising from one inversion) and of the
inversion, peak memory and cache sizes for each cache option (device, device fp8, pinned CPU,
CPU fp8, inversion-free), against a full re-generation at the same size, same run. Flux-dev at
1024^2 with a 25% mask and 28 steps on a GPU; a small Flux at 256^2 on a CPU, where the ratios
show the work saved."""

import math

import pytest
import torch

from fastgen.benchmarks import core
from fastgen.benchmarks import edit as E

DEVICE = core.default_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASE = E.edit_cases(DEVICE)[0]
ROUNDS = 2 if DEVICE.type == "cuda" else 3


@pytest.fixture(scope="module")
def bench():
    b = E.edit_bench(CASE, DEVICE, DTYPE)
    yield b
    del b
    core.free_memory(DEVICE)


@pytest.fixture(scope="module")
def exact() -> dict:
    return {}  # path -> latents of the exact paths, for the approximate ones' differences


def _timer(benchmark):
    def run(fn):
        benchmark.pedantic(core.synced(fn, DEVICE), rounds=ROUNDS, iterations=1)
        stats = getattr(benchmark, "stats", None)
        return stats.stats.median * 1e3 if stats is not None else math.nan  # nan under --benchmark-disable

    return run


def _record(benchmark, row: core.Result) -> None:
    benchmark.group = f"edit {CASE.name}"
    benchmark.extra_info.update(suite="edit", case=row.case, provider=row.provider, peak_mb=row.peak_mb,
                                max_diff=row.max_diff, **{k: v for k, v in row.extra.items() if k != "total_ms"})


@pytest.mark.parametrize("provider", E.EDIT_BASELINES)
def test_full_generation(benchmark, bench, provider):
    _record(benchmark, E.edit_baseline_result(bench, provider, DEVICE, ROUNDS, timer=_timer(benchmark)))


@pytest.mark.parametrize("path", list(E.EDIT_PATHS))
def test_kv_edit(benchmark, bench, exact, path):
    options = E.EDIT_PATHS[path]
    reference = next(iter(exact.items()), None)
    try:
        row, latents = E.edit_path_result(bench, path, DEVICE, ROUNDS, reference, edit_timer=_timer(benchmark))
    except torch.cuda.OutOfMemoryError as err:  # the 28-step device cache of Flux-dev may not fit
        core.free_memory(DEVICE)
        pytest.xfail(f"{path} does not fit on {torch.cuda.get_device_name()}: {str(err)[:100]}")
    _record(benchmark, row)  # first: a failed check below still leaves the measured row in the table
    if set(options) <= {"cache_device"}:
        exact.setdefault(path, latents)
    e = row.extra
    assert e["background_exact"], "background latents are the source's, bit for bit"
    assert e["edited_tokens"] == round(CASE.mask_fraction * e["tokens"]), e
    steps = CASE.steps - CASE.skip_steps
    assert e["forwards"] == 2 * steps
    if row.max_diff is not None:
        scale = max(1.0, float(reference[1].abs().max()))
        bound = 1e-6 if "cache_dtype" not in options else 0.25  # fp8: e4m3 K/V through 28 steps
        assert row.max_diff <= bound * scale, (path, row.max_diff)
    if options.get("cache_device") == "cpu" and DEVICE.type == "cuda":  # on a CPU "cpu" is the device
        assert e["max_resident_layers"] <= 2, "the offloaded cache keeps at most two layers on the device"
        assert e["host_mb"] >= e["cache_mb"] > 0
