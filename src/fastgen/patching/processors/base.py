"""What every fastgen attention processor shares: the upstream processor it wraps (and hands
inputs it does not accelerate back to), the config, and a readable repr for ``print(model)``."""

from __future__ import annotations

import torch

from fastgen.patching.config import PatchConfig


class FastgenProcessor(torch.nn.Module):
    """Base class. An ``nn.Module`` so that ``print(model)`` lists it under each attention; it has
    no parameters, so state dicts, LoRA injection and offload hooks never see it."""

    #: what the processor does differently from upstream, for repr
    technique = ""

    def __init__(self, original, config: PatchConfig, state):
        super().__init__()
        # Plain attributes, never registered as submodules.
        self.__dict__["original"] = original
        self.__dict__["state"] = state
        self.__dict__["_kernels"] = {}
        self.config = config

    def kernels_here(self, x: torch.Tensor) -> bool:
        """Whether fastgen's attention or prologue kernels run for tensors like ``x``. Where neither
        does (a CPU, fp32 on auto), rewriting the attention gains nothing over upstream: processors
        then run upstream's code (and keep only what pays off anywhere, like the K/V cache)."""
        key = (x.device, x.dtype)
        hit = self._kernels.get(key)
        if hit is None:
            from fastgen.ops.attention import uses_kernel as attn_kernel
            from fastgen.ops.prologue import uses_kernel as prologue_kernel

            c = self.config
            hit = attn_kernel(c.attention_backend, x.device, x.dtype) or (
                c.fuse_prologue and prologue_kernel(c.prologue_backend, x.device, x.dtype))
            self._kernels[key] = hit
        return hit

    def upstream(self, *args, **kwargs):
        """Run the wrapped upstream processor (for inputs fastgen does not accelerate)."""
        return self.original(*args, **kwargs)

    def unsupported(self) -> str | None:
        # diffusers' context/tensor parallelism goes through its own dispatcher: leave it be.
        if getattr(self.original, "_parallel_config", None) is not None:
            return "a parallel config is set"
        return None

    def extra_repr(self) -> str:
        return (f"wraps={type(self.original).__name__}, {self.technique}, "
                f"attention={self.config.attention_backend}, fuse_prologue={self.config.fuse_prologue}")
