"""``PatchConfig``: every option of ``fastgen.patch``, documented and validated."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, fields

from fastgen.constants import ATTENTION_BACKENDS
from fastgen.constants import KERNEL_BACKENDS as PROLOGUE_BACKENDS


def validated(cls):
    """Make a config dataclass's constructor raise ``ValueError`` (naming the known options) for
    unknown or surplus arguments, as ``build`` does, instead of Python's ``TypeError``."""
    init = cls.__init__
    names = [f.name for f in fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; the options are {sorted(names)}")
        if len(args) > len(names):
            raise ValueError(f"{cls.__name__} takes at most {len(names)} positional arguments ({', '.join(names)}), "
                             f"got {len(args)}")
        twice = sorted(set(names[: len(args)]) & set(kwargs))
        if twice:
            raise ValueError(f"{cls.__name__} got {twice} both by position and by name")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@validated
@dataclass(frozen=True)
class PatchConfig:
    """What ``fastgen.patch`` does. The defaults apply only exact optimizations.

    Attributes:
        attention_backend: backend of ``fastgen.ops.attention`` for every patched attention:
            ``"auto"`` (measured on a GPU, see ``autotune``; PyTorch SDPA on a CPU), ``"triton"``,
            ``"cuda"``, ``"sdpa"`` or ``"xformers"``.
        fuse_prologue: fuse RMS-norm of q/k and RoPE into one kernel (``fastgen.ops.qk_norm_rope``)
            where the model has them (Flux, SD3.5, Wan, HunyuanVideo). Exact to rounding.
        prologue_backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        cache_cross_attention_kv: compute the K/V of cross-attention over the text embeddings once
            per generation and reuse them at every step (UNet, Wan). Exact: keyed on the very
            embeddings tensor, its in-place version and the projection weights.
        include_vae: also patch the VAE's attention (off: the VAE is left alone by default).
        autotune: whether the ``"auto"`` backends measure (``fastgen.ops.autotune``): ``None`` (the
            default) follows ``FASTGEN_AUTOTUNE``; ``False`` uses the fixed table for this patch.
    """

    attention_backend: str = "auto"
    fuse_prologue: bool = True
    prologue_backend: str = "auto"
    cache_cross_attention_kv: bool = True
    include_vae: bool = False
    autotune: bool | None = None

    def __post_init__(self):
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.prologue_backend not in PROLOGUE_BACKENDS:
            raise ValueError(f"prologue_backend must be one of {PROLOGUE_BACKENDS}, got {self.prologue_backend!r}")
        for name in ("fuse_prologue", "cache_cross_attention_kv", "include_vae"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.autotune is not None and not isinstance(self.autotune, bool):
            raise ValueError(f"autotune must be None, True or False, got {self.autotune!r}")

    @classmethod
    def build(cls, config: PatchConfig | None = None, **overrides) -> PatchConfig:
        """``config`` with ``overrides`` applied; unknown keys raise ``ValueError`` naming the known ones."""
        return build_config(cls, config, overrides, "fastgen.PatchConfig")


def build_config(cls, config, overrides: dict, label: str):
    """``config`` (an instance of the dataclass ``cls``, or None for the defaults) with
    ``overrides`` applied; unknown keys or a config of another type raise ``ValueError``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; the options are {sorted(known)}")
    if config is not None and not isinstance(config, cls):
        raise ValueError(f"config must be a {label}, got {type(config).__name__}")
    return dataclasses.replace(config or cls(), **overrides)
