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
        self.config = config

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
