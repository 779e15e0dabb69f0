"""``ToMeConfig`` and ``ToDoConfig``: the options of token merging and token downsampling."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from fastgen._config import validated


@validated
@dataclass(frozen=True)
class ToMeConfig:
    """Token merging (ToMe for Stable Diffusion; tomesd's options under tomesd's names and meanings).

    Attributes:
        ratio: share of a block's tokens merged away, in [0, 1) and at most ``1 - 1/(sx*sy)`` (one
            token per cell stays dst).
        max_downsample: merge in blocks whose token grid is at most this much smaller than the
            latent's (1: the highest resolution only; 1, 2, 4 or 8), as tomesd. None (the default):
            the highest-resolution level that has attention, which is tomesd's 1 on SD 1.5 and 2 on
            SDXL (whose level 1 has no attention, so tomesd's default merges nothing there). DiTs
            have one level: every block merges.
        sx, sy: the cell one dst token is chosen from, in tokens (default 2 x 2).
        use_rand: draw the dst token of each cell at random (from ``seed`` or the pipeline call's
            generator) instead of taking the top-left one.
        merge_attn, merge_crossattn, merge_mlp: which parts of a transformer block run on merged tokens.
        seed: the dst map's seed (None: the pipeline call's generator's seed, else 0). The maps are a
            function of the seed and the step, so one seed gives the same images; both halves of a
            CFG batch share one map.
        sf: frames per cell for video DiTs (Wan, HunyuanVideo): 1 (default) picks dst within each
            frame (2-D cells), 2 or more makes spatio-temporal cells of sf x sy x sx tokens.
        steps: (start, stop) fractions of the denoising steps during which merging is on, start
            inclusive and stop exclusive (default (0, 1): every step; (0, 0.8): no merging in the
            last fifth, where fine detail forms).
        level_ratios: {level: ratio} overriding ``ratio`` per level (UNet levels 1, 2, 4, 8); a
            level absent here uses ``ratio`` if ``max_downsample`` admits it.

    Raises:
        ValueError: for a ratio outside [0, 1) or above what the cell allows, bad strides, unknown options.
    """

    ratio: float
    max_downsample: int | None = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int | None = None
    sf: int = 1
    steps: tuple[float, float] = (0.0, 1.0)
    level_ratios: tuple[tuple[int, float], ...] | dict | None = None

    def __post_init__(self):
        for name in ("sx", "sy", "sf"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # a NumPy int8 would overflow sx * sy * sf
        _check_ratio(self.ratio, self.sx * self.sy * self.sf, "ratio")
        _check_level(self.max_downsample, none_ok=True)
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "steps", _check_steps(self.steps))
        if self.level_ratios is not None:
            try:
                items = dict(self.level_ratios).items() if isinstance(self.level_ratios, (dict, tuple, list)) else None
            except (TypeError, ValueError):
                items = None
            if items is None:
                raise ValueError(f"level_ratios must be a dict {{level: ratio}}, got {self.level_ratios!r}")
            for level, ratio in items:
                _check_level(level)
                _check_ratio(ratio, self.sx * self.sy * self.sf, f"level_ratios[{level}]")
            object.__setattr__(self, "level_ratios", tuple(sorted((int(k), float(v)) for k, v in items)))
        object.__setattr__(self, "ratio", float(self.ratio))
        if self.max_downsample is not None:
            object.__setattr__(self, "max_downsample", int(self.max_downsample))

    @property
    def merges(self) -> bool:
        """Whether any level merges at a ratio above 0."""
        return self.ratio > 0 or any(r > 0 for _, r in self.level_ratios or ())

    def ratio_at(self, level: int, first: int = 1) -> float:
        """The ratio blocks of ``level`` merge at (0 where they do not merge, see ``max_downsample``);
        ``first``: the model's highest-resolution level that has attention."""
        if self.level_ratios is not None:
            for lv, ratio in self.level_ratios:
                if lv == level:
                    return ratio
        limit = self.max_downsample if self.max_downsample is not None else first
        return float(self.ratio) if level <= limit else 0.0


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers too


def _check_ratio(ratio, cell: int, name: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {ratio!r}")
    limit = 1.0 - 1.0 / cell
    if ratio > limit:
        raise ValueError(f"{name} {ratio} is above {limit:g}, the most a cell of {cell} tokens allows "
                         "(one token of each cell stays)")


def _check_level(level, none_ok: bool = False) -> None:
    if level is None and none_ok:
        return
    if not _is_int(level) or level not in (1, 2, 4, 8):
        raise ValueError(f"max_downsample and levels must be 1, 2, 4 or 8{' (or None)' if none_ok else ''}, "
                         f"got {level!r}")


def _check_steps(steps) -> tuple[float, float]:
    try:
        if isinstance(steps, (str, bytes)) or any(isinstance(s, bool) or not isinstance(s, numbers.Real)
                                                  for s in steps):
            raise TypeError
        start, stop = (float(s) for s in steps)
    except (TypeError, ValueError):
        raise ValueError(f"steps must be a (start, stop) pair of fractions, got {steps!r}") from None
    if not 0.0 <= start < stop <= 1.0:
        raise ValueError(f"steps must satisfy 0 <= start < stop <= 1, got {steps!r}")
    return start, stop


TODO_METHODS = ("nearest", "avg")


@validated
@dataclass(frozen=True)
class ToDoConfig:
    """Token downsampling (ToDo): self-attention keys and values downsampled on the token grid by
    ``factor`` (queries kept, so nothing is unmerged).

    Attributes:
        factor: downsampling factor per side, an integer >= 2.
        method: ``"nearest"`` (every factor-th token) or ``"avg"`` (the mean of each factor x factor cell).
        max_downsample: as ``ToMeConfig.max_downsample`` (None: the highest-resolution level with
            attention).
        steps: as ``ToMeConfig.steps``.

    Raises:
        ValueError: for a factor below 2, an unknown method or option.
    """

    factor: int
    method: str = "nearest"
    max_downsample: int | None = None
    steps: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if not _is_int(self.factor) or self.factor < 2:
            raise ValueError(f"factor must be an integer of at least 2, got {self.factor!r}")
        object.__setattr__(self, "factor", int(self.factor))
        if self.method not in TODO_METHODS:
            raise ValueError(f"method must be one of {TODO_METHODS}, got {self.method!r}")
        _check_level(self.max_downsample, none_ok=True)
        if self.max_downsample is not None:
            object.__setattr__(self, "max_downsample", int(self.max_downsample))
        object.__setattr__(self, "steps", _check_steps(self.steps))

    def factor_at(self, level: int, first: int = 1) -> int:
        """The downsampling factor of this level's self-attention K/V (1: not downsampled); ``first``
        as in ``ToMeConfig.ratio_at``."""
        limit = self.max_downsample if self.max_downsample is not None else first
        return self.factor if level <= limit else 1
