"""The tiny denoisers of ``fastgen.models`` on the tests' device, and what the shared model tests
need to know about them.

``BUILDERS[name]()`` returns ``(model, inputs)``; ``run(model, inputs)`` runs one forward without
grad and returns the output tensor.
"""

from __future__ import annotations

import functools

import torch

from fastgen import models
from helpers import DEVICE


def _on_device(name: str):
    return functools.partial(models.tiny_denoiser, name, DEVICE)


BUILDERS = {name: _on_device(name) for name in ("flux", "sd3", "sd35", "unet", "wan", "hunyuan", "framepack")}
EXTRA = {"wan_i2v": _on_device("wan_i2v")}  # built where a test asks for them, not part of every shared tester
# Models with cross-attention over the text, whose K/V fastgen caches: builder name -> context key
CROSS = {"unet": "encoder_hidden_states", "wan": "encoder_hidden_states", "wan_i2v": "encoder_hidden_states"}
flux, unet = BUILDERS["flux"], BUILDERS["unet"]  # what single tests import by name


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
