"""Exact reuse of cross-attention K/V over the text embeddings across denoising steps.

In a UNet or Wan cross-attention, ``to_k(text)`` and ``to_v(text)`` are the same at every step of
one generation: the pipeline passes the very same embeddings tensor each step. The cache keeps one
entry per attention module, valid only for *that tensor object* (held by weak reference, so a
freed tensor whose memory is reused can never match), at the same in-place version, shape, dtype
and device, with the same projection parameters (identity and version) and LoRA state. Anything
else recomputes. Entries die with their embeddings, at the end of a generation, and on unpatch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


def _module_state(m: torch.nn.Module) -> tuple:
    # Parameters by identity and in-place version, plus the PEFT knobs that change a LoRA layer's
    # output without touching a parameter (scale, active adapters, merged, disabled).
    params = tuple((id(p), p._version) for p in m.parameters())
    scaling = getattr(m, "scaling", None)
    peft = (
        tuple(sorted(scaling.items())) if isinstance(scaling, dict) else None,
        tuple(getattr(m, "active_adapters", ()) or ()),
        getattr(m, "merged", None),
        getattr(m, "disable_adapters", None),
    )
    return (id(m), params, peft)


class _Entry:
    __slots__ = ("ref", "key", "k", "v")

    def __init__(self, ref, key, k, v):
        self.ref, self.key, self.k, self.v = ref, key, k, v


class CrossKVCache:
    """K/V of cross-attention per attention module, for one generation at a time."""

    def __init__(self):
        self._entries: dict[tuple[int, str, int], _Entry] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        module: torch.nn.Module,
        context: torch.Tensor,
        compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        projections: tuple[torch.nn.Module, ...],
        slot: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``compute()`` or its cached result for this module (and ``slot``, when one module caches
        several K/V pairs) and this very ``context`` tensor. ``projections``: the modules whose
        parameters and LoRA state ``compute`` depends on."""
        if torch.compiler.is_compiling() or context.requires_grad:
            # Under torch.compile the cache would be traced as Python state; with grad it would keep
            # graphs alive. Both compute afresh, which is what the unpatched model does.
            return compute()
        key = (
            context._version, tuple(context.shape), context.stride(), context.dtype, context.device,
            torch.is_autocast_enabled(), tuple(_module_state(p) for p in projections),
        )
        # One entry per (module, slot, context): pipelines that run CFG as two calls (Wan) alternate
        # between two embeddings tensors, and both stay cached.
        mid = (id(module), slot, id(context))
        entry = self._entries.get(mid)
        if entry is not None and entry.ref() is context and entry.key == key:
            self.hits += 1
            return entry.k, entry.v
        self.misses += 1
        k, v = compute()
        entries = self._entries

        def forget(_ref, mid=mid):
            e = entries.get(mid)
            if e is not None and e.ref is _ref:
                del entries[mid]

        self._entries[mid] = _Entry(weakref.ref(context, forget), key, k, v)
        return k, v

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in (e.k, e.v) if t is not None)
