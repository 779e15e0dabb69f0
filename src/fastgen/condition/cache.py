"""Per-layer K/V of every condition for one generation, in the compute dtype or in fp8."""

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

    Filled by the first forward of a generation (``filled`` then turns True); emptied by ``clear``
    at the end of the generation.
    """

    def __init__(self, dtype: str = "compute"):
        self.dtype = dtype
        self.filled = False
        self.reads = 0
        self._layers: dict[int, list] = {}

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        entry = ops.quantize_kv(k, v) if self.dtype == "fp8" else (_own(k), _own(v))
        self._layers.setdefault(layer, []).append(entry)

    def segments(self, layer: int) -> list:
        self.reads += 1
        return self._layers[layer]

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
        self.filled = False
