"""``fastgen.export``: deployment of what fastgen accelerates (issue #13).

- ``onnx``: ``to_onnx`` of a pipeline's denoiser (Flux, UNets, SD3, Wan, HunyuanVideo; patched or not)
  with dynamic batch / resolution / frames / text length in a target runtime's operator forms,
  validated with ``onnx.checker`` and onnxruntime; ``read_metadata`` of what it wrote.
- ``operators``: which ONNX operators each target runtime accepts (kept as data: ONNX Runtime,
  TensorRT releases) and the check that names every node of a graph a target would refuse.
- ``runtime``: ``OnnxRuntimeDenoiser.load(path)``, an exported graph standing in for the denoiser of
  a diffusers pipeline; ``ExportedDenoiser``, its runtime-independent base.
- ``tensorrt``: ``build_engine`` (profiles, precision, refit, weight streaming, timing and engine
  caches) and ``TensorRTDenoiser``; TensorRT is imported only when an engine function runs.
- ``plan``: weights, activations and the weight-streaming budget that fits a card.
"""

from fastgen.export.onnx import ExportReport, read_metadata, to_onnx
from fastgen.export.plan import Plan, Shape, plan  # low-VRAM planning (fastgen export plan)
from fastgen.export.runtime import ExportedDenoiser, OnnxRuntimeDenoiser, TensorSpec
from fastgen.export.tensorrt import EngineBuild, StaleEngineError, TensorRTDenoiser, build_engine  # lazy tensorrt

__all__ = ["EngineBuild", "ExportReport", "ExportedDenoiser", "OnnxRuntimeDenoiser", "Plan", "Shape",
           "StaleEngineError", "TensorRTDenoiser", "TensorSpec", "build_engine", "plan", "read_metadata", "to_onnx"]
