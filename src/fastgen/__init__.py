"""fastgen: fast kernels and one-line patches for diffusion image and video generation.

    import fastgen
    out = fastgen.ops.attention(q, k, v, extra_kv=[(k_cond, v_cond)], extra_bias=[0.0])

See README.md for what is available now and ``fastgen info`` for what this machine can run.
"""

import importlib

from fastgen._version import __version__
from fastgen._warnings import FastgenFallbackWarning

__all__ = [
    "Condition", "FastgenFallbackWarning", "PatchConfig", "ToDoConfig", "ToMeConfig", "__version__", "benchmarks",
    "condition", "edit", "fractal", "framepack", "generation", "is_patched", "merging", "ops", "patch", "tune",
    "unpatch",
]
_PATCH_API = ("patch", "unpatch", "is_patched", "generation", "tune", "PatchConfig", "PatchHandle")


def __getattr__(name: str):
    # Submodules load on first use: importing fastgen stays cheap and imports no Triton, so
    # TRITON_INTERPRET (needed before Triton is first imported) can still be set after ``import fastgen``.
    if name in ("ops", "benchmarks", "condition", "edit", "fractal", "framepack"):
        return importlib.import_module(f"fastgen.{name}")
    if name in ("ToMeConfig", "ToDoConfig", "merging"):
        module = importlib.import_module("fastgen.merging")
        return module if name == "merging" else getattr(module, name)
    if name == "Condition":
        return importlib.import_module("fastgen.condition").Condition
    if name in _PATCH_API:
        return getattr(importlib.import_module("fastgen.patching"), name)
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")
