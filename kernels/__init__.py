"""Triton kernels of fastgen: pure tensor functions, their launchers and plain-PyTorch references.

Nothing here knows about diffusers or models. Each op lives in one file named after it:

- ``attention``: FlashAttention-2 style forward with cached K/V segments read in place.
- ``qk_norm_rope``: fused RMS-norm of q and k plus rotary embedding (the attention prologue).
- ``fp8``: e4m3 quantization of cached K/V with one scale per token and head.

Launchers index in int32 unless some tensor spans 2**31 elements or more (``_common.needs_int64``).

The launchers need ``triton``; the references need only ``torch``. On a machine without a GPU the
launchers run under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before import.
"""
