"""Benchmark suites, shared by ``bench/`` (pytest-benchmark) and the ``fastgen bench`` command, so
both measure the same thing the same way.

``core`` holds what every suite shares (environment, timing, peak memory, result rows, tables,
saving); each suite is a module of its own with its cases, providers and a ``run(device,
budget_s=1.0, progress=None) -> list[Result]``. ``SUITES`` lists them, in the order ``fastgen bench``
runs them; a new suite is a new module and a name in ``_SUITE_MODULES``.
"""

from __future__ import annotations

import importlib

from fastgen.benchmarks.core import Result, default_device, environment, markdown_table, save

# The suites load on first use of ``SUITES``, not with this package: ``python -m fastgen.benchmarks.<suite>``
# imports the package before it runs the suite as ``__main__``, and a suite already imported by then would be
# a second copy of the module (runpy warns "found in sys.modules ... prior to execution" on every run).
_SUITE_MODULES = ("attention", "prologue", "quantize", "denoisers", "conditions", "edit", "merging", "export",
                  "tensorrt", "framepack", "fractal")

__all__ = ["SUITES", "Result", "default_device", "environment", "markdown_table", "save"]


def __getattr__(name: str):
    if name == "SUITES":
        # imported in name order, as the eager imports were: a suite's own table prints where it registered
        modules = {m: importlib.import_module(f"fastgen.benchmarks.{m}") for m in sorted(_SUITE_MODULES)}
        suites = {modules[m].SUITE: modules[m].run for m in _SUITE_MODULES}
        globals()["SUITES"] = suites  # built once
        return suites
    raise AttributeError(f"module 'fastgen.benchmarks' has no attribute {name!r}")
