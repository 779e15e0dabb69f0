"""TensorRT (issue #13): one forward of the small Flux and SD 1.5 configs as an fp16 TensorRT engine built from
``fastgen.export.to_onnx``'s float16 export, beside PyTorch eager fp16 and ``fastgen.patch`` fp16, same inputs,
same run; the weight-streaming engine at 100 %, 50 % and 25 % of its streamable weights. Each runtime's error
against a float32 forward of the same weights must stay within twice PyTorch eager fp16's own, plus one fp16
step of the output's scale. Runs only where TensorRT and a CUDA GPU are present (the module is skipped with what
is missing otherwise). ``fastgen bench --suite tensorrt`` measures the same in interleaved rounds with ratio
ranges, engine build time and memory, and device memory per budget."""

import logging

import pytest

from fastgen.benchmarks import core
from fastgen.benchmarks import tensorrt as T

DEVICE = core.default_device()
MISSING = T.missing_dependency(DEVICE)
if MISSING:
    pytest.skip(MISSING, allow_module_level=True)

CASES = T.engine_cases()
LABELS = [T.EAGER, T.PATCHED, T.ENGINE, *(T.streaming(f) for f in T.BUDGETS)]
PARAMS = [(c, label) for c in CASES for label in LABELS]  # case by case: one case's engines at a time

_PREPARED: dict = {}  # the current case: prepared, float32 reference, eager fp16's output and its error


def _prepared(case, folder):
    if case.name not in _PREPARED:
        _PREPARED.clear()
        core.free_memory(DEVICE)
        logging.disable(logging.WARNING)  # torch.onnx logs a warning per torchvision op it cannot register
        try:
            prepared = T.prepare(case, folder, T.Meter.on(DEVICE))
        finally:
            logging.disable(logging.NOTSET)
        ref = prepared.reference.double()
        eager = prepared.runs[T.EAGER][0]().double()
        _PREPARED[case.name] = prepared, ref, eager, float((eager - ref).abs().max())
    return _PREPARED[case.name]


@pytest.mark.parametrize("case,label", PARAMS, ids=[f"{c.name}-{label}".replace(" ", "_") for c, label in PARAMS])
def test_tensorrt_forward(benchmark, tmp_path_factory, case, label):
    prepared, ref, eager, own = _prepared(case, tmp_path_factory.mktemp("tensorrt"))
    run, around = prepared.runs[label]
    with around():  # a streaming label: its budget set, one call made
        out = run()
        error = float((out.double() - ref).abs().max())
        assert error <= 2 * own + 2**-10 * float(ref.abs().max()), (case.name, label, error, own)
        benchmark.group = f"tensorrt {case.name}"
        benchmark.extra_info.update(suite="tensorrt", case=case.name, provider=label,
                                    max_diff=float((out.double() - eager).abs().max()),
                                    reference="PyTorch eager fp16, same inputs, same run")
        benchmark(core.synced(run, DEVICE))
