"""Attention prologue (RMS-norm of q and k + RoPE): fused Triton / CUDA vs the unfused PyTorch
sequence diffusers runs. GB/s counts the fewest bytes: q and k read once and written once."""

import pytest

from fastgen.benchmarks import core
from fastgen.benchmarks.prologue import prologue_cases, prologue_providers, prologue_reference

DEVICE = core.default_device()
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}
PARAMS = [(c, p) for c in prologue_cases(DEVICE) for p in prologue_providers(DEVICE)]


@pytest.mark.parametrize("case,provider", PARAMS, ids=[f"{c.name}-{p}".replace(" ", "_") for c, p in PARAMS])
def test_prologue(benchmark, case, provider):
    kw = case.inputs(DEVICE)
    ref = prologue_reference(case, kw)
    make = prologue_providers(DEVICE)[provider]
    run = make(kw)
    out, peak = core.run_once(run, DEVICE)
    diff = core.max_diff(out, ref)
    assert diff <= TOL[case.dtype] * float(ref.abs().max()), f"{provider} is off by {diff:.3e} on {case.name}"
    benchmark.group = f"prologue {case.name}"
    benchmark.extra_info.update(suite="prologue", case=case.name, provider=provider, bytes=case.bytes,
                                max_diff=diff, peak_mb=peak, reference="float64")
    benchmark(core.synced(run, DEVICE))
