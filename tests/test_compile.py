"""``torch.compile(fullgraph=True)`` of every patched denoiser, on the default path and the kernel
path: no graph break anywhere (fullgraph raises on one), the same output as the unpatched model.
``aot_eager`` traces through AOTAutograd (fastgen's custom ops' fake implementations included)
without generating code, which is what a CPU can check."""

from __future__ import annotations

import pytest
import torch

import fastgen
from tiny_models import BUILDERS, CROSS, run

TOL = 2e-5
PATHS = {"default": {}, "kernel": {"attention_backend": "triton", "prologue_backend": "triton"}}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_fullgraph_compile_of_a_patched_model(name, path):
    model, inputs = BUILDERS[name]()
    ref = run(model, inputs)
    fastgen.patch(model, **PATHS[path])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(**inputs, return_dict=False)[0]
        assert (out - ref).abs().max().item() <= TOL
        if name in CROSS:  # inside a generation too: the cache stands aside while compiled code runs
            with fastgen.generation(model):
                for _ in range(2):
                    out = compiled(**inputs, return_dict=False)[0]
                    assert (out - ref).abs().max().item() <= TOL
