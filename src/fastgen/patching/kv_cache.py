"""Exact reuse of step-invariant results (cross-attention K/V over the text, Wan's prompt and image
projections) across the denoising steps of one generation.

In a UNet or Wan cross-attention, ``to_k(text)`` and ``to_v(text)`` are the same at every step of
one generation: the pipeline passes the very same embeddings tensor each step. ``StepCache`` keeps
one entry per (module, slot, input tensors), and serves it again only

- inside a generation (``open``: a pipeline call, or ``fastgen.generation(model)``); outside one it
  neither serves nor stores, so a model called on its own computes exactly what upstream computes;
- while every input is the very same tensor object (held by weak reference, so a freed tensor
  whose memory is reused can never match), at the same in-place version, shape, strides, dtype,
  device and storage;
- under the same ambient state (grad / inference mode, autocast enabled and dtype per device type)
  and the same state of every module the computation runs (parameters, LoRA scales, active,
  merged and disabled adapters: ``fastgen._validity``);
- when reuse is allowed at all: never while ``torch.compile`` traces, during CUDA-graph capture,
  with autograd on, or with dropout in training mode.

Entries die with their inputs, when the generation ends, and on unpatch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

from fastgen._validity import ambient_key, modules_key, tensor_key, why_no_reuse
from fastgen.ops.portable import is_portable


class _Entry:
    __slots__ = ("refs", "key", "value")

    def __init__(self, refs, key, value):
        self.refs, self.key, self.value = refs, key, value


class StepCache:
    """Step-invariant results per module, for one generation at a time."""

    def __init__(self):
        self._entries: dict[tuple, _Entry] = {}
        self._depth = 0
        self.generations = 0  # outermost generations begun so far (per-generation state keys on it)
        self.generator = None  # the generator the running pipeline call was given, if any
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    # --- the generation scope -----------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Whether a generation is running (entries may be served and stored); never inside
        ``fastgen.ops.portable()``, where an exported graph must compute every forward from its inputs."""
        return self._depth > 0 and not is_portable()

    def begin(self, generator=None) -> None:
        """A generation starts (scopes nest; the outermost one owns the entries and ``generator``)."""
        if self._depth == 0:
            self._entries.clear()
            self.generations += 1
            self.generator = generator
        self._depth += 1

    def end(self) -> None:
        """A generation ends: its entries go with it."""
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._entries.clear()
            self.generator = None

    # --- lookups --------------------------------------------------------------------------------

    def get(
        self,
        module: torch.nn.Module,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        compute: Callable[[], object],
        modules: Sequence[torch.nn.Module],
        slot: str = "",
    ):
        """``compute()``, or its result cached for this ``module`` (and ``slot``, when one module
        caches several results) and these very ``inputs`` in this generation.

        ``modules``: every module ``compute`` runs (their parameters and LoRA state are in the key).
        """
        if not self.open or why_no_reuse(modules) is not None:
            return compute()
        inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
        key = (ambient_key(), tuple(tensor_key(t) for t in inputs), modules_key(modules))
        # One entry per (module, slot, inputs): pipelines that run CFG as two calls (Wan) alternate
        # between two embeddings tensors, and both stay cached.
        eid = (id(module), slot) + tuple(id(t) for t in inputs)
        entry = self._entries.get(eid)
        if entry is not None and entry.key == key and all(r() is t for r, t in zip(entry.refs, inputs)):
            self.hits += 1
            return entry.value
        self.misses += 1
        value = compute()
        entries = self._entries

        def forget(ref, eid=eid):
            e = entries.get(eid)
            if e is not None and ref in e.refs:
                del entries[eid]

        self._entries[eid] = _Entry(tuple(weakref.ref(t, forget) for t in inputs), key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def forget_unversioned(self) -> None:
        """Drop the entries computed from an inference tensor (one that keeps no version counter, so
        an in-place write to it cannot be seen): after user code that may have written to it."""
        for eid, entry in list(self._entries.items()):
            if any(r() is None or r().is_inference() for r in entry.refs):
                self._entries.pop(eid, None)

    def nbytes(self) -> int:
        def size(v):
            if torch.is_tensor(v):
                return v.numel() * v.element_size()
            if isinstance(v, (tuple, list)):
                return sum(size(x) for x in v)
            return 0

        return sum(size(e.value) for e in self._entries.values())
