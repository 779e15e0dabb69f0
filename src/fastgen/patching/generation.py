"""The scope of one generation, in which step-invariant results may be reused.

A patched pipeline's call is one generation: its instance gets a subclass of its own class (same
name, same signature) whose ``__call__`` runs inside ``generation(self)``. Around a user's own loop
over a patched model, ``with fastgen.generation(model):`` is the generation.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from fastgen.patching.kv_cache import StepCache
from fastgen.patching.patches import top


def is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and isinstance(getattr(obj, "components", None), dict)


def pipeline_models(pipe) -> list[torch.nn.Module]:
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


def _models(target) -> list[torch.nn.Module]:
    if is_pipeline(target):
        return pipeline_models(target)
    if isinstance(target, torch.nn.Module):
        return [target]
    raise ValueError(f"expected a diffusers pipeline or a model, got {type(target).__name__}")


def _caches(models) -> list[StepCache]:
    caches = []
    for model in models:
        mp = top(model)
        if mp is not None and all(mp.state.kv_cache is not c for c in caches):
            caches.append(mp.state.kv_cache)
    return caches


@contextlib.contextmanager
def generation(target, generator=None):
    """The scope of one generation: step-invariant results computed in it (cross-attention K/V over
    the text, Wan's prompt and image projections) are reused by every later call inside it, and
    dropped when it ends, exceptions included.

    A patched pipeline's call is a generation by itself; use this around your own denoising loop
    over a patched model (``with fastgen.generation(pipe.transformer): for t in ...: model(...)``).
    Inside it, the step-invariant inputs must not be changed behind PyTorch's back (through
    ``tensor.data``, or in place under ``torch.inference_mode``): those writes cannot be seen.
    Everything else is in the cache's key (the tensors' identity and in-place version, autocast,
    grad mode, LoRA scales and adapters, parameters). Scopes nest; an unpatched target makes it a
    no-op. Processors diffusers put back in place of fastgen's (unloading an IP-Adapter) are
    wrapped again when a generation starts.

    Args:
        target: a pipeline (the models it runs) or a model.
        generator: the generation's ``torch.Generator`` (or list of them), whose seed seeds token
            merging's random dst maps when ``ToMeConfig.seed`` is None; never drawn from.

    Raises:
        ValueError: if ``target`` is neither a pipeline nor a ``torch.nn.Module``.
    """
    models = _models(target)
    for model in models:
        mp = top(model)
        if mp is not None:
            mp.heal()
    caches = _caches(models)
    for cache in caches:
        cache.begin(generator)
    try:
        yield
    finally:
        for cache in caches:
            cache.end()


# --- the pipeline call as a generation ----------------------------------------------------------

_SCOPED_CLASSES: dict[type, type] = {}


def scoped_class(cls: type) -> type:
    """A subclass of the pipeline class whose ``__call__`` runs inside ``generation(self)``, so a
    pipeline call is one generation, exceptions included. Set on the instance only (its
    ``__class__``), same name, restored by unpatch; other instances keep their class. Pickled (and
    deep-copied) as the original class."""
    if cls.__dict__.get("_fastgen_scoped"):
        return cls
    scoped = _SCOPED_CLASSES.get(cls)
    if scoped is None:
        call = _call_of(cls)

        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            if kwargs.get("callback_on_step_end") is not None:
                _forget_after_callbacks(self, kwargs)
            with generation(self, kwargs.get("generator")):
                return call(self, *args, **kwargs)

        def __reduce_ex__(self, protocol):
            # as an instance of the original class, without the pipeline-level patch (its models keep theirs)
            from fastgen.patching.patches import STATE

            return _new_instance, (cls,), {k: v for k, v in vars(self).items() if k != STATE}

        scoped = type(cls.__name__, (cls,), {"__call__": __call__, "__reduce_ex__": __reduce_ex__,
                                             "_fastgen_scoped": True, "__doc__": cls.__doc__,
                                             "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _SCOPED_CLASSES[cls] = scoped
    return scoped


def _call_of(cls: type):
    # FramePack's pipeline runs through fastgen's section loop (same arguments, same output; bounded
    # memory, step-invariant history reused): fastgen.framepack.sampler
    if any(c.__name__ == "HunyuanVideoFramepackPipeline" and c.__module__.startswith("diffusers.")
           for c in cls.__mro__):
        from fastgen.framepack.sampler import pipeline_call

        return pipeline_call
    return cls.__call__


def _new_instance(cls):
    return cls.__new__(cls)


def unscoped(pipe) -> None:
    cls = type(pipe)
    if cls.__dict__.get("_fastgen_scoped"):
        pipe.__class__ = cls.__bases__[0]


def _forget_after_callbacks(pipe, kwargs: dict) -> None:
    # A step callback may rewrite the prompt embeddings in place. Under torch.inference_mode they
    # are inference tensors, which keep no version counter to show it: after each callback, entries
    # computed from such tensors go (normal tensors' in-place writes show in their version).
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    callback = kwargs["callback_on_step_end"]
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        # the pipeline reads the tensor inputs from such a callback object: hand them over as it would
        kwargs["callback_on_step_end_tensor_inputs"] = callback.tensor_inputs

    @functools.wraps(callback)
    def forgetting(*args, **kw):
        out = callback(*args, **kw)
        for cache in _caches(pipeline_models(pipe)):
            cache.forget_unversioned()
        return out

    kwargs["callback_on_step_end"] = forgetting
