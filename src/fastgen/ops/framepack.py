"""``fastgen.ops.framepack``: FramePack's multi-rate patchify-and-pack and the pooled RoPE of its
packed tokens, each one kernel launch (``fastgen.kernels.framepack``) or the plain-PyTorch reference.

Both ops are ``torch.library`` custom ops (``fastgen::patchify_pack``, ``fastgen::rope_pool``) with
fake implementations, so ``torch.compile`` and ``torch.export`` trace through them. Backends:
``"auto"`` (Triton on CUDA tensors, the reference elsewhere and inside ``fastgen.ops.portable()``),
``"triton"`` (falls back to the reference with one ``FastgenFallbackWarning`` where it cannot run),
``"torch"`` (the reference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastgen.kernels import framepack as _k
from fastgen.ops.merging import choose


@torch.library.custom_op("fastgen::patchify_pack", mutates_args=())
def _patchify_pack_op(
    inputs: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor | None], tail: int
) -> torch.Tensor:
    return _k.patchify_pack_fwd(inputs, weights, biases, tail)


@_patchify_pack_op.register_fake
def _(inputs, weights, biases, tail):
    n = sum(_k.patch_tokens(x.shape, w.shape[2:]) for x, w in zip(inputs, weights))
    return weights[0].new_empty((inputs[0].shape[0], n + tail, weights[0].shape[0]))


@torch.library.custom_op("fastgen::rope_pool", mutates_args=())
def _rope_pool_op(
    frame_indices: list[torch.Tensor], kernels: list[int], height: int, width: int, axes_dim: list[int],
    freqs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.rope_pool_fwd(frame_indices, _triples(kernels), height, width, axes_dim, freqs)


@_rope_pool_op.register_fake
def _(frame_indices, kernels, height, width, axes_dim, freqs):
    n = sum(_k.patch_tokens((i.shape[0], height, width), k) for i, k in zip(frame_indices, _triples(kernels)))
    out = freqs.new_empty((n, sum(axes_dim)))
    return out, torch.empty_like(out)


def _triples(flat: Sequence[int]) -> list[tuple[int, int, int]]:
    # custom-op schemas take flat int lists: (kt, kh, kw) per rate, rate after rate
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def patchify_pack(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    tail: int = 0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Patchify R latents, each with its own Conv3d (stride = kernel) after replicate padding to a
    kernel multiple, and pack every rate's tokens into one buffer.

    FramePack (arXiv 2504.12626) embeds history latents at several compression rates; diffusers'
    ``HunyuanVideoHistoryPatchEmbed`` uses kernels (1,2,2), (2,4,4) and (4,8,8) and pads with
    ``_pad_for_3d_conv``. The result equals ``torch.cat([F.conv3d(pad(x_r), w_r, b_r, stride=k_r)
    .flatten(2).transpose(1, 2) for r] + [empty tail], 1)``; the Triton path does it in one launch,
    reading the latents in place (no padded copy, no im2col buffer). Unlike diffusers' 1x
    projection, which drops a trailing odd row or column (no padding), every rate is padded here.

    Args:
        inputs: R tensors (B, C, T_r, H_r, W_r), floating point, any strides; B and C equal across
            rates, T/H/W free per rate. A rate with T_r = 0 gives no tokens. Each is cast to the
            weights' dtype first, as diffusers casts latents to the transformer's dtype.
        weights: R Conv3d weights (D, C, kt, kh, kw), one dtype and D; any kernel sizes.
        biases: None, or R entries each (D,) or None (cast to the weights' dtype).
        tail: rows left uninitialised (``torch.empty``) after the packed tokens, for the caller to
            fill, e.g. with each step's noisy tokens (default 0).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (module doc). Inputs that require grad
            take the reference (the kernel has no backward).

    Returns:
        (B, N + tail, D) in the weights' dtype, N = sum over rates of ceil(T_r/kt) ceil(H_r/kh)
        ceil(W_r/kw): rate r's tokens in input order, each in (t, h, w) raster order.

    Raises:
        ValueError: for an empty or unequal number of inputs, weights and biases; inputs that are not
        5-D floating tensors or differ in B or C; weights that are not 5-D, differ in D or dtype,
        have a kernel dim of 0 or a channel count other than C; a bias not (D,); tensors on
        different devices; a negative tail; an unknown backend.
    """
    inputs, weights, biases, tail = _check_patchify(inputs, weights, biases, tail)
    dtype = weights[0].dtype
    inputs = [x.to(dtype) for x in inputs]
    biases = [None if b is None else b.to(dtype) for b in biases]
    probe = next((t for t in (*inputs, *weights, *biases) if t is not None and t.requires_grad), weights[0])
    if choose(backend, probe, "patchify_pack") == "torch":
        return _k.patchify_pack_reference(inputs, weights, biases, tail)
    return torch.ops.fastgen.patchify_pack(inputs, weights, biases, tail)


def rope_pool(
    frame_indices: Sequence[torch.Tensor],
    kernels: Sequence[Sequence[int]],
    height: int,
    width: int,
    axes_dim: Sequence[int],
    theta: float,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FramePack's rotary cos/sin for packed tokens: 3-axis RoPE on the post-patch grid at the given
    frame indices, replicate-padded and average-pooled with each rate's token kernel.

    Follows diffusers' ``HunyuanVideoFramepackRotaryPosEmbed.forward`` (``get_1d_rotary_pos_embed(
    d_a, pos, theta, use_real=True)`` per axis: columns 2j and 2j+1 both ``cos(pos * theta **
    (-2j / d_a))``, fp32, axes concatenated [t | h | w]) and, for a pooled rate,
    ``HunyuanVideoFramepackTransformer3DModel._pad_rotary_emb`` (``_pad_for_3d_conv``, then
    ``_center_down_sample_3d`` = ``avg_pool3d``). The Triton path computes every row of every rate
    in one launch without the full-resolution grid: each axis's columns depend on that axis's
    coordinate only, so the window mean is a 1-D mean along that axis.

    Args:
        frame_indices: R 1-D tensors (T_r,) of frame positions (integer or floating; taken as
            float32, as diffusers does), one device: the output's. T_r = 0 gives no rows.
        kernels: R triples (kt, kh, kw) of positive ints in post-patch grid units: (1, 1, 1) for
            unpooled tokens (FramePack's 1x clean and noisy tokens), (2, 2, 2) for its 2x history,
            (4, 4, 4) for 4x.
        height, width: the post-patch grid (latent H and W divided by the patch size), >= 1.
        axes_dim: three positive even ints (d_t, d_h, d_w), e.g. HunyuanVideo's (16, 56, 56); their
            sum is the attention head dim.
        theta: the RoPE base, > 0 (HunyuanVideo: 256.0).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (module doc).

    Returns:
        (cos, sin): each (N, sum(axes_dim)) float32, N = sum over rates of ceil(T_r/kt)
        ceil(height/kh) ceil(width/kw); rows of each rate in (t, h, w) raster order, rates in
        input order.

    Raises:
        ValueError: for an empty or unequal number of index tensors and kernels; indices that are
        not 1-D real tensors or sit on different devices; a kernel that is not three positive ints;
        height or width < 1; axes_dim that is not three positive even ints; theta <= 0; an unknown
        backend.
    """
    frame_indices, kernels, axes_dim = _check_rope(frame_indices, kernels, height, width, axes_dim, theta)
    device = frame_indices[0].device
    # Built as diffusers builds it (same torch ops, same device): the kernel multiplies exactly these.
    freqs = _k.rope_freqs(axes_dim, theta, device=device)
    if choose(backend, freqs, "rope_pool") == "torch":
        return _k.rope_pool_reference(frame_indices, kernels, height, width, axes_dim, theta)
    indices = [i.to(torch.float32) for i in frame_indices]
    flat = [int(v) for k in kernels for v in k]
    return torch.ops.fastgen.rope_pool(indices, flat, height, width, list(axes_dim), freqs)


def _check_patchify(inputs, weights, biases, tail):
    def seq(name, value):
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise ValueError(f"{name} must be a list or tuple of tensors, one per rate; got {type(value).__name__}")
        return list(value)

    inputs, weights = seq("inputs", inputs), seq("weights", weights)
    if not inputs:
        raise ValueError("inputs is empty: give at least one rate")
    if len(weights) != len(inputs):
        raise ValueError(f"got {len(inputs)} inputs but {len(weights)} weights: give one Conv3d weight per rate")
    biases = [None] * len(inputs) if biases is None else seq("biases", biases)
    if len(biases) != len(inputs):
        raise ValueError(f"got {len(inputs)} inputs but {len(biases)} biases: give one per rate (None for none), "
                         "or biases=None")
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < 0:
        raise ValueError(f"tail must be an int >= 0, got {tail!r}")
    device = weights[0].device if isinstance(weights[0], torch.Tensor) else None
    for r, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
            raise ValueError(f"inputs[{r}] must be a 5-D floating tensor (B, C, T, H, W), got "
                             f"{_describe(x)}")
        if x.shape[:2] != inputs[0].shape[:2]:
            raise ValueError(f"inputs[{r}] has (B, C) = {tuple(x.shape[:2])} but inputs[0] has "
                             f"{tuple(inputs[0].shape[:2])}: every rate needs the same batch and channels")
    B, C = inputs[0].shape[:2]
    for r, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 5 or not w.is_floating_point():
            raise ValueError(f"weights[{r}] must be a 5-D floating Conv3d weight (D, C, kt, kh, kw), "
                             f"got {_describe(w)}")
        if w.shape[1] != C:
            raise ValueError(f"weights[{r}] takes {w.shape[1]} channels but the inputs have C = {C}")
        if min(w.shape[2:]) < 1:
            raise ValueError(f"weights[{r}] has kernel {tuple(w.shape[2:])}: every kernel dim must be >= 1")
        if w.shape[0] != weights[0].shape[0] or w.dtype != weights[0].dtype:
            raise ValueError(f"weights[{r}] is (D={w.shape[0]}, {w.dtype}) but weights[0] is "
                             f"(D={weights[0].shape[0]}, {weights[0].dtype}): one packed buffer needs one D and dtype")
    D = weights[0].shape[0]
    for r, b in enumerate(biases):
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (D,) or not b.is_floating_point()):
            raise ValueError(f"biases[{r}] must be None or a floating tensor of shape ({D},), got {_describe(b)}")
    for name, ts in (("inputs", inputs), ("weights", weights), ("biases", biases)):
        for r, t in enumerate(ts):
            if t is not None and t.device != device:
                raise ValueError(f"{name}[{r}] is on {t.device} but weights[0] is on {device}: move them to one device")
    return inputs, weights, biases, tail


def _check_rope(frame_indices, kernels, height, width, axes_dim, theta):
    if isinstance(frame_indices, torch.Tensor) or not isinstance(frame_indices, Sequence):
        raise ValueError("frame_indices must be a list or tuple of 1-D tensors, one per rate; got "
                         f"{type(frame_indices).__name__}")
    frame_indices = list(frame_indices)
    if not frame_indices:
        raise ValueError("frame_indices is empty: give at least one rate")
    if not isinstance(kernels, Sequence) or len(kernels) != len(frame_indices):
        raise ValueError(f"kernels must be a list of {len(frame_indices)} (kt, kh, kw) triples, one per frame_indices "
                         f"entry; got {kernels!r}")
    device = frame_indices[0].device if isinstance(frame_indices[0], torch.Tensor) else None
    for r, i in enumerate(frame_indices):
        if not isinstance(i, torch.Tensor) or i.dim() != 1 or i.is_complex() or i.dtype == torch.bool:
            raise ValueError(f"frame_indices[{r}] must be a 1-D integer or floating tensor (T,), got {_describe(i)}")
        if i.device != device:
            raise ValueError(f"frame_indices[{r}] is on {i.device} but frame_indices[0] is on {device}")
    out = []
    for r, k in enumerate(kernels):
        if (not isinstance(k, Sequence) or len(k) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in k)):
            raise ValueError(f"kernels[{r}] must be three positive ints (kt, kh, kw), got {k!r}")
        out.append(tuple(k))
    for name, v in (("height", height), ("width", width)):
        # SymInts too: under torch.compile with dynamic shapes the grid comes from a latent's shape
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1 (the post-patch grid), got {v!r}")
    if (not isinstance(axes_dim, Sequence) or len(axes_dim) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 and d % 2 == 0 for d in axes_dim)):
        raise ValueError(f"axes_dim must be three positive even ints (d_t, d_h, d_w), got {axes_dim!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    return frame_indices, out, tuple(axes_dim)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dim()}-D {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
