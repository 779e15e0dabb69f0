"""Names shared across fastgen's modules, each defined once.

Import-light (no torch, no Triton), so the CLI builds its argument parser from them before it
decides whether Triton runs under the interpreter.
"""

# ``backend=`` of ``fastgen.ops.attention`` and ``PatchConfig.attention_backend``.
ATTENTION_BACKENDS = ("auto", "triton", "cuda", "sdpa", "xformers")

# ``backend=`` of the elementwise ops with a Triton kernel, a CUDA twin and a PyTorch path
# (``qk_norm_rope``, ``quantize_fp8``) and ``PatchConfig.prologue_backend``.
KERNEL_BACKENDS = ("auto", "triton", "cuda", "torch")
