"""``fastgen.patch(pipe)``: one line, the same images, faster.

Patching replaces, per instance, the attention processors of a pipeline's denoiser (and of its
VAE if asked) with fastgen's, which wrap the upstream ones. Nothing global or class-level is
touched, so other pipelines in the process are unaffected, and ``unpatch`` puts the original
processor objects back: outputs are then bit-identical to a never-patched pipeline.
"""

from __future__ import annotations

import weakref

import torch

from fastgen._warnings import warn_once
from fastgen.patching.config import PatchConfig
from fastgen.patching.kv_cache import CrossKVCache
from fastgen.patching.processors.base import FastgenProcessor
from fastgen.patching.registry import ARCHITECTURES, VAE, architecture_of, replacement_for, supported_models

_STATE = "_fastgen_state"
_HOOK_NAME = "fastgen_step_invariant"
_HOOK = "maybe_free_model_hooks"  # every diffusers pipeline calls it when a generation ends


class PatchState:
    """What one ``patch`` call did: the config, the replaced processors, the K/V cache."""

    def __init__(self, config: PatchConfig):
        self.config = config
        self.kv_cache = CrossKVCache()
        self.replaced: list[tuple[torch.nn.Module, object, FastgenProcessor, str]] = []
        self.models: list[torch.nn.Module] = []
        self.hooked: list[tuple[torch.nn.Module, bool]] = []  # (module, had a diffusers hook registry)
        self.pipeline = None
        self._masks: dict[int, tuple] = {}  # id(mask) -> (weakref, key, lengths)

    def key_lengths(self, mask, batch: int, n_keys: int):
        """``prefix_key_lengths`` of ``mask``, read once per mask tensor (every layer shares it)."""
        if mask is None:
            return None
        key = (mask._version, batch, n_keys)
        hit = self._masks.get(id(mask))
        if hit is not None and hit[0]() is mask and hit[1] == key:
            return hit[2]
        from fastgen.patching.core import prefix_key_lengths

        lengths = prefix_key_lengths(mask, batch, n_keys)
        masks, mid = self._masks, id(mask)
        self._masks[mid] = (weakref.ref(mask, lambda r: masks.pop(mid, None)), key, lengths)
        return lengths

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, new, _ in self.replaced:
            out[type(new).__name__] = out.get(type(new).__name__, 0) + 1
        return out


class PatchHandle:
    """Returned by ``fastgen.patch``: ``remove()`` or use as a context manager to unpatch."""

    def __init__(self, target, state: PatchState):
        self.target = target
        self.state = state

    @property
    def config(self) -> PatchConfig:
        return self.state.config

    def remove(self) -> None:
        unpatch(self.target)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PatchHandle({type(self.target).__name__}, {self.state.summary()}, {self.config})"


def _step_invariant_hook(cache: CrossKVCache):
    from diffusers.hooks import ModelHook

    class StepInvariantOutput(ModelHook):
        """Returns the cached output while the module's input is the very same tensor (exact)."""

        def new_forward(self, module, *args, **kwargs):
            forward = self.fn_ref.original_forward
            if len(args) != 1 or kwargs or not torch.is_tensor(args[0]):
                return forward(*args, **kwargs)
            x = args[0]
            return cache.get(module, x, lambda: (forward(x), None), (module,), slot="output")[0]

    return StepInvariantOutput()


def _hook_step_invariant(model, arch, state: PatchState) -> None:
    from diffusers.hooks import HookRegistry

    for path in arch.step_invariant:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if module is None:
            continue
        had = hasattr(module, "_diffusers_hook")
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_step_invariant_hook(state.kv_cache), _HOOK_NAME)
        state.hooked.append((module, had))


def _unhook(state: PatchState) -> None:
    for module, had in state.hooked:
        registry = module._diffusers_hook
        registry.remove_hook(_HOOK_NAME, recurse=False)
        if not registry.hooks:  # leave no trace: diffusers re-binds forward as an instance attribute
            module.__dict__.pop("forward", None)
            if not had:
                del module._diffusers_hook
    state.hooked.clear()


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and isinstance(getattr(obj, "components", None), dict)


def _targets(obj, config: PatchConfig):
    """[(model, architecture)] to patch in ``obj`` (a pipeline or a denoiser)."""
    if _is_pipeline(obj):
        models = []
        for arch in ARCHITECTURES:
            model = getattr(obj, arch.pipeline_attr, None)
            if model is not None and type(model).__name__ in arch.model_classes:
                models.append((model, arch))
                break
        if not models:
            denoiser = getattr(obj, "transformer", None) or getattr(obj, "unet", None)
            raise ValueError(
                f"fastgen.patch does not support {type(obj).__name__} (its denoiser is "
                f"{type(denoiser).__name__ if denoiser is not None else 'missing'}); supported denoisers: "
                f"{', '.join(supported_models())}"
            )
        vae = getattr(obj, "vae", None)
        if config.include_vae and vae is not None and type(vae).__name__ in VAE.model_classes:
            models.append((vae, VAE))
        return models
    arch = architecture_of(obj)  # a denoiser, or a VAE patched on its own
    if arch is None:
        raise ValueError(
            f"fastgen.patch takes a diffusers pipeline or a denoiser model ({', '.join(supported_models())}), "
            f"got {type(obj).__name__}"
        )
    return [(obj, arch)]


def _state_of(obj) -> PatchState | None:
    return getattr(obj, "__dict__", {}).get(_STATE)


def patch(target, config: PatchConfig | None = None, **options) -> PatchHandle:
    """Accelerate a diffusers pipeline or denoiser in place, exactly (to dtype rounding).

    Args:
        target: a pipeline (its ``transformer`` / ``unet`` is patched; text encoders and VAE are
            left alone unless ``include_vae``) or a denoiser model.
        config: a ``PatchConfig``; keyword ``options`` override its fields.

    Returns:
        A ``PatchHandle`` (``.remove()``, or ``with fastgen.patch(pipe): ...``). Patching an
        already patched target with the same config returns the existing handle; with another
        config it re-patches.

    Raises:
        ValueError: for an unsupported pipeline or model (the message names the supported ones),
            unknown options or invalid values.
    """
    config = PatchConfig.build(config, **options)
    state = _state_of(target)
    if state is not None:
        if state.config == config and is_patched(target):
            return PatchHandle(target, state)
        unpatch(target)
    targets = _targets(target, config)
    state = PatchState(config)
    for model, arch in targets:
        if _state_of(model) is not None:  # patched on its own before: start from its originals
            unpatch(model)
        left_alone: dict[str, int] = {}
        for path, module in model.named_modules():
            if not (hasattr(module, "processor") and hasattr(module, "set_processor")):
                continue
            old = module.processor
            new_cls = replacement_for(arch, old)
            if new_cls is None:
                name = type(old).__name__
                left_alone[name] = left_alone.get(name, 0) + 1
                continue
            new = new_cls(old, config, state)
            module.set_processor(new)
            state.replaced.append((module, old, new, path))
        for name, n in left_alone.items():
            warn_once(f"patch:{type(model).__name__}:{name}",
                      f"fastgen.patch leaves {n} attention module(s) of {type(model).__name__} with processor "
                      f"{name} alone: fastgen does not accelerate it (they run as before)")
        if config.cache_cross_attention_kv:
            _hook_step_invariant(model, arch, state)
        model.__dict__[_STATE] = state
        state.models.append(model)
    if _is_pipeline(target):
        state.pipeline = target
        original_hook = getattr(target, _HOOK, None)
        if original_hook is not None:

            def end_of_generation(*args, **kwargs):
                state.kv_cache.clear()  # a generation's cached K/V never outlive it
                return original_hook(*args, **kwargs)

            target.__dict__[_HOOK] = end_of_generation
        target.__dict__[_STATE] = state
    return PatchHandle(target, state)


def unpatch(target) -> None:
    """Put back the original processors: outputs are bit-identical to a never-patched target."""
    state = _state_of(target)
    if state is None:
        return
    for module, old, new, _ in state.replaced:
        if module.processor is new:  # a processor the user set since then stays theirs
            module.set_processor(old)
    state.replaced.clear()
    _unhook(state)
    state.kv_cache.clear()
    for model in state.models:
        model.__dict__.pop(_STATE, None)
    if state.pipeline is not None:
        state.pipeline.__dict__.pop(_HOOK, None)
        state.pipeline.__dict__.pop(_STATE, None)
    target.__dict__.pop(_STATE, None)


def is_patched(target) -> bool:
    """Whether fastgen's processors are in place in ``target`` (a pipeline or model) right now."""
    state = _state_of(target)
    return state is not None and any(module.processor is new for module, _, new, _ in state.replaced)


__all__ = ["PatchConfig", "PatchHandle", "is_patched", "patch", "unpatch"]
