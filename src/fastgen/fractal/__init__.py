"""``fastgen.fractal``: fractal generative models (FractalGen, arXiv 2502.17437) and their samplers.

- ``FractalConfig`` / ``LevelConfig`` / ``PixelHeadConfig`` and ``PRESETS`` (the published ImageNet
  64 AR and MAR, ImageNet 256 MAR-B / L / H models; ``PRESET_SAMPLING``: their published settings);
- ``FractalGen``: the model, with the official checkpoints' parameter layout (``load_state_dict``
  checks it); MAR and AR level transformers, pixel heads, static ``KVCache`` decoding (``model``);
- ``sample(model, labels, sampler=..., cfg=..., seed=...)``: uint8 images; ``sampler="reference"``
  is the depth-first method as published (``sampler``), ``sampler="block"`` batches every patch of a
  parent iteration into one call, with static caches and CUDA graphs (``block``): the same images;
  ``image_grid``: images as one grid (``fastgen fractal`` writes it as a PNG);
- ``digits``: a tiny model trained on 16 x 16 digits (weights shipped) and the classifier judging it;
- ``rng``: the keyed, counter-based random numbers every sampler draws, so one seed gives one image
  whatever the sampler; ``schedule``: MAR / CFG schedules and call counts as data.
"""

from fastgen.fractal import rng, schedule
from fastgen.fractal.block import BlockSampler
from fastgen.fractal.config import (
    PRESET_SAMPLING,
    PRESETS,
    PUBLISHED_PARAMETERS,
    FractalConfig,
    LevelConfig,
    PixelHeadConfig,
    get_config,
)
from fastgen.fractal.model import ARLevel, FractalGen, KVCache, MARLevel, PixelHead, load_checkpoint
from fastgen.fractal.sampler import SAMPLERS, ReferenceSampler, SamplingPlan, image_grid, make_plan, sample
from fastgen.fractal.schedule import CallCounts, LevelSchedule, call_counts, mar_schedule

__all__ = [
    "PRESETS",
    "PRESET_SAMPLING",
    "PUBLISHED_PARAMETERS",
    "SAMPLERS",
    "ARLevel",
    "BlockSampler",
    "CallCounts",
    "FractalConfig",
    "FractalGen",
    "KVCache",
    "LevelConfig",
    "LevelSchedule",
    "MARLevel",
    "PixelHead",
    "PixelHeadConfig",
    "ReferenceSampler",
    "SamplingPlan",
    "call_counts",
    "get_config",
    "load_checkpoint",
    "image_grid",
    "make_plan",
    "mar_schedule",
    "rng",
    "sample",
    "schedule",
]
