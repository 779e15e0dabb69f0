"""``fastgen.export``: deployment of what fastgen accelerates (issue #13, in progress).

- ``operators``: which ONNX operators each target runtime accepts (kept as data: ONNX Runtime,
  TensorRT releases) and the check that names every node of a graph a target would refuse.
- ``onnx``: ``to_onnx`` of a pipeline's denoiser with dynamic batch / resolution / sequence
  dimensions, validated with ``onnx.checker`` and onnxruntime; ``read_metadata`` of what it wrote.
- ``runtime``: ``OnnxRuntimeDenoiser.load(path)``, an exported graph standing in for the denoiser of
  a diffusers pipeline; ``ExportedDenoiser``, its runtime-independent base.
"""

from fastgen.export.onnx import ExportReport, read_metadata, to_onnx
from fastgen.export.plan import Plan, Shape, plan  # low-VRAM planning (fastgen export plan)
from fastgen.export.runtime import ExportedDenoiser, OnnxRuntimeDenoiser, TensorSpec
from fastgen.export.tensorrt import EngineBuild, StaleEngineError, TensorRTDenoiser, build_engine  # lazy tensorrt

__all__ = ["ExportReport", "ExportedDenoiser", "OnnxRuntimeDenoiser", "TensorSpec", "read_metadata", "to_onnx"]
