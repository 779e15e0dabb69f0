"""Shared by tests/ and bench/: device choice, the Triton interpreter on CPU, GPU markers."""

import os

import torch

# Must happen before any Triton kernel is defined: the interpreter is chosen at @triton.jit time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The suite's models are tiny: one intra-op thread runs them fastest, and a second thread that
    # spins on a busy 2-core machine made a 7 ms UNet forward take 0.8 s. FASTGEN_TEST_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("FASTGEN_TEST_THREADS", "1")))

import pytest  # noqa: E402

# Backend decisions (fastgen.ops.autotune) go to a folder of this run, never the user's ~/.cache.
if "FASTGEN_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FASTGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastgen-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FASTGEN_CACHE_DIR"], True)

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
