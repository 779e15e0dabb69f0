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

import logging

import torch

from fastgen._warnings import warn_once
from fastgen.patching.config import PatchConfig
from fastgen.patching.generation import generation, is_pipeline, pipeline_models, scoped_class, unscoped
from fastgen.patching.patches import STATE, ModelPatch, PatchState, take_off, top
from fastgen.patching.processors.base import ATTN_STATE, FastgenProcessor
from fastgen.patching.registry import VAE, architecture_of, supported_models
from fastgen.patching.tune import tune


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

    @property
    def merging(self) -> str:
        """Where token merging (``tome=``) and downsampling (``todo=``) apply, per model: how many
        blocks at which level do what. Empty when the config merges nothing."""
        lines = [mp.merging.report() for mp in self.state.model_patches + self.state.shared if mp.merging is not None]
        return "\n".join(lines)

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
        merging = f", merging: {self.merging}" if self.merging else ""
        return f"PatchHandle({type(self.target).__name__}, {self.state.summary()}{merging}, {self.config})"


def _targets(obj, config: PatchConfig):
    """[(model, architecture)] to patch in ``obj`` (a pipeline or a denoiser)."""
    if is_pipeline(obj):
        models = []
        for model in pipeline_models(obj):  # every denoiser it runs (Wan 2.2 runs two)
            arch = architecture_of(model)
            if arch is not None and arch is not VAE:
                models.append((model, arch))
        if not models:
            denoiser = vars(obj).get("transformer")
            denoiser = denoiser if denoiser is not None else vars(obj).get("unet")
            raise ValueError(
                f"fastgen.patch does not support {type(obj).__name__} (its denoiser is "
                f"{type(denoiser).__name__ if denoiser is not None else 'missing'}); supported denoisers: "
                f"{', '.join(supported_models())}" + _compiled_hint(denoiser))
        vae = vars(obj).get("vae")
        if config.include_vae and vae is not None:
            if type(vae).__name__ in VAE.model_classes:
                models.append((vae, VAE))
            else:
                warn_once(f"patch:vae:{type(vae).__name__}",
                          f"fastgen.patch(include_vae=True) leaves {type(vae).__name__} alone: fastgen patches the "
                          f"attention of {', '.join(VAE.model_classes)} only")
        return models
    arch = architecture_of(obj)  # a denoiser, or a VAE patched on its own
    if arch is None:
        raise ValueError(
            f"fastgen.patch takes a diffusers pipeline or a denoiser model ({', '.join(supported_models())}), "
            f"got {type(obj).__name__}" + _compiled_hint(obj))
    return [(obj, arch)]


def _compiled_hint(obj) -> str:
    inner = getattr(obj, "_orig_mod", None)
    if inner is None or architecture_of(inner) is None:
        return ""
    return (f". It wraps a {type(inner).__name__} compiled with torch.compile: patch the model before "
            "compiling it (or compile in place with model.compile())")


def patch(target, config: PatchConfig | None = None, **options) -> PatchHandle:
    """Accelerate a diffusers pipeline or denoiser in place, exactly (to dtype rounding).

    Args:
        target: a pipeline (every denoiser it runs is patched; text encoders and VAE are left alone
            unless ``include_vae``) or a denoiser model. Patching is per model instance: another
            pipeline sharing the model (``from_pipe``, ``components``) runs the patched model too, but
            only a patched pipeline's calls are generations (reusing step-invariant work).
        config: a ``PatchConfig``; keyword ``options`` override its fields, e.g. the approximate
            ``tome=0.5`` (token merging, ``fastgen.ToMeConfig``) and ``todo=2`` (K/V downsampling,
            ``fastgen.ToDoConfig``); ``handle.merging`` then says which blocks merge.

    Returns:
        A ``PatchHandle`` (``.remove()``, or ``with fastgen.patch(pipe): ...``). A model already
        running a patch of the same config is not patched again: patching the same target twice
        returns a handle to the patch in place (one that does not own it), and a pipeline sharing
        a patched model relies on that model's patch. Another config goes on top of the patch in
        place, which comes back when the new one is removed.

    Raises:
        ValueError: for an unsupported pipeline or model (the message names the supported ones),
            unknown options or invalid values.
    """
    config = PatchConfig.build(config, **options)
    current = _current_state(target)
    if current is not None and current.config == config:
        return PatchHandle(target, current, owns=False)
    targets = _targets(target, config)
    state = PatchState(config, target if is_pipeline(target) else None)
    for model, arch in targets:
        below = top(model)
        if below is not None and below.state.config == config:
            state.shared.append(below)  # already runs this config: nothing to stack
            continue
        if below is not None:
            below.uninstall()
        mp = ModelPatch(model, arch, state, below)
        mp.build()
        mp.install()
        state.model_patches.append(mp)
    if is_pipeline(target):
        state.below = top(target)
        target.__dict__[STATE] = state
        target.__class__ = scoped_class(type(target))
    handle = PatchHandle(target, state)
    if handle.merging:
        logging.getLogger("fastgen").info("fastgen.patch: token merging in %s", handle.merging)
    return handle


def _current_state(target) -> PatchState | None:
    """The patch ``target`` itself is under, if it is whole and on top (for idempotent re-patching)."""
    if is_pipeline(target):
        state = top(target)
        if state is None or state.removed:
            return None
        if any(top(mp.model) is not mp for mp in state.model_patches + state.shared):
            return None
        return state
    mp = top(target) if isinstance(target, torch.nn.Module) else None
    return mp.state if mp is not None else None


def _remove(state: PatchState) -> None:
    if state.removed:
        return
    state.removed = True
    for mp in state.model_patches:
        current = top(mp.model)
        if current is mp:
            mp.uninstall()
            if mp.below is not None:
                mp.below.install()
            else:
                mp.model.__dict__.pop(STATE, None)
        else:  # a newer patch is on top: drop this one from beneath it
            node = current
            while node is not None and node.below is not mp:
                node = node.below
            if node is not None:
                node.below = mp.below
    state.kv_cache.clear()
    pipe = state.pipeline
    if pipe is not None:
        current = top(pipe)
        if current is state:
            if state.below is not None:
                pipe.__dict__[STATE] = state.below
            else:
                pipe.__dict__.pop(STATE, None)
                unscoped(pipe)
        else:
            node = current
            while node is not None and node.below is not state:
                node = node.below
            if node is not None:
                node.below = state.below


def unpatch(target) -> None:
    """Take every fastgen patch off ``target``: a model (that model only), or a pipeline (its own
    patches and every patch on the models it runs). The original processors come back, and outputs
    are bit-identical to a never-patched target.

    Raises:
        ValueError: if ``target`` is neither a pipeline nor a ``torch.nn.Module``.
    """
    if is_pipeline(target):
        while (state := top(target)) is not None:
            _remove(state)
        unscoped(target)
        models = pipeline_models(target)
    elif isinstance(target, torch.nn.Module):
        models = [target]
    else:
        raise ValueError(f"fastgen.unpatch takes a diffusers pipeline or a model, got {type(target).__name__}")
    for model in models:
        take_off(model)


def is_patched(target) -> bool:
    """Whether fastgen's processors run in ``target`` right now: in a model, or in any model a
    pipeline runs (also when that model was patched on its own, or through another pipeline)."""
    models = pipeline_models(target) if is_pipeline(target) else [target]
    for model in models:
        if not isinstance(model, torch.nn.Module):
            continue
        for module in model.modules():
            proc = getattr(module, "processor", None)
            state = module.__dict__.get(ATTN_STATE)
            if isinstance(proc, FastgenProcessor) and state is not None and not state.removed:
                return True
    return False


__all__ = ["PatchConfig", "PatchHandle", "generation", "is_patched", "patch", "tune", "unpatch"]
