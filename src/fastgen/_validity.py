"""When a cached result may be served again, and what it depends on besides its explicit inputs.

Every fastgen cache (cross-attention K/V, step-invariant module outputs, condition K/V, KV-Edit's
background K/V) lives inside one generation and keys its entries on everything that changes the
result: the input tensors (identity, in-place version, shape, strides, dtype, device, storage),
the *ambient* state (grad and inference mode, autocast enabled and dtype per device type), and the
state of every module the cached computation runs (parameters' in-place version, dtype, device and
shape; the PEFT knobs of every LoRA layer beneath it: scales, active adapters, merged, disabled). This module
computes those keys, in one place, for all of them.

Some changes cannot be seen: writes through ``tensor.data`` or into an inference tensor bypass the
version counter (inference tensors keep none). That is why reuse is confined to one generation, a
scope in which the step-invariant inputs do not change by contract (``fastgen.generation``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Device types whose autocast state is read into every key (a model may be fed under any of them).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def version(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor (which tracks no version counter)."""
    return None if t.is_inference() else t._version


def tensor_key(t: torch.Tensor) -> tuple:
    """What identifies ``t``'s contents short of reading them (its identity is held apart, by
    weak reference, by the caches): version, shape, strides, dtype, device and storage."""
    return (version(t), tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr())


def ambient_key() -> tuple:
    """Grad mode, inference mode, per device type autocast enabled and its dtype, and the fp32
    matmul precision (TF32 switches change what an fp32 projection computes on a GPU)."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICE_TYPES),
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )


def _tuner_layer_type():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no LoRA layers
        return ()
    return BaseTunerLayer


def _lora_knobs(m: torch.nn.Module, tuner) -> tuple | None:
    # A PEFT tuner layer's settings that change its output without touching a parameter. Only tuner
    # layers: a diffusers model has methods of the same names (active_adapters, disable_adapters).
    if not isinstance(m, tuner):
        return None
    scaling = getattr(m, "scaling", None)
    return (tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None, tuple(m.active_adapters),
            tuple(getattr(m, "merged_adapters", ()) or ()), bool(m.disable_adapters))


def modules_key(modules: Iterable[torch.nn.Module]) -> tuple:
    """What ``modules`` (and everything beneath them) compute with, in a form offloading leaves
    unchanged: each submodule's identity and PEFT knobs (LoRA scales, active, merged and disabled
    adapters), and each parameter's and buffer's in-place version, dtype, device and shape.

    Not the parameters' identity or storage: offload hooks change both between calls without
    changing a value (accelerate's hooks set new ``Parameter`` objects on every module beneath the
    one they sit on, model and group offload move ``param.data`` to another storage and back), and
    a cache keyed on them would never hit under offload. Left out with them, so not seen within one
    generation: a ``param.data = other`` swap, a write through ``.data``, a parameter replaced by
    assignment (``load_state_dict(assign=True)``). Fusing a LoRA shows in its knobs.
    """
    tuner, out = _tuner_layer_type(), []
    for root in modules:
        for m in root.modules():
            tensors = tuple((version(t), t.dtype, t.device, tuple(t.shape))
                            for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
            out.append((id(m), _lora_knobs(m, tuner), tensors))
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
