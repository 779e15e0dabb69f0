"""Image conditions for Flux with K/V reuse (OminiControl2).

    from fastgen.condition import Condition, FluxConditionPipeline
    pipe = FluxConditionPipeline.from_pipe(flux_pipe)
    out = pipe("a cat", conditions=[Condition(canny_image, adapter="canny")])

Conditions are extra token branches of the transformer with asymmetric attention; their K/V are
computed at the first step and read in place at every later step (``ConditionConfig``).
"""

import importlib

from fastgen.condition.config import Condition, ConditionConfig, Fill

__all__ = ["Condition", "ConditionConfig", "Fill", "FluxConditionPipeline", "generate"]


def __getattr__(name: str):
    # The pipeline subclasses diffusers' FluxPipeline, whose module imports transformers' image
    # processors (which print torchvision notices): it loads on first use, not with this package.
    if name in ("FluxConditionPipeline", "generate"):
        return getattr(importlib.import_module("fastgen.condition.pipeline"), name)
    raise AttributeError(f"module 'fastgen.condition' has no attribute {name!r}")
