"""fp8 (e4m3) quantization of cached K/V with a scale per row: Triton / CUDA vs the PyTorch
sequence (amax, divide, cast). GB/s counts x read once, x8 and the scales written once."""

import pytest

from fastgen.benchmarks import core
from fastgen.benchmarks.quantize import quantize_cases, quantize_diff, quantize_providers, quantize_reference

DEVICE = core.default_device()
PARAMS = [(c, p) for c in quantize_cases(DEVICE) for p in quantize_providers(DEVICE)]


@pytest.mark.parametrize("case,provider", PARAMS, ids=[f"{c.name}-{p}".replace(" ", "_") for c, p in PARAMS])
def test_quantize(benchmark, case, provider):
    kw = case.inputs(DEVICE)
    ref = quantize_reference(case, kw)
    run = quantize_providers(DEVICE)[provider](kw)
    out, peak = core.run_once(run, DEVICE)
    diff = quantize_diff(out, ref)
    assert diff == 0.0, f"{provider} rounds differently from the reference by {diff:.3e} on {case.name}"
    benchmark.group = f"quantize {case.name}"
    benchmark.extra_info.update(suite="quantize", case=case.name, provider=provider, bytes=case.bytes,
                                max_diff=diff, peak_mb=peak, reference="PyTorch e4m3 rounding")
    benchmark(core.synced(run, DEVICE))
