"""Per-layer K/V of every condition for one generation, in the compute dtype or in fp8, and the key
that says when they may be served again."""

from __future__ import annotations

import torch

import fastgen.ops as ops


def _own(t: torch.Tensor) -> torch.Tensor:
    # A view into a larger buffer (a fused QKV projection) would keep all of it alive: copy it out.
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


class ConditionKVCache:
    """Layer index -> one entry per condition: a (k, v) pair (B or 1, H, N, D), post-norm and
    post-RoPE, or a ``fastgen.ops.Fp8KV`` (e4m3 with per-token scales) when ``dtype="fp8"``.

    Lives inside one generation. Filled by its first forward (``filled`` then turns True) under
    ``key``: the ambient state, the state of the modules the condition branches run and their
    inputs (``BranchState.cache_key``). A later forward under another key (a callback changed the
    LoRA scale or the adapters, autocast changed) empties it and fills it again (``refills``).
    Emptied by ``clear`` at the end of the generation.
    """

    def __init__(self, dtype: str = "compute"):
        self.dtype = dtype
        self.filled = False
        self.key: tuple | None = None
        self.reads = 0
        self.refills = 0
        self._layers: dict[int, list] = {}

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        entry = ops.quantize_kv(k, v) if self.dtype == "fp8" else (_own(k), _own(v))
        self._layers.setdefault(layer, []).append(entry)

    def segments(self, layer: int) -> list:
        self.reads += 1
        return self._layers[layer]

    def serves(self, key: tuple) -> bool:
        """Whether the entries were computed under ``key``."""
        return self.filled and self.key == key

    def refill(self, key: tuple) -> None:
        """Start filling the cache anew under ``key`` (entries from another key are dropped)."""
        if self.filled:
            self.refills += 1
        self._layers.clear()
        self.filled, self.key = False, key

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def nbytes(self) -> int:
        """Bytes held (scales included)."""
        total = 0
        for entries in self._layers.values():
            for e in entries:
                tensors = e.tensors() if isinstance(e, ops.Fp8KV) else e
                total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def clear(self) -> None:
        self._layers.clear()
        self.filled, self.key = False, None
