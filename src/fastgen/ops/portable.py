"""``portable()``: a scope in which every fastgen op runs its PyTorch reference instead of a
custom op (Triton, CUDA extension), and no step-invariant result is reused.

``fastgen.export`` traces a patched model inside it, so the exported graph holds standard
operators only (``aten`` ops that torch.onnx lowers to standard ONNX; no ``fastgen::`` node any
runtime would need a plugin for) and computes each forward from its inputs alone. The references
are what the kernels are tested against, so the graph computes what the patched model computes.
A context variable, so a trace in one thread does not change ops running in another.
"""

from __future__ import annotations

import contextlib
import contextvars

_PORTABLE = contextvars.ContextVar("fastgen_portable", default=False)


@contextlib.contextmanager
def portable():
    """Within this scope fastgen's ops take their PyTorch paths (attention: SDPA; prologue, fp8
    and token-merging ops: their references) without fallback warnings, and step caches neither
    serve nor store."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def is_portable() -> bool:
    """Whether the caller runs inside ``portable()``."""
    return _PORTABLE.get()
