"""When a cached result may be served again, and what it depends on besides its explicit inputs.

Every fastgen cache (cross-attention K/V, step-invariant module outputs, condition K/V, KV-Edit's
background K/V) lives inside one generation and keys its entries on everything that changes the
result: the input tensors (identity, in-place version, shape, strides, dtype, device, storage),
the *ambient* state (grad and inference mode, autocast enabled and dtype per device type), and the
state of every module the cached computation runs (parameter identity, version and storage; the
PEFT knobs of every LoRA layer beneath it: scales, active adapters, merged, disabled). This module
computes those keys, in one place, for all of them.

Some changes cannot be seen: writes through ``tensor.data`` or into an inference tensor bypass the
version counter (inference tensors keep none). That is why reuse is confined to one generation, a
scope in which the step-invariant inputs do not change by contract (``fastgen.generation``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Device types whose autocast state is read into every key (CPU autocast matters on a CPU; a CUDA
# model may be fed under either).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def version(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (which tracks no version counter)."""
    return None if t.is_inference() else t._version


def tensor_key(t: torch.Tensor) -> tuple:
    """What identifies ``t``'s contents short of reading them (its identity is held apart, by
    weak reference, by the caches): version, shape, strides, dtype, device and storage."""
    return (version(t), tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr())


def ambient_key() -> tuple:
    """Grad mode, inference mode and, per device type, autocast enabled and its dtype."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICE_TYPES),
    )


def _peft_knobs(m: torch.nn.Module) -> tuple | None:
    # A PEFT tuner layer's settings that change its output without touching a parameter.
    scaling = getattr(m, "scaling", None)
    if not isinstance(scaling, dict) and not hasattr(m, "active_adapters"):
        return None
    return (
        tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None,
        tuple(getattr(m, "active_adapters", ()) or ()),
        tuple(getattr(m, "merged_adapters", ()) or ()),
        bool(getattr(m, "disable_adapters", False)),
    )


def modules_key(modules: Iterable[torch.nn.Module]) -> tuple:
    """The state of every module in ``modules`` and beneath them: each submodule's identity and
    PEFT knobs, each parameter's and buffer's identity, version and storage."""
    out = []
    for root in modules:
        for m in root.modules():
            knobs = _peft_knobs(m)
            tensors = tuple((id(p), version(p), p.data_ptr()) for p in m._parameters.values() if p is not None)
            buffers = tuple((id(b), version(b), b.data_ptr()) for b in m._buffers.values() if b is not None)
            out.append((id(m), knobs, tensors, buffers))
    return tuple(out)


def _random_in(modules: Iterable[torch.nn.Module]) -> bool:
    # Dropout in training mode draws anew at every call: nothing computed under it is reusable.
    for root in modules:
        for m in root.modules():
            if m.training and isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
                return True
    return False


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def why_no_reuse(modules: Iterable[torch.nn.Module] = ()) -> str | None:
    """Why a cached result may be neither served nor stored right now, or None when it may.

    - under ``torch.compile`` the cache would be traced as Python state;
    - during CUDA-graph capture a hit would leave the computation out of the graph, whose replays
      then serve the captured K/V whatever the inputs hold by then;
    - with autograd on, reuse would keep graphs alive across calls and change what gradient
      checkpointing recomputes (fastgen is an inference accelerator: training steps run as upstream);
    - dropout in training mode makes the computation random.
    """
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if capturing():
        return "a CUDA graph is being captured"
    if torch.is_grad_enabled():
        return "autograd is on"
    modules = tuple(modules)
    if _random_in(modules):
        return "a dropout layer is in training mode"
    return None
