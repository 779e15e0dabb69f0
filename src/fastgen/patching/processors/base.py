"""What every fastgen attention processor shares: the upstream processor it wraps (and hands
inputs it does not accelerate back to), the patch it belongs to, and a readable repr for
``print(model)``."""

from __future__ import annotations

import importlib

import torch

from fastgen.ops.attention import available_backends
from fastgen.ops.attention import uses_kernel as attention_uses_kernel
from fastgen.ops.prologue import uses_kernel as prologue_uses_kernel
from fastgen._warnings import warn_once

# Where a patched attention module keeps the PatchState whose processor runs in it: processors that
# diffusers re-creates with ``type(processor)()`` (IP-Adapter load / unload) find their patch there.
ATTN_STATE = "_fastgen_patch"


class FastgenProcessor(torch.nn.Module):
    """Base class. An ``nn.Module`` so that ``print(model)`` lists it under each attention; it has
    no parameters, so state dicts, LoRA injection and offload hooks never see it.

    ``FastgenXProcessor()`` with no arguments (as diffusers re-creates processors when it loads or
    unloads IP-Adapters) wraps a fresh upstream processor and follows the patch of the attention
    module it runs in; in a module no patch owns, it runs the upstream processor unchanged.
    """

    #: what the processor does differently from upstream, for repr
    technique = ""
    #: the upstream processor class it wraps: (module, class name)
    wraps: tuple[str, str] = ("", "")

    def __init__(self, original=None, config=None, state=None):
        super().__init__()
        if original is None:
            module, name = self.wraps
            original = getattr(importlib.import_module(module), name)()
        # Plain attributes, never registered as submodules.
        self.__dict__["original"] = original
        self.__dict__["state"] = state
        self.__dict__["_kernels"] = {}
        self.__dict__["_config"] = config

    @property
    def config(self):
        return self._config if self._config is not None else getattr(self.state, "config", None)

    def bound(self, attn):
        """The PatchState this call runs under: the patch installed on ``attn``, if this processor
        belongs to it (or follows it). None otherwise, and then only upstream runs: a processor of a
        patch removed or suspended since, that diffusers put back (``unfuse_qkv_projections``
        restores the processors it saw when fusing), does nothing of fastgen's."""
        state = attn.__dict__.get(ATTN_STATE)
        if state is None or state.removed or (self.state is not None and self.state is not state):
            return None
        return state

    # diffusers' ``set_attention_backend`` sets ``processor._attention_backend`` where the processor
    # has one (hasattr): forwarded to the wrapped processor, which then runs with that backend.
    @property
    def _attention_backend(self):
        if not hasattr(self.original, "_attention_backend"):
            raise AttributeError("_attention_backend")  # hasattr() False, as for the upstream processor
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend):
        self.original._attention_backend = backend

    def kernels_here(self, x: torch.Tensor, config) -> bool:
        """Whether fastgen's attention or prologue kernels run for tensors like ``x``. Where neither
        does (a CPU, fp32 on auto), rewriting the attention gains nothing over upstream: processors
        then run upstream's code (and keep only what pays off anywhere, like the K/V cache).
        A backend asked for by name that cannot run here is said once, with the reason."""
        key = (x.device, x.dtype, config)
        hit = self._kernels.get(key)
        if hit is None:
            hit = attention_uses_kernel(config.attention_backend, x.device, x.dtype) or (
                config.fuse_prologue and prologue_uses_kernel(config.prologue_backend, x.device, x.dtype))
            _say_unhonoured(config, x)
            self._kernels[key] = hit
        return hit

    def upstream(self, *args, **kwargs):
        """Run the wrapped upstream processor (for inputs fastgen does not accelerate)."""
        return self.original(*args, **kwargs)

    def defer(self, reason: str, *args, **kwargs):
        """Run upstream for a reason that costs the user fastgen's acceleration: said once."""
        warn_once(f"defer:{type(self).__name__}:{reason}",
                  f"{type(self).__name__} runs diffusers' {type(self.original).__name__} unchanged: {reason}")
        return self.original(*args, **kwargs)

    def unsupported(self) -> str | None:
        """Why this processor must run upstream whatever the inputs, or None."""
        # diffusers' context/tensor parallelism goes through its own dispatcher: leave it be.
        if getattr(self.original, "_parallel_config", None) is not None:
            return "a diffusers parallel config is set"
        # The user chose a diffusers attention backend for this model (set_attention_backend): honoured.
        if getattr(self.original, "_attention_backend", None) is not None:
            return "a diffusers attention backend was chosen with set_attention_backend"
        return None

    def extra_repr(self) -> str:
        config = self.config
        if config is None:
            return f"wraps={type(self.original).__name__}, follows the patch of its attention module"
        return (f"wraps={type(self.original).__name__}, {self.technique}, "
                f"attention={config.attention_backend}, fuse_prologue={config.fuse_prologue}")


def _say_unhonoured(config, x: torch.Tensor) -> None:
    # An explicitly requested backend that cannot run for these inputs: one warning naming why.
    if config.attention_backend != "auto" and config.attention_backend != "sdpa" and not attention_uses_kernel(
            config.attention_backend, x.device, x.dtype):
        why = available_backends(x.device).get(config.attention_backend) or f"{x.dtype} inputs"
        warn_once(f"patch-attention:{config.attention_backend}:{x.device.type}:{x.dtype}",
                  f"fastgen.patch: attention_backend={config.attention_backend!r} cannot run on {x.device.type} "
                  f"{x.dtype} inputs ({why}); PyTorch's attention runs there instead")
    if (config.fuse_prologue and config.prologue_backend not in ("auto", "torch")
            and not prologue_uses_kernel(config.prologue_backend, x.device, x.dtype)):
        warn_once(f"patch-prologue:{config.prologue_backend}:{x.device.type}:{x.dtype}",
                  f"fastgen.patch: prologue_backend={config.prologue_backend!r} cannot run on {x.device.type} "
                  f"{x.dtype} inputs ({_why_not_prologue(config.prologue_backend, x)}); the unfused PyTorch "
                  "prologue runs there")


def _why_not_prologue(backend: str, x: torch.Tensor) -> str:
    from fastgen._cuda import cuda_ext_can_run_on
    from fastgen.kernels._common import triton_can_run_on

    reason = triton_can_run_on(x.device) if backend == "triton" else cuda_ext_can_run_on(x.device, "qk_norm_rope")
    return reason or f"dtype {x.dtype} is not supported"
