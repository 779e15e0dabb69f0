"""``portable()``: a scope in which every fastgen op runs its PyTorch reference instead of a
custom op (Triton, CUDA extension), and no step-invariant result is reused.

``fastgen.export`` traces a patched model inside it, so the exported graph holds standard
operators only (``aten`` ops that torch.onnx lowers to standard ONNX; no ``fastgen::`` node any
runtime would need a plugin for) and computes each forward from its inputs alone. The references
are what the kernels are tested against, so the graph computes what the patched model computes.

The scope is process-wide, a plain module counter: ``torch.compile`` traces a read of it (it
cannot trace a ``contextvars.ContextVar``). A model another thread runs during an export takes
the reference paths too, which changes its speed, not its results.
"""

from __future__ import annotations

import contextlib

_depth = 0


@contextlib.contextmanager
def portable():
    """Within this scope fastgen's ops take their PyTorch paths (attention: SDPA; prologue, fp8
    and token-merging ops: their references) without fallback warnings, and step caches neither
    serve nor store. Scopes nest."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def is_portable() -> bool:
    """Whether a ``portable()`` scope is open."""
    return _depth > 0
