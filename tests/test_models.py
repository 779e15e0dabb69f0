"""fastgen.models: the real-size configs the GPU benchmarks build (Flux-dev, SDXL, SD3.5-medium, Wan 2.1
1.3B, HunyuanVideo) are checked here without a GPU or their memory: built and run on the meta device,
unpatched and under fastgen.patch, so a config or input typo never costs a GPU window."""

import pytest
import torch

import fastgen
from fastgen import models

SPECS = models.real_denoisers()


@pytest.mark.parametrize("spec", SPECS, ids=[s.name.replace(" ", "_") for s in SPECS])
def test_real_config_runs_a_forward_on_meta(spec):
    model = spec.build("meta", torch.bfloat16)
    inputs = spec.inputs("meta", torch.bfloat16)
    sample = inputs.get("hidden_states", inputs.get("sample"))
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
        with fastgen.patch(model):
            patched = model(**inputs, return_dict=False)[0]
    assert out.device.type == "meta" and out.dtype == torch.bfloat16
    assert out.shape[0] == sample.shape[0] and out.shape[-1] == sample.shape[-1]  # batch, and width or channels
    assert patched.shape == out.shape
    assert sum(p.numel() for p in model.parameters()) > 5e8  # real size, not a stand-in
