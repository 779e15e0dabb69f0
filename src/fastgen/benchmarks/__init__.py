"""Benchmark suites, shared by ``bench/`` (pytest-benchmark) and the ``fastgen bench`` command, so
both measure the same thing the same way.

``core`` holds what every suite shares (environment, timing, peak memory, result rows, tables,
saving); each suite is a module of its own with its cases, providers and a ``run(device,
budget_s=1.0, progress=None) -> list[Result]``. ``SUITES`` lists them, in the order ``fastgen bench``
runs them; a new suite is a new module and a line here.
"""

from __future__ import annotations

from fastgen.benchmarks import (attention, conditions, denoisers, edit, export, fractal, framepack, merging,
                                prologue, quantize, tensorrt)
from fastgen.benchmarks.core import Result, default_device, environment, markdown_table, save

SUITES = {m.SUITE: m.run for m in (attention, prologue, quantize, denoisers, conditions, edit, merging, export,
                                    tensorrt, framepack, fractal)}

__all__ = ["SUITES", "Result", "default_device", "environment", "markdown_table", "save"]
