"""``fastgen.patch(pipe)``: one line, the same images, faster.

Patching replaces, per instance, the attention processors of a pipeline's denoiser (and of its
VAE if asked) with fastgen's, which wrap the upstream ones. Nothing global or class-level is
touched, so other pipelines in the process are unaffected, and ``unpatch`` puts the original
processor objects back: outputs are then bit-identical to a never-patched pipeline.

Patches stack per model: a patch applied over another one (another config, or a model-level patch
under a pipeline-level one) suspends it, and removing the newer patch (``handle.remove()``, or
leaving its ``with`` block) puts back what was there before it. A handle whose patch is no longer
on top removes its patch from beneath the newer one, never the newer one itself.

Step-invariant results (cross-attention K/V over the text, Wan's prompt projections) are reused
only inside a generation: a call of the patched pipeline, or ``with fastgen.generation(model):``
around a user's own denoising loop. Outside one, a patched model recomputes them at every call.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from fastgen._validity import capturing, version
from fastgen._warnings import warn_once
from fastgen.patching.config import PatchConfig
from fastgen.patching.kv_cache import StepCache
from fastgen.patching.processors.base import ATTN_STATE, FastgenProcessor
from fastgen.patching.registry import ARCHITECTURES, VAE, architecture_of, replacement_for, supported_models

_STATE = "_fastgen_state"  # model.__dict__: its top ModelPatch; pipeline.__dict__: its top PatchState
_HOOK_NAME = "fastgen_step_invariant"
_JOIN_HOOK_NAME = "fastgen_joined_context"


class PatchState:
    """What one ``patch`` call did: the config, the models it patched, the step-invariant cache."""

    def __init__(self, config: PatchConfig, target):
        self.config = config
        self.kv_cache = StepCache()
        self.model_patches: list[ModelPatch] = []
        self.pipeline = target if _is_pipeline(target) else None
        self.below: PatchState | None = None  # the pipeline-level patch this one suspended
        self.removed = False
        self._masks: dict[int, tuple] = {}  # id(mask) -> (weakref, key, lengths)

    @property
    def replaced(self) -> list[tuple]:
        """(attention module, original processor, fastgen processor, path) of every patched module."""
        return [r for mp in self.model_patches for r in mp.replaced]

    @property
    def models(self) -> list[torch.nn.Module]:
        return [mp.model for mp in self.model_patches]

    def key_lengths(self, mask, batch: int, n_keys: int):
        """``prefix_key_lengths`` of ``mask``, read once per mask tensor (every layer of a forward
        shares it). False (upstream attends with the mask) where the mask cannot be read on the host:
        while torch.compile traces or a CUDA graph is captured."""
        if mask is None:
            return None
        if torch.compiler.is_compiling() or capturing():
            return False
        key = (version(mask), mask.data_ptr(), batch, n_keys)
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


class ModelPatch:
    """What one patch does to one model: its processors and hooks, installed or suspended."""

    def __init__(self, model, arch, state: PatchState, below: ModelPatch | None):
        self.model, self.arch, self.state, self.below = model, arch, state, below
        self.replaced: list[tuple[torch.nn.Module, object, FastgenProcessor, str]] = []
        self.hooked: list[tuple[torch.nn.Module, str, bool]] = []  # (module, hook name, had a registry)

    def build(self) -> None:
        """Create a fastgen processor for every attention whose upstream processor fastgen knows."""
        left_alone: dict[str, int] = {}
        for path, module in self.model.named_modules():
            if not (hasattr(module, "processor") and hasattr(module, "set_processor")):
                continue
            old = module.processor
            new_cls = replacement_for(self.arch, old)
            if new_cls is None:
                name = type(old).__name__
                left_alone[name] = left_alone.get(name, 0) + 1
                continue
            self.replaced.append((module, old, new_cls(old, self.state.config, self.state), path))
        for name, n in left_alone.items():
            warn_once(f"patch:{type(self.model).__name__}:{name}",
                      f"fastgen.patch leaves {n} attention module(s) of {type(self.model).__name__} with processor "
                      f"{name} alone: fastgen does not accelerate it (they run as before)")

    def install(self) -> None:
        for module, old, new, _ in self.replaced:
            if module.processor is old:  # a processor the user set since then stays theirs
                module.set_processor(new)
            module.__dict__[ATTN_STATE] = self.state
        if self.state.config.cache_cross_attention_kv:
            self._hook()
        self.model.__dict__[_STATE] = self

    def uninstall(self) -> None:
        for module, old, new, _ in self.replaced:
            current = module.processor
            if current is new:
                module.set_processor(old)
            elif isinstance(current, FastgenProcessor) and current.state is None:
                # re-created by diffusers with type(processor)() (IP-Adapter load/unload): its own fresh
                # upstream processor is what diffusers would have put there
                module.set_processor(current.original)
            module.__dict__.pop(ATTN_STATE, None)
        self._unhook()

    def _hook(self) -> None:
        from diffusers.hooks import HookRegistry

        cache = self.state.kv_cache
        places = [(p, _HOOK_NAME, _step_invariant_hook(cache)) for p in self.arch.step_invariant]
        if self.arch.joined_context:
            places.append((self.arch.joined_context, _JOIN_HOOK_NAME, _joined_context_hook(cache)))
        for path, name, hook in places:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue
            if module is None:
                continue
            had = hasattr(module, "_diffusers_hook")
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
            self.hooked.append((module, name, had))

    def _unhook(self) -> None:
        for module, name, had in self.hooked:
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:  # leave no trace: diffusers re-binds forward as an instance attribute
                module.__dict__.pop("forward", None)
                if not had:
                    del module._diffusers_hook
        self.hooked.clear()


class PatchHandle:
    """Returned by ``fastgen.patch``: ``remove()``, or use as a context manager, to take the patch
    off and put back what was there before it.

    A handle returned for a patch that was already in place (``patch`` called again with the same
    config) does not own it: removing it changes nothing, so ``with fastgen.patch(pipe):`` on a
    patched pipeline leaves it patched on exit, as it found it.
    """

    def __init__(self, target, state: PatchState, owns: bool = True):
        self.target = target
        self.state = state
        self.owns = owns

    @property
    def config(self) -> PatchConfig:
        return self.state.config

    def remove(self) -> None:
        """Take this patch off. Where a newer patch sits on top of it, that one stays in force and
        this one is dropped from beneath it (nothing of it comes back when the newer one goes)."""
        if self.owns:
            _remove(self.state)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PatchHandle({type(self.target).__name__}, {self.state.summary()}, {self.config})"


def _step_invariant_hook(cache: StepCache):
    from diffusers.hooks import ModelHook

    class StepInvariantOutput(ModelHook):
        """Serves the output again, in one generation, while the input is the very same tensor."""

        def new_forward(self, module, *args, **kwargs):
            forward = self.fn_ref.original_forward
            if len(args) != 1 or kwargs or not torch.is_tensor(args[0]):
                return forward(*args, **kwargs)
            x = args[0]
            return cache.get(module, x, lambda: forward(x), (module,), slot="output")

    return StepInvariantOutput()


def _joined_context_hook(cache: StepCache):
    from diffusers.hooks import ModelHook

    class JoinedContext(ModelHook):
        """Joins (..., text, image) into (..., [image, text], None), as the model's forward would,
        and serves the joined tensor again while both parts are the very same tensors (Wan I2V)."""

        def new_forward(self, module, *args, **kwargs):
            out = self.fn_ref.original_forward(*args, **kwargs)
            if not isinstance(out, tuple) or len(out) < 2 or out[-1] is None:
                return out
            text, image = out[-2], out[-1]
            joined = cache.get(module, (image, text), lambda: torch.concat([image, text], dim=1), (), slot="joined")
            return (*out[:-2], joined, None)

    return JoinedContext()


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


def _top(obj):
    return getattr(obj, "__dict__", {}).get(_STATE)


def _pipeline_models(pipe) -> list[torch.nn.Module]:
    """The models a pipeline runs (its registered components that are modules), each once. Read from
    its config's keys, as ``components`` does, without the signature check that may raise there, and
    from the instance's own attributes (other config keys read as attributes are deprecated)."""
    seen, out = set(), []
    config = getattr(pipe, "config", None)
    names = [k for k in config.keys() if not k.startswith("_")] if config is not None else list(pipe.components)
    for value in (vars(pipe).get(name) for name in names):
        if isinstance(value, torch.nn.Module) and id(value) not in seen:
            seen.add(id(value))
            out.append(value)
    return out


# --- the pipeline call as a generation ----------------------------------------------------------

_SCOPED_CLASSES: dict[type, type] = {}


def _scoped_class(cls: type) -> type:
    """A subclass of the pipeline class whose ``__call__`` runs inside ``fastgen.generation(self)``,
    so a pipeline call is one generation, exceptions included. Set on the instance only (its
    ``__class__``), same name, restored by unpatch; other instances keep their class."""
    if cls.__dict__.get("_fastgen_scoped"):
        return cls
    scoped = _SCOPED_CLASSES.get(cls)
    if scoped is None:

        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            with generation(self):
                return cls.__call__(self, *args, **kwargs)

        scoped = type(cls.__name__, (cls,), {"__call__": __call__, "_fastgen_scoped": True, "__doc__": cls.__doc__,
                                             "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _SCOPED_CLASSES[cls] = scoped
    return scoped


def _unscoped(pipe) -> None:
    cls = type(pipe)
    if cls.__dict__.get("_fastgen_scoped"):
        pipe.__class__ = cls.__bases__[0]


@contextlib.contextmanager
def generation(target):
    """The scope of one generation: step-invariant results computed in it (cross-attention K/V over
    the text, Wan's prompt and image projections) are reused by every later call inside it, and
    dropped when it ends, exceptions included.

    A patched pipeline's call is a generation by itself; use this around your own denoising loop
    over a patched model (``with fastgen.generation(pipe.transformer): for t in ...: model(...)``).
    Inside it, the step-invariant inputs must not be changed behind PyTorch's back (through
    ``tensor.data`` or in place under ``torch.inference_mode``): those writes cannot be seen.
    Everything else is in the cache's key (the tensors' identity and in-place version, autocast,
    grad mode, LoRA scales and adapters, parameters). Scopes nest; an unpatched target makes it a
    no-op.

    Args:
        target: a pipeline (the models it runs) or a model.

    Raises:
        ValueError: if ``target`` is neither a pipeline nor a ``torch.nn.Module``.
    """
    if _is_pipeline(target):
        models = _pipeline_models(target)
    elif isinstance(target, torch.nn.Module):
        models = [target]
    else:
        raise ValueError(f"fastgen.generation takes a diffusers pipeline or a model, got {type(target).__name__}")
    caches = []
    for model in models:
        top = _top(model)
        if top is not None and all(top.state.kv_cache is not c for c in caches):
            caches.append(top.state.kv_cache)
    for cache in caches:
        cache.begin()
    try:
        yield
    finally:
        for cache in caches:
            cache.end()


# --- patch / unpatch --------------------------------------------------------------------------


def patch(target, config: PatchConfig | None = None, **options) -> PatchHandle:
    """Accelerate a diffusers pipeline or denoiser in place, exactly (to dtype rounding).

    Args:
        target: a pipeline (its ``transformer`` / ``unet`` is patched; text encoders and VAE are
            left alone unless ``include_vae``) or a denoiser model. Patching is per model instance:
            another pipeline sharing the model (``from_pipe``, ``components``) runs the patched model
            too, but only a patched pipeline's calls are generations (reusing step-invariant work).
        config: a ``PatchConfig``; keyword ``options`` override its fields.

    Returns:
        A ``PatchHandle`` (``.remove()``, or ``with fastgen.patch(pipe): ...``). Patching an already
        patched target with the same config returns a handle to that patch (one that does not own
        it); with another config the new patch goes on top of the old one, which comes back when
        the new one is removed.

    Raises:
        ValueError: for an unsupported pipeline or model (the message names the supported ones),
            unknown options or invalid values.
    """
    config = PatchConfig.build(config, **options)
    current = _current_state(target)
    if current is not None and current.config == config:
        return PatchHandle(target, current, owns=False)
    targets = _targets(target, config)
    state = PatchState(config, target)
    for model, arch in targets:
        below = _top(model)
        if below is not None:
            below.uninstall()
        mp = ModelPatch(model, arch, state, below)
        mp.build()
        mp.install()
        state.model_patches.append(mp)
    if state.pipeline is not None:
        state.below = _top(target)
        target.__dict__[_STATE] = state
        target.__class__ = _scoped_class(type(target))
    return PatchHandle(target, state)


def _current_state(target) -> PatchState | None:
    """The patch ``target`` itself is under, if it is whole and on top (for idempotent re-patching)."""
    top = _top(target)
    state = top.state if isinstance(top, ModelPatch) else top
    if state is None or state.removed or state.pipeline is not (target if _is_pipeline(target) else None):
        return None
    if any(_top(mp.model) is not mp for mp in state.model_patches):
        return None
    return state


def _remove(state: PatchState) -> None:
    if state.removed:
        return
    state.removed = True
    for mp in state.model_patches:
        top = _top(mp.model)
        if top is mp:
            mp.uninstall()
            if mp.below is not None:
                mp.below.install()
            else:
                mp.model.__dict__.pop(_STATE, None)
        else:  # a newer patch is on top: drop this one from beneath it
            node = top
            while node is not None and node.below is not mp:
                node = node.below
            if node is not None:
                node.below = mp.below
    state.kv_cache.clear()
    pipe = state.pipeline
    if pipe is not None:
        top = _top(pipe)
        if top is state:
            if state.below is not None:
                pipe.__dict__[_STATE] = state.below
            else:
                pipe.__dict__.pop(_STATE, None)
                _unscoped(pipe)
        else:
            node = top
            while node is not None and node.below is not state:
                node = node.below
            if node is not None:
                node.below = state.below


def unpatch(target) -> None:
    """Take every fastgen patch off ``target`` (a pipeline: the models it runs; or a model): the
    original processors come back, and outputs are bit-identical to a never-patched target."""
    models = _pipeline_models(target) if _is_pipeline(target) else [target]
    for model in models:
        while (top := _top(model)) is not None:
            _remove(top.state)
        _release_detached(model)
    if _is_pipeline(target):
        while (state := _top(target)) is not None:
            _remove(state)
        _unscoped(target)


def _release_detached(model) -> None:
    # Processors diffusers re-created with type(processor)() that outlived every patch.
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, FastgenProcessor) and proc.state is None and hasattr(module, "set_processor"):
            module.set_processor(proc.original)
        module.__dict__.pop(ATTN_STATE, None)


def is_patched(target) -> bool:
    """Whether fastgen's processors run in ``target`` right now: in a model, or in any model a
    pipeline runs (also when that model was patched on its own, or through another pipeline)."""
    models = _pipeline_models(target) if _is_pipeline(target) else [target]
    for model in models:
        if not isinstance(model, torch.nn.Module):
            continue
        for module in model.modules():
            if isinstance(getattr(module, "processor", None), FastgenProcessor) and ATTN_STATE in module.__dict__:
                return True
    return False


__all__ = ["PatchConfig", "PatchHandle", "generation", "is_patched", "patch", "unpatch"]
