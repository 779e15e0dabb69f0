"""Shared by tests/ and bench/: device choice, the Triton interpreter on CPU, GPU markers."""

import os

import torch

# Must happen before any Triton kernel is defined: the interpreter is chosen at @triton.jit time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    # Each test sees fastgen's once-per-reason warnings afresh.
    from fastgen._warnings import reset_warnings

    reset_warnings()
    yield
