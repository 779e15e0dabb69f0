"""FractalGen configurations: one ``LevelConfig`` per generator level, a ``PixelHeadConfig`` for the
pixel heads, a ``FractalConfig`` holding them, and the published models as ``PRESETS``.

A fractal generator (arXiv 2502.17437; LTH14/fractalgen ``models/fractalgen.py``) is a stack of
levels. Level k generates an ``image_size`` x ``image_size`` patch as ``(image_size / patch_size)^2``
tokens with an AR (causal) or MAR (masked, random order) transformer; the output feature of each
token conditions the next level, which generates that token's ``patch_size`` x ``patch_size``
sub-patch; after the last level a small causal pixel head samples R, G, B as 256-way categoricals.

The numbers of ``PRESETS`` are those of the official ``fractalar_in64``, ``fractalmar_in64``,
``fractalmar_{base,large,huge}_in256`` builders with the flags of the official README
(``--num_conds 1`` for the AR model, ``--num_conds 5`` for the MAR ones, ``--guiding_pixel`` for
the 256 px models) and its ``--num_iter_list`` as the default iterations.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from fastgen._config import validated

AR = "ar"
MAR = "mar"
KINDS = (AR, MAR)

# A MAR level hands each child its own output feature and its four neighbours' (top, right,
# bottom, left; zero at the borders); an AR level hands only its own.
CHILD_CONDS = {AR: 1, MAR: 5}


def _check_ints(config, names, low: int = 1) -> None:
    # Python or NumPy integers (as the rest of fastgen), held as Python ints
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{type(config).__name__}.{name} must be an integer >= {low}, got {value!r}")
        object.__setattr__(config, name, int(value))


@validated
@dataclass(frozen=True)
class PixelHeadConfig:
    """A pixel head: a causal transformer over ``[condition, R, G]`` that predicts R, G, B as
    256-way categoricals (official ``models/pixelloss.py``, ``PixelLoss``).

    Attributes:
        width: token width (official ``width``).
        depth: transformer blocks.
        heads: attention heads (``width`` must divide by it).

    Raises:
        ValueError: for non-positive sizes or a width the heads do not divide.
    """

    width: int
    depth: int
    heads: int

    def __post_init__(self):
        _check_ints(self, ("width", "depth", "heads"))
        if self.width % self.heads:
            raise ValueError(f"PixelHeadConfig.width ({self.width}) must be a multiple of heads ({self.heads})")


@validated
@dataclass(frozen=True)
class LevelConfig:
    """One generator level.

    Attributes:
        kind: ``"ar"`` (causal, raster order, 2-D RoPE, LlamaGen blocks: official ``models/ar.py``)
            or ``"mar"`` (bidirectional, random order, ViT blocks: official ``models/mar.py``).
        image_size: side in pixels of the patch this level generates (official ``img_size_list[k]``).
        patch_size: side in pixels of each token's sub-patch (``img_size_list[k+1]``); divides
            ``image_size``. The level's sequence is ``(image_size // patch_size) ** 2`` tokens.
        width, depth, heads: the transformer (``embed_dim_list``, ``num_blocks_list``,
            ``num_heads_list``); ``width`` divides by ``heads``, and AR levels need a head width
            that divides by 4 (2-D RoPE rotates pairs along each axis).
        num_iter: default sampling iterations (official ``--num_iter_list``); an AR level always
            makes one iteration per token, so its value is ignored by the samplers.
        guiding_pixel: sample the patch's mean colour first and condition on it (official
            ``--guiding_pixel``, MAR levels below the top only).

    Raises:
        ValueError: for an unknown kind, sizes that do not divide, or a guiding pixel on an AR level.
    """

    kind: str
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    num_iter: int
    guiding_pixel: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LevelConfig.kind must be one of {KINDS}, got {self.kind!r}")
        _check_ints(self, ("image_size", "patch_size", "width", "depth", "heads", "num_iter"))
        if self.image_size % self.patch_size or self.image_size == self.patch_size:
            raise ValueError(f"LevelConfig.patch_size ({self.patch_size}) must divide image_size "
                             f"({self.image_size}) and be smaller than it")
        if self.width % self.heads:
            raise ValueError(f"LevelConfig.width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.kind == AR and (self.width // self.heads) % 4:
            raise ValueError(f"an AR level's head width (width / heads = {self.width // self.heads}) must be a "
                             "multiple of 4 for its 2-D RoPE")
        if not isinstance(self.guiding_pixel, bool):
            raise ValueError(f"LevelConfig.guiding_pixel must be True or False, got {self.guiding_pixel!r}")
        if self.guiding_pixel and self.kind != MAR:
            raise ValueError("a guiding pixel is a MAR level's feature (the official AR level has none)")

    @property
    def grid(self) -> int:
        """Tokens per side of the level's sequence."""
        return self.image_size // self.patch_size

    @property
    def seq_len(self) -> int:
        """Tokens in the level's sequence."""
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        """Values per token: a flattened ``(3, patch_size, patch_size)`` sub-patch."""
        return 3 * self.patch_size ** 2


@validated
@dataclass(frozen=True)
class FractalConfig:
    """A fractal generator: its levels, top to bottom, and its pixel heads.

    Attributes:
        levels: ``LevelConfig`` per level; level k+1's ``image_size`` is level k's ``patch_size``
            and the last level's ``patch_size`` is 1 (its tokens are pixels).
        pixel_head: the head sampling each pixel from the last level's token feature.
        num_classes: class labels (the top level's class embedding; default 1000, ImageNet).
        num_conds: condition tokens a MAR level reads (official ``--num_conds``): 5 (own feature
            and four neighbours) in the published MAR models, 1 in the AR one. The top level reads
            ``num_conds`` copies of the class embedding; a MAR level below an AR level can read 1.
        guide_head: the pixel head of the guiding pixels (official: width 128, depth 3, 4 heads).

    Raises:
        ValueError: for levels that do not chain, a guiding pixel on the top level, or a
            ``num_conds`` a parent cannot supply.
    """

    levels: tuple[LevelConfig, ...]
    pixel_head: PixelHeadConfig
    num_classes: int = 1000
    num_conds: int = 5
    guide_head: PixelHeadConfig = field(default_factory=lambda: PixelHeadConfig(width=128, depth=3, heads=4))

    def __post_init__(self):
        levels = tuple(self.levels) if isinstance(self.levels, (list, tuple)) else None
        if not levels or not all(isinstance(lv, LevelConfig) for lv in levels):
            raise ValueError(f"FractalConfig.levels must be a non-empty sequence of LevelConfig, got {self.levels!r}")
        object.__setattr__(self, "levels", levels)
        for name in ("pixel_head", "guide_head"):
            if not isinstance(getattr(self, name), PixelHeadConfig):
                raise ValueError(f"FractalConfig.{name} must be a PixelHeadConfig, got {getattr(self, name)!r}")
        _check_ints(self, ("num_classes", "num_conds"))
        if self.num_conds > CHILD_CONDS[MAR]:
            raise ValueError(f"FractalConfig.num_conds must be at most {CHILD_CONDS[MAR]}, got {self.num_conds}")
        for k in range(1, len(levels)):
            if levels[k].image_size != levels[k - 1].patch_size:
                raise ValueError(f"level {k}'s image_size ({levels[k].image_size}) must be level {k - 1}'s "
                                 f"patch_size ({levels[k - 1].patch_size})")
            if levels[k].kind == MAR and CHILD_CONDS[levels[k - 1].kind] < self.num_conds:
                raise ValueError(f"level {k} (MAR) reads num_conds={self.num_conds} conditions but level {k - 1} "
                                 f"({levels[k - 1].kind.upper()}) passes {CHILD_CONDS[levels[k - 1].kind]}")
        if levels[-1].patch_size != 1:
            raise ValueError(f"the last level's patch_size must be 1 (its tokens are pixels), "
                             f"got {levels[-1].patch_size}")
        if levels[0].guiding_pixel:
            raise ValueError("level 0 has no guiding pixel (it is conditioned on the class alone)")
        if self.image_size ** 2 >= 2 ** 32:
            raise ValueError(f"image_size {self.image_size}: the keyed RNG numbers pixels with 32 bits")

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.levels[0].image_size

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def num_iters(self) -> tuple[int, ...]:
        """Default iterations per level (AR levels: one per token, whatever ``num_iter`` says)."""
        return tuple(lv.seq_len if lv.kind == AR else min(lv.num_iter, lv.seq_len) for lv in self.levels)

    def cond_width(self, k: int) -> int:
        """Width of the conditions level ``k`` reads: the class embedding's (level 0's width) at the
        top, the parent level's width below."""
        return self.levels[max(k - 1, 0)].width


def _published(sizes, widths, depths, heads, kinds, num_iters, *, num_conds, guiding_pixel) -> FractalConfig:
    # Mirrors the official builders: lists per level, the last entry of widths/depths/heads being
    # the pixel head's; the guiding pixel applies to levels > 0 only.
    n = len(sizes) - 2
    levels = tuple(LevelConfig(kind=kinds[k], image_size=sizes[k], patch_size=sizes[k + 1], width=widths[k],
                               depth=depths[k], heads=heads[k], num_iter=num_iters[k],
                               guiding_pixel=guiding_pixel and k > 0)
                   for k in range(n + 1))
    return FractalConfig(levels=levels, pixel_head=PixelHeadConfig(width=widths[-1], depth=depths[-1], heads=heads[-1]),
                         num_conds=num_conds)


# Official builders in models/fractalgen.py; README flags: --num_conds, --guiding_pixel, --num_iter_list.
# An AR level's iterations are its sequence length (the official AR sampler ignores num_iter_list).
PRESETS: dict[str, FractalConfig] = {
    "fractalar_in64": _published((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4), (AR, AR), (256, 16),
                                 num_conds=1, guiding_pixel=False),
    "fractalmar_in64": _published((64, 4, 1), (1024, 512, 128), (32, 8, 3), (16, 8, 4), (MAR, MAR), (64, 16),
                                  num_conds=5, guiding_pixel=False),
    "fractalmar_base_in256": _published((256, 16, 4, 1), (768, 384, 192, 64), (24, 6, 3, 1), (12, 6, 3, 4),
                                        (MAR, MAR, MAR), (64, 16, 16), num_conds=5, guiding_pixel=True),
    "fractalmar_large_in256": _published((256, 16, 4, 1), (1024, 512, 256, 64), (32, 8, 4, 1), (16, 8, 4, 4),
                                         (MAR, MAR, MAR), (64, 16, 16), num_conds=5, guiding_pixel=True),
    "fractalmar_huge_in256": _published((256, 16, 4, 1), (1280, 640, 320, 64), (40, 10, 5, 1), (16, 8, 4, 4),
                                        (MAR, MAR, MAR), (64, 16, 16), num_conds=5, guiding_pixel=True),
}

# Sampling settings of the official README (FID-50K runs): CFG scale with the linear schedule and
# temperature; the probability filter threshold is the official default 1e-4 throughout.
PRESET_SAMPLING: dict[str, dict] = {
    "fractalar_in64": {"cfg": 11.0, "temperature": 1.03},
    "fractalmar_in64": {"cfg": 6.5, "temperature": 1.02},
    "fractalmar_base_in256": {"cfg": 29.0, "temperature": 1.1},
    "fractalmar_large_in256": {"cfg": 21.0, "temperature": 1.1},
    "fractalmar_huge_in256": {"cfg": 19.0, "temperature": 1.1},
}

# Parameter counts the paper and README publish (README: 432M for both ImageNet 64 models, although
# the official fractalar_in64 builder has 442.07M: its SwiGLU MLPs are wider than the MAR's).
PUBLISHED_PARAMETERS: dict[str, float] = {
    "fractalar_in64": 432e6, "fractalmar_in64": 432e6, "fractalmar_base_in256": 186e6,
    "fractalmar_large_in256": 438e6, "fractalmar_huge_in256": 848e6,
}


def get_config(name: str) -> FractalConfig:
    """The preset ``name`` (one of ``PRESETS``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown FractalGen preset {name!r}; the presets are {sorted(PRESETS)}")
    return PRESETS[name]


def small_config(name: str | FractalConfig, *, width: int = 8, depth: int = 1, heads: int = 2,
                 num_classes: int = 10) -> FractalConfig:
    """A preset's structure (image and patch sizes, kinds, iterations, guiding pixels, conditions) at a
    small ``width`` and ``depth`` for every level and head: the sequential call pattern of the published
    model at a cost a CPU can sample (tests, CPU benchmarks).

    Raises:
        ValueError: for an unknown preset name, or sizes the configs reject.
    """
    c = get_config(name) if isinstance(name, str) else name
    levels = tuple(LevelConfig(kind=lv.kind, image_size=lv.image_size, patch_size=lv.patch_size, width=width,
                               depth=depth, heads=heads, num_iter=lv.num_iter, guiding_pixel=lv.guiding_pixel)
                   for lv in c.levels)
    head = PixelHeadConfig(width=width, depth=depth, heads=heads)
    return FractalConfig(levels=levels, pixel_head=head, num_classes=num_classes, num_conds=c.num_conds,
                         guide_head=head)


def ar_hidden(width: int) -> int:
    """Hidden width of an AR level's SwiGLU MLP: ``2/3 * 4 * width`` rounded up to a multiple of 256
    (LlamaGen's ``FeedForward`` as the official ``models/ar.py`` uses it)."""
    return -(-int(2 * 4 * width / 3) // 256) * 256
