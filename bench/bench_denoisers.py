"""Time per denoising step and peak memory: each supported denoiser, diffusers vs fastgen.patch
(default, exact settings), in the same run. Real configs with random weights on a GPU (timing
does not depend on weight values); small ones on a CPU."""

import pytest
import torch

import fastgen
from fastgen.benchmarks import core
from fastgen.benchmarks.denoisers import denoiser_cases, denoiser_step

DEVICE = core.default_device()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = denoiser_cases(DEVICE)


@pytest.fixture(scope="module", params=CASES, ids=[c.name.replace(" ", "_") for c in CASES])
def built(request):
    case = request.param
    model = case.build(DEVICE, DTYPE)
    inputs = case.inputs(DEVICE, DTYPE)
    ref, _ = core.run_once(denoiser_step(model, inputs, case.forwards_per_step), DEVICE)
    yield case, model, inputs, ref
    fastgen.unpatch(model)
    del model
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("provider", ["diffusers", "fastgen"])
def test_denoiser_step(benchmark, built, provider):
    case, model, inputs, ref = built
    fastgen.unpatch(model)
    if provider == "fastgen":
        fastgen.patch(model)
    step = denoiser_step(model, inputs, case.forwards_per_step)
    out, peak = core.run_once(step, DEVICE)  # also the warm-up: compilation, autotuning, first K/V cache fill
    out, peak = core.run_once(step, DEVICE)
    diff = core.max_diff(out, ref)
    scale = float(ref.abs().max())
    assert torch.isfinite(out).all()
    # exact optimizations: equal to rounding (random deep nets amplify bf16 rounding a little)
    assert diff <= (1e-4 if DTYPE == torch.float32 else 5e-2) * max(1.0, scale), f"{case.name}: {diff:.3e}"
    benchmark.group = f"denoiser {case.name}"
    benchmark.extra_info.update(suite="denoiser", case=f"{case.name} ({case.forwards_per_step} fwd/step)",
                                provider=provider, max_diff=diff, peak_mb=peak, reference="diffusers, same run")
    benchmark(core.synced(step, DEVICE))
