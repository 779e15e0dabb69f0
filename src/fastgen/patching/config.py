"""``PatchConfig``: every option of ``fastgen.patch``, documented and validated."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from fastgen._config import build_config, validated
from fastgen.constants import ATTENTION_BACKENDS
from fastgen.constants import KERNEL_BACKENDS as PROLOGUE_BACKENDS
from fastgen.merging.config import ToDoConfig, ToMeConfig

__all__ = ["PatchConfig", "build_config", "validated"]


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
        tome: token merging (approximate, off by default): None, a ratio (``tome=0.5`` is
            ``fastgen.ToMeConfig(0.5)``; 0 is None) or a ``fastgen.ToMeConfig``.
        todo: token downsampling of self-attention K/V (approximate, off by default): None, a factor
            (``todo=2`` is ``fastgen.ToDoConfig(2)``; 0 and 1 are None) or a ``fastgen.ToDoConfig``.
    """

    attention_backend: str = "auto"
    fuse_prologue: bool = True
    prologue_backend: str = "auto"
    cache_cross_attention_kv: bool = True
    include_vae: bool = False
    autotune: bool | None = None
    tome: ToMeConfig | float | None = None
    todo: ToDoConfig | int | None = None

    def __post_init__(self):
        tome, todo = self.tome, self.todo
        if tome is not None and not isinstance(tome, ToMeConfig):
            if isinstance(tome, bool) or not isinstance(tome, numbers.Real):
                raise ValueError(f"tome must be None, a ratio or a fastgen.ToMeConfig, got {tome!r}")
            tome = ToMeConfig(float(tome)) if tome != 0 else None
        if todo is not None and not isinstance(todo, ToDoConfig):
            if isinstance(todo, bool) or not isinstance(todo, numbers.Integral):
                raise ValueError(f"todo must be None, an integer factor or a fastgen.ToDoConfig, got {todo!r}")
            todo = ToDoConfig(int(todo)) if todo not in (0, 1) else None  # as tome=0: no downsampling
        object.__setattr__(self, "tome", tome)
        object.__setattr__(self, "todo", todo)
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
