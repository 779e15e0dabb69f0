"""fastgen's ops: public tensor functions backed by Triton and CUDA kernels.

Each op validates its inputs, picks a backend (warning once when it must fall back) and calls a
``torch.library`` custom op, so ``torch.compile`` and ``torch.export`` trace through it.
"""

from fastgen.kernels.attention import merge_partials
from fastgen.ops.attention import attention, available_backends
from fastgen.ops.fp8 import Fp8KV, fp8_error, quantize_fp8, quantize_kv
from fastgen.ops import merging  # noqa: F401  (registers fastgen::tome_match, tome_merge, tome_unmerge)
from fastgen.ops import framepack  # noqa: F401  (registers fastgen::patchify_pack, rope_pool)
from fastgen.ops.prologue import qk_norm_rope

__all__ = ["Fp8KV", "attention", "available_backends", "fp8_error", "merge_partials", "qk_norm_rope", "quantize_fp8",
           "quantize_kv"]
