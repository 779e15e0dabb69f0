"""``ConditionConfig`` and the user-facing condition types."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fastgen.flux_branches import CACHE_DTYPES
from fastgen.patching.config import PatchConfig, build_config, validated

ATTENTION_MODES = ("asymmetric", "symmetric")


@validated
@dataclass(frozen=True)
class ConditionConfig:
    """How conditions run.

    Attributes:
        attention: ``"asymmetric"`` (OminiControl2: text and image tokens attend to every
            condition, each condition only to itself; a condition's ``log(scale)`` is added to the
            logits of its keys for text and image queries) or ``"symmetric"`` (the original
            OminiControl: every token attends to every token, and ``log(scale)`` is added to the
            logits between a condition's tokens and the text and image tokens in both directions,
            none between conditions, as OminiControl's ``c_factor`` bias; conditions then change
            every step, so nothing can be cached).
        kv_cache: compute each condition's post-RoPE K/V in every attention layer at the first
            forward of a generation and drop the condition branches from every later forward;
            text and image queries read the cached K/V in place. Exact w.r.t. the asymmetric
            model. None (default): on wherever it is exact (asymmetric attention).
        cache_dtype: ``"compute"`` (the transformer's dtype) or ``"fp8"`` (e4m3 with one scale
            per token and head, dequantized inside the attention kernel: half the memory,
            approximate; ``fastgen.ops.fp8_error`` reports the error).
        attention_backend, prologue_backend, fuse_prologue: as in ``fastgen.PatchConfig``.
    """

    attention: str = "asymmetric"
    kv_cache: bool | None = None
    cache_dtype: str = "compute"
    attention_backend: str = "auto"
    prologue_backend: str = "auto"
    fuse_prologue: bool = True

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.kv_cache not in (None, True, False):
            raise ValueError(f"kv_cache must be True, False or None, got {self.kv_cache!r}")
        if self.kv_cache and self.attention == "symmetric":
            raise ValueError("kv_cache needs attention='asymmetric': with symmetric attention the conditions' "
                             "K/V depend on the image tokens and change every step")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        self.patch_config()  # the attention settings, checked as fastgen.PatchConfig checks them

    @property
    def use_cache(self) -> bool:
        return self.attention == "asymmetric" if self.kv_cache is None else self.kv_cache

    def patch_config(self) -> PatchConfig:
        """The attention settings, as ``fastgen.flux_branches.branch_forward`` takes them."""
        return PatchConfig(attention_backend=self.attention_backend, prologue_backend=self.prologue_backend,
                           fuse_prologue=self.fuse_prologue)

    @classmethod
    def build(cls, config: ConditionConfig | None = None, **overrides) -> ConditionConfig:
        """``config`` with ``overrides``; unknown keys raise ``ValueError`` naming the known ones."""
        return build_config(cls, config, overrides, "fastgen.condition.ConditionConfig")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_scale(scale: float, what: str) -> float:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{what}.scale must be a positive finite number, got {scale!r}")
    return float(scale)


@dataclass
class Condition:
    """An image condition: its tokens join the generation as an extra branch of the transformer.

    Attributes:
        image: PIL image, array (H, W, 3) or tensor (3, H, W) / (B, 3, H, W), float in [0, 1]
            or uint8 (other float ranges are refused); B is 1 or the generation's batch. Its sides
            must be multiples of 16 px. A smaller image than the output is a *compact* condition:
            fewer tokens, each placed at the centre of the output cell it covers.
        position_delta: (rows, cols) added to the condition's position ids, in output tokens:
            (0, 0) for spatial conditions (canny, depth), e.g. (0, -32) for subject conditions.
        adapter: name of a LoRA adapter loaded on the transformer (``pipe.load_lora_weights(...,
            adapter_name=...)``) that applies to this condition's tokens only; text and image
            tokens never see it. None: the condition runs the base weights.
        scale: condition strength; ``log(scale)`` is added to the logits of this condition's keys
            for text and image queries and, with symmetric attention, to the logits of text and
            image keys for this condition's queries (1.0: unchanged).
        position_scale: output tokens per condition token along each axis. None: the ratio of the
            output size to the condition size (which must then have the output's aspect ratio).
    """

    image: Any
    position_delta: tuple[float, float] = (0, 0)
    adapter: str | None = None
    scale: float = 1.0
    position_scale: float | None = None

    def __post_init__(self):
        _check_scale(self.scale, "Condition")
        delta = tuple(self.position_delta) if isinstance(self.position_delta, (tuple, list)) else ()
        if len(delta) != 2 or not all(_finite(d) for d in delta):
            raise ValueError(f"position_delta must be (rows, cols), two finite numbers, got {self.position_delta!r}")
        if self.position_scale is not None and not (_finite(self.position_scale) and self.position_scale > 0):
            raise ValueError(f"position_scale must be positive, got {self.position_scale!r}")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError(f"adapter must be an adapter name (str) or None, got {self.adapter!r}")


@dataclass
class Fill:
    """Fill (inpainting) by token integration (OminiControl2): only the masked tokens are
    generated; the known tokens of ``image`` are their condition, at their own positions, and are
    written back into the result unchanged.

    Attributes:
        image: the image to fill, at the output size (PIL, array or tensor as for ``Condition``),
            one image or one per generated image.
        mask: the region to generate, at the image's size: PIL image, array or tensor (H, W);
            nonzero (> 0.5 for floats) marks a pixel to generate. A token is generated when any of
            its 16 x 16 pixels is marked.
        adapter, scale: as for ``Condition`` (e.g. a fill LoRA).
    """

    image: Any
    mask: Any
    adapter: str | None = None
    scale: float = 1.0

    def __post_init__(self):
        _check_scale(self.scale, "Fill")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError(f"adapter must be an adapter name (str) or None, got {self.adapter!r}")
