"""Per-branch LoRA adapters: a condition's adapter applies to that condition's tokens only.

PEFT activates adapters per layer, for every token that passes through it. Each branch runs its
own calls of the shared layers, so switching a block's LoRA layers to the branch's adapters
around those calls gives every branch its own weights without copying any.
"""

from __future__ import annotations

import torch


def _tuner_layers(module: torch.nn.Module) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class AdapterSwitch:
    """Selects, per module, the adapters of the main branch or of one condition.

    Main branch (text and image tokens): the adapters active when the forward started, minus
    every condition's adapter. Condition branch: its own adapter alone, or none. ``begin`` reads
    the active adapters at the start of each forward (a callback may switch them between steps)
    and ``restore`` puts them back at its end.
    """

    def __init__(self, model: torch.nn.Module, condition_adapters: list[str | None]):
        self._names = {a for a in condition_adapters if a is not None}
        check_adapters(model, self._names)
        self._model = model
        self._layers: dict[int, list] = {}
        self._original: dict[int, list[str]] = {}
        self.enabled = False

    def begin(self) -> None:
        """Read the active adapters of every LoRA layer (the main branch's, before any switch)."""
        self._layers.clear()
        self._original.clear()
        self.enabled = bool(self._names) or bool(getattr(self._model, "peft_config", None))
        if not self.enabled:
            return
        for layer in self._layers_of(self._model):
            if getattr(layer, "merged", False) and self._names:
                raise ValueError("a LoRA adapter is fused into the base weights (fuse_lora): per-condition adapters "
                                 "need them unfused; call pipe.unfuse_lora() first")
            self._original[id(layer)] = list(layer.active_adapters)

    def _layers_of(self, module: torch.nn.Module) -> list:
        key = id(module)
        if key not in self._layers:
            self._layers[key] = _tuner_layers(module)
        return self._layers[key]

    def select(self, module: torch.nn.Module, adapter: str | None, main: bool) -> None:
        """Activate, in ``module``'s LoRA layers, the main branch's adapters or ``adapter``'s."""
        if not self.enabled:
            return
        for layer in self._layers_of(module):
            if main:
                want = [a for a in self._original[id(layer)] if a not in self._names]
            else:
                want = [adapter] if adapter is not None and adapter in layer._get_available_adapters() else []
            # Set directly rather than through set_adapter, which also flips requires_grad of the
            # adapter weights: switching branches must not change anything the user can see.
            layer._active_adapter = want

    def restore(self) -> None:
        if not self.enabled:
            return
        for layer in self._layers_of(self._model):
            if id(layer) in self._original:  # every layer, unless ``begin`` raised half-way
                layer._active_adapter = self._original[id(layer)]


def check_adapters(model: torch.nn.Module, names, what: str = "conditions") -> None:
    """Every adapter in ``names`` is loaded on ``model`` and unfused, or ``ValueError`` naming what is."""
    names = {a for a in names if a is not None}
    loaded = set(getattr(model, "peft_config", {}) or {})
    missing = sorted(names - loaded)
    if missing:
        have = sorted(loaded) or "none"
        raise ValueError(f"unknown LoRA adapter(s) {missing} in {what}: the transformer has {have}. Load one with "
                         "pipe.load_lora_weights(path, adapter_name=...)")
    if names and any(getattr(layer, "merged", False) for layer in _tuner_layers(model)):
        raise ValueError("a LoRA adapter is fused into the base weights (fuse_lora): per-condition adapters "
                         "need them unfused; call pipe.unfuse_lora() first")
