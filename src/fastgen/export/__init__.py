"""``fastgen.export``: deployment of what fastgen accelerates (issue #13, in progress).

- ``operators``: which ONNX operators each target runtime accepts (kept as data: ONNX Runtime,
  TensorRT releases) and the check that names every node of a graph a target would refuse.
- ``onnx``: ``to_onnx`` of a pipeline's denoiser with dynamic batch / resolution / sequence
  dimensions, validated with ``onnx.checker`` and onnxruntime; ``read_metadata`` of what it wrote.
"""

from fastgen.export.onnx import ExportReport, read_metadata, to_onnx
from fastgen.export.plan import Plan, Shape, plan  # low-VRAM planning (fastgen export plan)

__all__ = ["ExportReport", "read_metadata", "to_onnx"]
