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


@pytest.fixture(scope="session")
def shared_export_case(tmp_path_factory):
    """``get(case, folder)``: ``fastgen.benchmarks.export.export_case(case, folder)``, except that the
    suite's tiny cases (Flux and UNet at ``to_onnx``'s defaults) are exported once per session, into a
    folder of their own, and handed back the same every time. tests/test_export_bench.py (through the
    suite's ``run``) and bench/bench_export.py time the same two exports: each costs ~10 s of CI's
    budget, and the result only gets read (the runs are forwards with nothing changed)."""
    import logging

    from fastgen.benchmarks import export as E

    export_case = E.export_case  # the suite's own, before a test module puts this fixture in its place
    tiny, done = {c.name for c in E.export_cases(("tiny",))}, {}

    def get(case, folder):
        if case.name not in tiny:
            return export_case(case, folder)
        if case.name not in done:
            level = logging.root.manager.disable  # torch.onnx logs a warning per torchvision op it lacks
            logging.disable(max(level, logging.WARNING))
            try:
                done[case.name] = export_case(case, tmp_path_factory.mktemp("export-case"))
            finally:
                logging.disable(level)
        return done[case.name]

    return get
