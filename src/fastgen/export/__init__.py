"""``fastgen.export``: deployment of what fastgen accelerates (issue #13, in progress).

- ``operators``: which ONNX operators each target runtime accepts (kept as data: ONNX Runtime,
  TensorRT releases) and the check that names every node of a graph a target would refuse.
- ``onnx``: ``to_onnx`` of a pipeline's denoiser with dynamic batch / resolution / sequence
  dimensions, validated with ``onnx.checker`` and onnxruntime.

ONNX Runtime pipelines and TensorRT engines come next (issue #13).
"""
