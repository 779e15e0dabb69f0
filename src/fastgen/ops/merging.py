"""The token-merging kernels (``fastgen.kernels.merging``) as custom ops, and their backend choice.

``fastgen.merging.matching`` (``bipartite_match``, ``merge``, ``unmerge``) is the public API: it asks
``choose`` which backend runs and calls either the plain-PyTorch reference or these ops. Each op is a
``torch.library`` custom op with a fake implementation, so ``torch.compile`` traces through it.
"""

from __future__ import annotations

import torch

from fastgen._warnings import warn_once
from fastgen.kernels import merging as _k
from fastgen.ops.prologue import choose_backend

# ``backend=`` of bipartite_match, merge and unmerge: Triton or the PyTorch reference (no CUDA twin).
BACKENDS = ("auto", "triton", "torch")


@torch.library.custom_op("fastgen::tome_match", mutates_args=())
def _tome_match(metric: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.match_fwd(metric, src_idx, dst_idx)


@_tome_match.register_fake
def _(metric, src_idx, dst_idx):
    shape = (metric.shape[0], src_idx.shape[0])
    return metric.new_empty(shape, dtype=torch.float32), metric.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("fastgen::tome_merge", mutates_args=())
def _tome_merge(x: torch.Tensor, members: torch.Tensor, offsets: torch.Tensor, mean: bool) -> torch.Tensor:
    return _k.merge_fwd(x, members, offsets, mean)


@_tome_merge.register_fake
def _(x, members, offsets, mean):
    return x.new_empty((x.shape[0], offsets.shape[1] - 1, x.shape[2]))


@torch.library.custom_op("fastgen::tome_unmerge", mutates_args=())
def _tome_unmerge(y: torch.Tensor, row_of: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return _k.unmerge_fwd(y, row_of, residual)


@_tome_unmerge.register_fake
def _(y, row_of, residual):
    return y.new_empty((y.shape[0], row_of.shape[1], y.shape[2]))


def choose(backend: str, x: torch.Tensor, op: str) -> str:
    """``"triton"`` or ``"torch"`` for ``op`` on ``x``.

    ``"auto"``: Triton on CUDA tensors of fp16, bf16 or fp32, the PyTorch reference otherwise (a
    CPU, other dtypes). Inputs that need gradients always take the reference: the kernels have no
    backward. ``"triton"`` where it cannot run falls back to the reference with one
    ``FastgenFallbackWarning``.

    Raises:
        ValueError: for a backend not in ``BACKENDS``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.requires_grad and torch.is_grad_enabled():
        if backend == "triton":
            warn_once(f"{op}:triton:grad", f"fastgen.ops.{op}: the Triton kernel has no backward; using 'torch' "
                      "for inputs that require grad")
        return "torch"
    return choose_backend(backend, x, op, op)
