"""What fastgen must respect of the hooks others put on a model's modules: accelerate's
(``module._hf_hook``: ``enable_model_cpu_offload``, sequential offload, device maps) and diffusers'
(``module._diffusers_hook``, a ``HookRegistry``: group offloading, caches).

``places_own_weights``: a module whose weights a hook puts in place must be called, never read.

``call_as_forward``: fastgen's branch forward where a module's own forward would run, inside that
forward's hooks. The condition pipeline and KV-Edit compute the Flux transformer (and each of its
blocks) with their own code instead of calling ``transformer(...)`` / ``block(...)``: the branches
and cached K/V need it. Offloading wraps exactly those forwards: accelerate's ``enable_model_cpu_offload``
moves the transformer to the GPU in a pre-forward hook (``module._hf_hook``), and diffusers'
block-level group offloading onloads each block, and the transformer's other modules, in
pre-forward hooks of its ``HookRegistry`` (``module._diffusers_hook``). ``call_as_forward`` runs
those pre- and post-forward hooks around fastgen's code, as the wrapped forward would have run
them. Leaf modules (linear layers, norms) are still called as modules, so leaf-level hooks
(sequential offload, leaf-level group offload) fire by themselves.

Hooks that *replace* a forward (diffusers' caches such as FirstBlockCache, layer skipping) cannot
be composed this way: they would silently not apply, so they raise instead.
"""

from __future__ import annotations

from collections.abc import Callable

_HOOK_ATTRS = ("_hf_hook", "_diffusers_hook")


def places_own_weights(module) -> bool:
    """Whether a hook puts ``module``'s weights in place when it runs (accelerate's sequential
    offload keeps them on the meta device in between; diffusers' leaf-level group offload keeps them
    on the CPU, or onloads them on a side stream that its pre-forward hook waits for). Such a module
    must be called, never read: fastgen then runs it unfused."""
    if module is None:
        return False
    return bool(module._forward_pre_hooks) or any(getattr(module, a, None) is not None for a in _HOOK_ATTRS)


def _hooks(module, skip: str | None) -> list:
    """The hooks wrapping ``module``'s forward whose pre/post parts fastgen runs, outermost first."""
    hooks = []
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        for name in reversed(registry._hook_order):  # the last registered wraps the others
            if name == skip:
                continue
            hook = registry.hooks[name]
            if hasattr(hook, "new_forward"):
                raise ValueError(
                    f"{type(module).__name__} has the diffusers hook {name!r} ({type(hook).__name__}), which replaces its "
                    "forward; fastgen's condition/KV-Edit forward cannot run under it. Remove it first (e.g. "
                    "transformer.disable_cache())")
            hooks.append(hook)
    accelerate_hook = getattr(module, "_hf_hook", None)
    if accelerate_hook is not None:
        # Its place relative to the registry's hooks is not recorded anywhere; taken as innermost.
        # Placement hooks (offload, device maps) each move their own tensors, so their order is moot.
        hooks.append(accelerate_hook)
    return hooks


def call_as_forward(module, fn: Callable, *args, skip: str | None = None, **kwargs):
    """``fn(*args, **kwargs)`` in place of ``module``'s forward, inside the pre- and post-forward
    hooks that wrap that forward (``skip``: the name of the caller's own registry hook).

    Pre-forward hooks may move the inputs (offloading sends them to the execution device); ``fn``
    gets what they return, and its output goes through the post-forward hooks.
    """
    hooks = _hooks(module, skip)
    for hook in hooks:
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
    out = fn(*args, **kwargs)
    for hook in reversed(hooks):
        out = hook.post_forward(module, out)
    return out


def remove_diffusers_hook(module, name: str, had_registry: bool) -> None:
    """Take fastgen's diffusers hook ``name`` off ``module`` and leave no trace: diffusers re-binds
    ``forward`` as an instance attribute while hooks are registered, and the registry itself goes
    when fastgen created it (``had_registry`` False) and nothing else is registered there."""
    registry = module._diffusers_hook
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        module.__dict__.pop("forward", None)
        if not had_registry:
            del module._diffusers_hook
