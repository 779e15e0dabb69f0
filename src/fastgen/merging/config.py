"""``ToMeConfig`` and ``ToDoConfig``: the options of token merging and token downsampling."""

from __future__ import annotations

from dataclasses import dataclass

from fastgen.patching.config import validated


@validated
@dataclass(frozen=True)
class ToMeConfig:
    """Token merging (ToMe for Stable Diffusion; tomesd's options under tomesd's names and meanings).

    Attributes:
        ratio: share of a block's tokens merged away, in [0, 1) and at most ``1 - 1/(sx*sy)`` (one
            token per cell stays dst).
        max_downsample: merge in blocks whose token grid is at most this much smaller than the
            latent's (1: the highest resolution only; 1, 2, 4 or 8), as tomesd.
        sx, sy: the cell one dst token is chosen from, in tokens (default 2 x 2).
        use_rand: draw the dst token of each cell at random (from ``seed`` or the pipeline call's
            generator) instead of taking the top-left one.
        merge_attn, merge_crossattn, merge_mlp: which parts of a transformer block run on merged tokens.
        seed: the dst map's seed (None: from the pipeline call's generator, else 0).

    Raises:
        ValueError: for a ratio outside [0, 1) or above what the cell allows, bad strides, unknown options.
    """

    ratio: float
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.sx, int) or not isinstance(self.sy, int) or self.sx < 1 or self.sy < 1:
            raise ValueError(f"sx and sy must be positive integers, got sx={self.sx!r}, sy={self.sy!r}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")
        limit = 1.0 - 1.0 / (self.sx * self.sy)
        if self.ratio > limit:
            raise ValueError(f"ratio {self.ratio} is above {limit:g}, the most a {self.sy} x {self.sx} cell allows "
                             "(one token of each cell stays)")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample!r}")


TODO_METHODS = ("nearest", "avg")


@validated
@dataclass(frozen=True)
class ToDoConfig:
    """Token downsampling (ToDo): self-attention keys and values downsampled on the token grid by
    ``factor`` (queries kept, so nothing is unmerged).

    Attributes:
        factor: downsampling factor per side, an integer >= 2.
        method: ``"nearest"`` (every factor-th token) or ``"avg"`` (the mean of each factor x factor cell).
        max_downsample: as ``ToMeConfig.max_downsample``.

    Raises:
        ValueError: for a factor below 2, an unknown method or option.
    """

    factor: int
    method: str = "nearest"
    max_downsample: int = 1

    def __post_init__(self):
        if not isinstance(self.factor, int) or self.factor < 2:
            raise ValueError(f"factor must be an integer of at least 2, got {self.factor!r}")
        if self.method not in TODO_METHODS:
            raise ValueError(f"method must be one of {TODO_METHODS}, got {self.method!r}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample!r}")
