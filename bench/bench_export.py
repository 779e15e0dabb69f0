"""ONNX export (issue #13): one forward of the tiny and small Flux and UNet (SD 1.5 layout) configs in
PyTorch eager and in onnxruntime (CPU execution provider, as many threads as torch) on the graph
``fastgen.export.to_onnx`` writes at its defaults, same inputs, same run; onnxruntime's output must
equal PyTorch's to fp32 summation order. On the CPU whatever the device (the issue's comparison).
``fastgen bench --suite export`` measures the same in interleaved rounds with ratio ranges."""

import logging

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastgen.benchmarks import export as E  # noqa: E402

CASES = E.export_cases()
PARAMS = [(c, runtime) for c in CASES for runtime in E.RUNTIMES]  # case by case: one export at a time
REL_TOL = 1e-4  # fp32 (tests/test_export_onnx.py)

_EXPORTED: dict = {}  # the current case's export and PyTorch output (one case at a time)


def _exported(case, folder, export_case):
    # export_case: conftest.py's shared_export_case, E.export_case with the tiny cases' exports made once
    # per session (tests/test_export_bench.py exports the same)
    if case.name not in _EXPORTED:
        _EXPORTED.clear()
        logging.disable(logging.WARNING)  # torch.onnx logs a warning per torchvision op it cannot register
        try:
            exported = export_case(case, folder)
        finally:
            logging.disable(logging.NOTSET)
        _EXPORTED[case.name] = exported, exported.runs[E.EAGER]()
    return _EXPORTED[case.name]


@pytest.mark.parametrize("case,runtime", PARAMS, ids=[f"{c.name}-{r}".replace(" ", "_") for c, r in PARAMS])
def test_export_forward(benchmark, tmp_path_factory, shared_export_case, case, runtime):
    exported, ref = _exported(case, tmp_path_factory.mktemp("export"), shared_export_case)
    run = exported.runs[runtime]
    out = run()
    diff = float((out.double() - ref.double()).abs().max())
    assert diff <= REL_TOL * float(ref.abs().max()), (case.name, runtime, diff)
    benchmark.group = f"export {case.name}"
    benchmark.extra_info.update(suite="export", case=case.name, provider=runtime, max_diff=diff,
                                threads=torch.get_num_threads(), reference="PyTorch eager, same inputs")
    benchmark(run)
