"""Attention: fastgen (Triton, CUDA where built) vs every SDPA backend PyTorch has here, and
xformers where present. Flux shapes on a GPU (B=1, H=24, D=128, bf16); small shapes on a CPU,
where the suite runs once as a test (--benchmark-disable) so it cannot rot."""

import pytest

from fastgen.benchmarks import attention as A
from fastgen.benchmarks import core

DEVICE = core.default_device()
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}  # max |out - reference| on randn inputs
PARAMS = [(c, p) for c in A.attention_cases(DEVICE) for p in A.attention_providers(DEVICE, c.dtype)]


@pytest.mark.parametrize("case,provider", PARAMS, ids=[f"{c.name}-{p}".replace(" ", "_") for c, p in PARAMS])
def test_attention(benchmark, case, provider):
    q, k, v, extra = case.inputs(DEVICE)
    ref, ref_kind = A.attention_reference_for(case, q, k, v, extra)
    make = A.attention_providers(DEVICE, case.dtype)[provider]
    run = make(q, k, v, extra)
    out, peak = core.run_once(run, DEVICE)
    diff = core.max_diff(out, ref)
    assert diff <= TOL[case.dtype], f"{provider} is off by {diff:.3e} on {case.name}"
    benchmark.group = f"attention {case.name}"
    benchmark.extra_info.update(suite="attention", case=case.name, provider=provider, flops=case.flops,
                                max_diff=diff, peak_mb=peak, reference=ref_kind)
    benchmark(core.synced(run, DEVICE))
