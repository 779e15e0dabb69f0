"""FramePack's packing schedule as data: which history frames are patchified with which kernel, the
frame indices (RoPE positions) of every part of a section, and the order sections are made in.

A FramePack video is made a *section* (``latent_window_size`` latent frames, 33 pixel frames at the
released 9) at a time, each conditioned on a start frame and on already-made *history* frames. The
history is packed at several rates: the nearest frames with the noisy latents' own patch kernel,
older ones with larger kernels (released: 1 frame at (1, 2, 2), 2 at (2, 4, 4), 16 at (4, 8, 8)), so
the context a section attends to is bounded however long the video is (arXiv 2504.12626, sec. 3).

Index layouts per section (diffusers ``HunyuanVideoFramepackPipeline``, the released FramePack code):

- inverted anti-drifting (generate from the end backwards; the history is the *future*):
  ``[start 1 | blank padding*window | noisy window | 1x | 2x | 4x]``, paddings
  ``[3] + [2] * (n - 3) + [1, 0]`` for n > 4 sections, else ``n-1, ..., 0``;
- vanilla (FramePack-F1, generate forwards): ``[start 1 | 4x | 2x | 1x | noisy window]``.

The clean (1x) tokens are the start frame followed by the nearest history frame(s), with one index
tensor for both. Pure data: no model, no tensors beyond the index vectors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from fastgen._config import validated

VANILLA = "vanilla"
INVERTED_ANTI_DRIFTING = "inverted_anti_drifting"
SAMPLING_TYPES = (VANILLA, INVERTED_ANTI_DRIFTING)

# (frames, latent patch kernel (t, h, w)), nearest history first: FramePackI2V_HY / FramePack_F1_I2V_HY
RELEASED_HISTORY = ((1, (1, 2, 2)), (2, (2, 4, 4)), (16, (4, 8, 8)))


def _positive_int(value, what: str) -> int:
    # numpy and torch integers too, as diffusers' pipeline accepts them
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _kernel(k) -> tuple[int, int, int]:
    if (not isinstance(k, (tuple, list)) or len(k) != 3
            or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0 for x in k)):
        raise ValueError(f"a patch kernel is three positive ints (t, h, w), got {k!r}")
    return tuple(int(x) for x in k)


@validated
@dataclass(frozen=True)
class FramePackConfig:
    """How a FramePack video is cut into sections and how its history is packed.

    Attributes:
        latent_window_size: latent frames made per section (default 9, as released: 33 pixel
            frames at the VAE's 4x temporal compression).
        sampling_type: ``"inverted_anti_drifting"`` (default; the end of the video first, every
            section anchored on the start image) or ``"vanilla"`` (forwards, FramePack-F1).
        history: ``((frames, (kt, kh, kw)), ...)``, nearest history first: how many history frames
            each rate packs and its patch kernel in latent units. The first rate is the clean 1x
            rate (its kernel is the noisy latents' patch kernel) and also carries the start frame.
            Default: the released ``((1, (1, 2, 2)), (2, (2, 4, 4)), (16, (4, 8, 8)))``; any other
            ratios are accepted here (diffusers' transformer has convolutions for the released ones
            only, and says so when given others).

    Raises:
        ValueError: for a window < 1, an unknown sampling type, or a history that is empty, has
            a rate with < 1 frame, or a kernel that is not three positive ints.
    """

    latent_window_size: int = 9
    sampling_type: str = INVERTED_ANTI_DRIFTING
    history: tuple = RELEASED_HISTORY

    def __post_init__(self):
        object.__setattr__(self, "latent_window_size", _positive_int(self.latent_window_size, "latent_window_size"))
        st = getattr(self.sampling_type, "value", self.sampling_type)  # diffusers' FramepackSamplingType enum
        if st not in SAMPLING_TYPES:
            raise ValueError(f"sampling_type must be one of {SAMPLING_TYPES}, got {self.sampling_type!r}")
        object.__setattr__(self, "sampling_type", st)
        if not isinstance(self.history, (tuple, list)) or not self.history:
            raise ValueError(f"history must be a non-empty sequence of (frames, kernel), got {self.history!r}")
        rates = []
        for rate in self.history:
            if not isinstance(rate, (tuple, list)) or len(rate) != 2:
                raise ValueError(f"each history rate is (frames, (kt, kh, kw)), got {rate!r}")
            frames, kernel = rate
            if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1:
                raise ValueError(f"a history rate packs at least 1 frame, got {frames!r}")
            rates.append((int(frames), _kernel(kernel)))
        object.__setattr__(self, "history", tuple(rates))

    @property
    def history_sizes(self) -> tuple[int, ...]:
        """Frames per rate, nearest first (released: (1, 2, 16))."""
        return tuple(f for f, _ in self.history)

    @property
    def kernels(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(k for _, k in self.history)

    @property
    def history_frames(self) -> int:
        return sum(self.history_sizes)


def window_num_frames(latent_window_size: int, vae_scale_factor_temporal: int = 4) -> int:
    """Pixel frames of one section: ``(window - 1) * temporal + 1`` (33 as released).

    Raises:
        ValueError: if either argument is not a positive int.
    """
    w = _positive_int(latent_window_size, "latent_window_size")
    return (w - 1) * _positive_int(vae_scale_factor_temporal, "vae_scale_factor_temporal") + 1


def num_sections(num_frames: int, latent_window_size: int = 9, vae_scale_factor_temporal: int = 4) -> int:
    """Sections diffusers' pipeline makes for ``num_frames`` pixel frames: ``ceil(num_frames / 33)``
    at the released window, at least 1 (129 -> 4, 91 -> 3).

    Raises:
        ValueError: if an argument is not a positive int.
    """
    num_frames = _positive_int(num_frames, "num_frames")
    per = window_num_frames(latent_window_size, vae_scale_factor_temporal)
    return max(1, math.ceil(num_frames / per))


def latent_paddings(n: int) -> list[int]:
    """Blank windows between the start frame and the noisy window, per section of an inverted
    anti-drifting video of ``n`` sections: ``[n-1, ..., 0]``, or ``[3] + [2]*(n-3) + [1, 0]`` for n > 4."""
    n = _positive_int(n, "the number of sections")
    return [3] + [2] * (n - 3) + [1, 0] if n > 4 else list(reversed(range(n)))


@dataclass(frozen=True)
class SectionLayout:
    """One section's frame indices (the RoPE positions of its parts), as 1-D int64 tensors.

    Attributes:
        index: 0-based, in the order sections are made.
        first, last: whether it is made first / last.
        padding: blank windows after the start frame (inverted order; 0 in vanilla order).
        latents: (window,) indices of the noisy latents.
        clean: (1 + frames of the 1x rate,) the start frame then the nearest history.
        history: one index tensor per rate after the 1x rate (released: 2x, 4x), nearest first.
        total: the length of the index range the layout splits.
    """

    index: int
    first: bool
    last: bool
    padding: int
    latents: torch.Tensor
    clean: torch.Tensor
    history: tuple[torch.Tensor, ...]
    total: int

    @property
    def context_frames(self) -> int:
        return self.clean.numel() + sum(h.numel() for h in self.history)


def section_layout(config: FramePackConfig, n: int, k: int) -> SectionLayout:
    """Section ``k`` (0-based, in the order made) of a video of ``n`` sections (see the module
    docstring). Built when its section starts, so its index tensors (the keys of the per-section
    caches) are gone with the section.

    Raises:
        ValueError: if ``n`` < 1 or ``k`` is not in ``range(n)``.
    """
    n = _positive_int(n, "the number of sections")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < n:
        raise ValueError(f"section index must be in range({n}), got {k!r}")
    k = int(k)
    w, sizes = config.latent_window_size, list(config.history_sizes)
    if config.sampling_type == INVERTED_ANTI_DRIFTING:
        pad = latent_paddings(n)[k] * w
        parts = torch.arange(1 + pad + w + sum(sizes)).split([1, pad, w, *sizes])
        prefix, latents, one_x, rest = parts[0], parts[2], parts[3], parts[4:]
        padding = pad // w
    else:
        parts = torch.arange(1 + sum(sizes) + w).split([1, *reversed(sizes), w])
        prefix, latents, one_x = parts[0], parts[-1], parts[-2]
        rest = tuple(reversed(parts[1:-2]))  # nearest first
        padding = 0
    return SectionLayout(index=k, first=k == 0, last=k == n - 1, padding=padding, latents=latents,
                         clean=torch.cat([prefix, one_x]), history=tuple(rest),
                         total=sum(p.numel() for p in parts))


def section_layouts(config: FramePackConfig, n: int) -> list[SectionLayout]:
    """The ``n`` sections of one video, in the order they are made (``section_layout`` of each).

    Raises:
        ValueError: if ``n`` is not a positive int.
    """
    n = _positive_int(n, "the number of sections")
    return [section_layout(config, n, k) for k in range(n)]


def packed_tokens(config: FramePackConfig, latent_height: int, latent_width: int,
                  patch_size: tuple[int, int, int] = (1, 2, 2)) -> dict[str, int]:
    """Tokens of one section's packed sequence at a latent size, per part, in packed order
    ``[coarsest history, ..., 2x, clean (1x), noisy]``: the same for every section of a video, so
    the context is bounded however many sections there are. Replicate padding rounds each part up
    to a kernel multiple. At 640x608 (latent 80x76) as released: noisy 13680, clean 3040, 2x 380,
    4x 400.

    Returns:
        ``{"4x": ..., "2x": ..., "clean": ..., "noisy": ..., "context": ..., "total": ...}`` with
        rate names ``f"{kh // patch_h}x"`` (the spatial compression over the noisy tokens').

    Raises:
        ValueError: for a latent size or patch kernel that is not positive ints.
    """
    latent_height = _positive_int(latent_height, "latent_height")
    latent_width = _positive_int(latent_width, "latent_width")
    pt, ph, pw = _kernel(patch_size)
    w = config.latent_window_size

    def tokens(frames, k):
        return math.ceil(frames / k[0]) * math.ceil(latent_height / k[1]) * math.ceil(latent_width / k[2])

    out = {}
    for frames, k in reversed(config.history[1:]):
        out[f"{k[1] // ph}x"] = out.get(f"{k[1] // ph}x", 0) + tokens(frames, k)
    out["clean"] = tokens(1 + config.history[0][0], config.history[0][1])
    out["noisy"] = tokens(w, (pt, ph, pw))
    out["context"] = sum(v for k, v in out.items() if k != "noisy")
    out["total"] = out["context"] + out["noisy"]
    return out
