"""Image conditions for Flux with K/V reuse (OminiControl2).

    from fastgen.condition import Condition, FluxConditionPipeline
    pipe = FluxConditionPipeline.from_pipe(flux_pipe)
    out = pipe("a cat", conditions=[Condition(canny_image, adapter="canny")])

Conditions are extra token branches of the transformer with asymmetric attention; their K/V are
computed at the first step and read in place at every later step (``ConditionConfig``).
"""

from fastgen.condition.config import Condition, ConditionConfig, Fill
from fastgen.condition.pipeline import FluxConditionPipeline, generate

__all__ = ["Condition", "ConditionConfig", "Fill", "FluxConditionPipeline", "generate"]
