"""What a patch is: ``PatchState`` (one ``fastgen.patch`` call: its config, the models it patched,
its step-invariant cache) and ``ModelPatch`` (what that call does to one model: processors and
hooks, installed or suspended beneath a newer patch).

Patches stack per model: ``model.__dict__[STATE]`` holds the top ``ModelPatch``, each with the one
it suspended (``below``); a pipeline's ``__dict__[STATE]`` holds its top ``PatchState`` likewise.
"""

from __future__ import annotations

import functools
import weakref

import torch

from fastgen._hooks import remove_diffusers_hook
from fastgen._validity import capturing, version
from fastgen._warnings import warn_once
from fastgen.patching.config import PatchConfig
from fastgen.patching.kv_cache import StepCache
from fastgen.patching.processors.base import ATTN_STATE, FastgenProcessor
from fastgen.patching.registry import replacement_for

STATE = "_fastgen_state"
_HOOK_NAME = "fastgen_step_invariant"
_JOIN_HOOK_NAME = "fastgen_joined_context"


def top(obj):
    """The top patch of a model (a ``ModelPatch``) or of a pipeline (a ``PatchState``), or None."""
    return getattr(obj, "__dict__", {}).get(STATE)


class PatchState:
    """What one ``patch`` call did: the config, the models it patched (``model_patches``; models
    already running a patch of the same config are shared, not patched again), the cache."""

    def __init__(self, config: PatchConfig, pipeline=None):
        self.config = config
        self.kv_cache = StepCache()
        self.model_patches: list[ModelPatch] = []
        self.shared: list[ModelPatch] = []  # other patches' model patches this one relies on
        # weakly: a model's patch must not keep its pipeline alive, nor drag it into a deepcopy
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.below: PatchState | None = None  # the pipeline-level patch this one suspended
        self.removed = False
        self._masks: dict[int, tuple] = {}  # id(mask) -> (weakref, key, lengths)

    @property
    def pipeline(self):
        return self._pipeline() if self._pipeline is not None else None

    def __getstate__(self):
        # Pickled with a model: the config and the structure, not the pipeline or cached tensors.
        state = dict(self.__dict__, _pipeline=None, _masks={})
        state["kv_cache"] = StepCache()
        return state

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
        self.left_alone: list[tuple[torch.nn.Module, str]] = []  # attentions running processors fastgen skips
        self.hooked: list[tuple[torch.nn.Module, str, bool]] = []  # (module, hook name, had a registry)
        self.merging = None  # fastgen.merging.runtime.Merging when the config merges tokens
        self._merge_places: list[tuple] = []  # (module, hook with .pre / .post)
        self._merge_handles: list = []
        self.packing = None  # fastgen.framepack.packing.HistoryPacking (FramePack transformers)

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
                self.left_alone.append((module, path))
                continue
            self.replaced.append((module, old, new_cls(old, self.state.config, self.state), path))
        from fastgen.merging.apply import merging_places

        self.merging, self._merge_places = merging_places(self.model, self.arch, self.state)
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
        if self.arch.history_packing:
            from fastgen.framepack.packing import HistoryPacking

            self.packing = HistoryPacking(self.model, self.state.kv_cache, self.state.config.cache_cross_attention_kv)
            self.packing.install()
        for module, hook in self._merge_places:  # PyTorch's hooks: ``forward`` itself stays untouched
            if hasattr(hook, "pre"):
                self._merge_handles.append(module.register_forward_pre_hook(hook.pre, with_kwargs=True))
            if hasattr(hook, "post"):
                self._merge_handles.append(module.register_forward_hook(hook.post))
        if hasattr(type(self.model), "set_default_attn_processor"):
            # diffusers' version refuses processors that are not its own classes: take fastgen off first
            self.model.__dict__["set_default_attn_processor"] = functools.partial(_set_default_attn_processor,
                                                                                 self.model)
        self.model.__dict__[STATE] = self

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
        if self.packing is not None:
            self.packing.uninstall()
            self.packing = None
        for handle in self._merge_handles:
            handle.remove()
        self._merge_handles.clear()
        self.model.__dict__.pop("set_default_attn_processor", None)

    def heal(self) -> None:
        """Wrap the upstream processors diffusers put in place of fastgen's, or of processors fastgen
        left alone (unloading an IP-Adapter sets fresh ``AttnProcessor2_0()`` objects on the
        cross-attentions): a patched model stays patched. Processors fastgen does not know stay."""
        for i, (module, old, new, path) in enumerate(self.replaced):
            fresh = self._wrap_new(module)
            if fresh is not None and module.processor is not old:
                self.replaced[i] = (module, fresh.original, fresh, path)
                module.set_processor(fresh)
        for module, path in list(self.left_alone):
            fresh = self._wrap_new(module)
            if fresh is not None:
                self.left_alone.remove((module, path))
                self.replaced.append((module, fresh.original, fresh, path))
                module.set_processor(fresh)
                module.__dict__[ATTN_STATE] = self.state

    def _wrap_new(self, module):
        current = module.processor
        if isinstance(current, FastgenProcessor) or any(current is new for m, _, new, _ in self.replaced if m is module):
            return None
        cls = replacement_for(self.arch, current)
        return cls(current, self.state.config, self.state) if cls is not None else None

    def _hook(self) -> None:
        from diffusers.hooks import HookRegistry

        cache = self.state.kv_cache
        places = [(p, _HOOK_NAME, StepInvariantOutput(cache)) for p in self.arch.step_invariant]
        if self.arch.joined_context:
            places.append((self.arch.joined_context, _JOIN_HOOK_NAME, JoinedContext(cache)))
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
            remove_diffusers_hook(module, name, had)
        self.hooked.clear()


def take_off(model) -> None:
    """Every fastgen patch off ``model`` (only this model: the patches' other models keep theirs),
    and processors diffusers re-created from fastgen's back to upstream ones."""
    mp = top(model)
    if mp is not None:
        mp.uninstall()
    while mp is not None:  # nothing cached for this model outlives its patches
        mp.state.kv_cache.clear()
        mp = mp.below
    model.__dict__.pop(STATE, None)
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, FastgenProcessor) and hasattr(module, "set_processor"):
            module.set_processor(proc.original)
        module.__dict__.pop(ATTN_STATE, None)


def _set_default_attn_processor(model, *args, **kwargs):
    take_off(model)
    return type(model).set_default_attn_processor(model, *args, **kwargs)


# --- hooks: step-invariant outputs -------------------------------------------------------------


def _model_hook_base():
    from diffusers.hooks import ModelHook

    return ModelHook


class StepInvariantOutput(_model_hook_base()):
    """Serves a module's output again, in one generation, while its input is the very same tensor."""

    def __init__(self, cache: StepCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if len(args) != 1 or kwargs or not torch.is_tensor(args[0]):
            return forward(*args, **kwargs)
        x = args[0]
        return self.cache.get(module, x, lambda: forward(x), (module,), slot="output")


class JoinedContext(_model_hook_base()):
    """Joins (..., text, image) into (..., [image, text], None), as the model's forward would, and
    serves the joined tensor again while both parts are the very same tensors (Wan I2V)."""

    def __init__(self, cache: StepCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        if not isinstance(out, tuple) or len(out) < 2 or out[-1] is None:
            return out
        text, image = out[-2], out[-1]
        joined = self.cache.get(module, (image, text), lambda: torch.concat([image, text], dim=1), (), slot="joined")
        return (*out[:-2], joined, None)
