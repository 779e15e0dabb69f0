"""Per-layer K/V of every condition for one generation, in the compute dtype or in fp8, and the key
that says when they may be served again."""

from __future__ import annotations

import torch

from fastgen.flux_branches import cache_entry, entry_tensors


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
        self._layers.setdefault(layer, []).append(cache_entry(k, v, self.dtype))

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
        return sum(t.numel() * t.element_size() for entries in self._layers.values() for e in entries
                   for t in entry_tensors(e))

    def clear(self) -> None:
        self._layers.clear()
        self.filled, self.key = False, None
