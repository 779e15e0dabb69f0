"""Bipartite soft matching on a token grid (ToMe for Stable Diffusion): match, merge, unmerge.

Method: Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (2023), and tomesd 0.1.3's
``bipartite_soft_matching_random2d``, whose conventions this follows so that merges are the same:

- the (h, w) grid is cut into (sy, sx) cells; one token per whole cell is *dst* (the top-left one, or
  one drawn uniformly per cell), every other token is *src*; rows and columns left over when sy, sx
  do not divide h, w stay src;
- each src token's best dst is its highest cosine similarity; the ``r`` src tokens whose best is
  highest are merged (mean) into their dst, the rest stay (*unmerged*);
- merged output is ``[unmerged src..., dst...]``; unmerge gives each merged src its dst's value back.

Where tomesd sorts with an unstable sort (the dst|src split and the src ranking), fastgen sorts
stably: on ties the lower index comes first. Results then equal tomesd's after unmerge (the order of
tokens inside the merged sequence may differ on ties, never which tokens merge where on random data).

Randomness: one dst map for the whole batch, drawn from ``generator`` as tomesd draws it
(``torch.randint(sy * sx, (h // sy, w // sx, 1), generator=generator)``), so one seed gives tomesd's map;
or the caller's map (``dst_mask``), so that one map serves many blocks.

Backends: ``"auto"`` runs the fused Triton kernels (``fastgen.kernels.merging``, via the custom ops
of ``fastgen.ops.merging``) on CUDA tensors and the plain-PyTorch reference on a CPU; ``"triton"``
forces the kernels (the Triton interpreter on a CPU, for tests), ``"torch"`` the reference. The
similarities are computed in fp32 on both (tomesd computes them in the input's dtype), so fp16/bf16
matchings may differ from tomesd's where its rounding makes ties; fp32 ones equal it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastgen.kernels import merging as _k
from fastgen.ops import merging as _ops

MERGE_MODES = ("mean", "sum")


@dataclass(frozen=True)
class Matching:
    """Which tokens merge where, for one (B, N) batch of tokens; computed once by ``bipartite_match``.

    Attributes:
        n: tokens before merging (N = h * w).
        src_idx: (n_src,) int64 grid positions of the src tokens, ascending.
        dst_idx: (n_dst,) int64 grid positions of the dst tokens, ascending.
        unmerged: (B, n_src - r) int64 positions *within src* of the src tokens kept, in merged order
            (highest best similarity first; with r = 0, src order: nothing is scored).
        merged: (B, r) int64 positions within src of the src tokens merged.
        into: (B, r) int64 positions within dst each merged src token goes into.
        row_of: (B, N) int32, each grid position's row in the merged sequence (unmerge gathers it).
        members: (B, N) int32 grid positions grouped by merged row: a dst first, then its merged src
            in merge order (the kernels' segment mean adds them in this order).
        offsets: (B, N - r + 1) int32 where each merged row's members start (CSR).

    A matching of batch 1 serves tokens of any batch (one map for all, as tomesd's broadcast).
    """

    n: int
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    unmerged: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor
    row_of: torch.Tensor
    members: torch.Tensor
    offsets: torch.Tensor

    @property
    def r(self) -> int:
        """Tokens removed by merging."""
        return self.merged.shape[1]

    @property
    def tokens_out(self) -> int:
        return self.n - self.r

    def batch(self, start: int, stop: int) -> Matching:
        """The matching of batch elements [start, stop) (a batch-1 matching serves any: itself)."""
        if self.row_of.shape[0] == 1:
            return self
        cut = {name: getattr(self, name)[start:stop] for name in
               ("unmerged", "merged", "into", "row_of", "members", "offsets")}
        return dataclasses.replace(self, **cut)


def dst_grid(h: int, w: int, sx: int, sy: int, *, use_rand: bool = True, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) bool mask of dst tokens: one per whole (sy, sx) cell, top-left without randomness, else
    drawn uniformly per cell from ``generator`` (on its device, as tomesd draws it).

    Raises:
        ValueError: for strides below 1 or above the grid.
    """
    if sx < 1 or sy < 1:
        raise ValueError(f"sx and sy must be at least 1, got sx={sx}, sy={sy}")
    if sy > h or sx > w:
        raise ValueError(f"an ({sy}, {sx}) cell does not fit in an ({h}, {w}) token grid")
    hs, ws = h // sy, w // sx
    if use_rand:
        gen_device = generator.device if generator is not None else "cpu"
        pick = torch.randint(sy * sx, size=(hs, ws, 1), device=gen_device, generator=generator).to(device)
    else:
        pick = torch.zeros(hs, ws, 1, dtype=torch.int64, device=device)
    cells = torch.zeros(hs, ws, sy * sx, dtype=torch.bool, device=device)
    cells.scatter_(2, pick, True)
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[: hs * sy, : ws * sx] = cells.view(hs, ws, sy, sx).transpose(1, 2).reshape(hs * sy, ws * sx)
    return mask


def _check_tokens(name: str, t, n: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor (B, N, C), got {getattr(t, 'shape', type(t))}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if n is not None and t.shape[1] != n:
        raise ValueError(f"{name} has {t.shape[1]} tokens but the matching expects {n}")


def _check_batch(name: str, t: torch.Tensor, m: Matching) -> None:
    b = m.row_of.shape[0]
    if b not in (1, t.shape[0]):
        raise ValueError(f"{name} has batch {t.shape[0]} but the matching was made for batch {b} (use its "
                         "batch, or a matching of batch 1 for every batch)")
    if t.device != m.row_of.device:
        raise ValueError(f"{name} is on {t.device} but the matching is on {m.row_of.device}")


def bipartite_match(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, *, use_rand: bool = True,
                    generator: torch.Generator | None = None, dst_mask: torch.Tensor | None = None,
                    backend: str = "auto") -> Matching:
    """Match ``r`` src tokens of ``metric`` to dst tokens (see the module doc).

    Args:
        metric: (B, N, C) with N = h * w, the tokens' features (tomesd: the hidden states), any float
            dtype, any strides; B may be batch x heads.
        h, w: the token grid, row-major.
        sx, sy: the cell, in tokens (unused when ``dst_mask`` is given).
        r: tokens to remove; clamped to the number of src tokens.
        use_rand / generator: the dst map (``dst_grid``), drawn when ``dst_mask`` is None.
        dst_mask: (h, w) bool, the dst map to use (e.g. one ``dst_grid`` shared by many blocks), on
            any device; on the CPU, counting its dst tokens needs no device sync.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (module doc). Similarities are fp32; the
            best dst on ties is the lowest dst index, and among equal best similarities the lower src
            index merges first.

    Returns:
        A ``Matching``; ``merge`` and ``unmerge`` apply it.

    Raises:
        ValueError: when metric is not a 3-D float tensor or N != h * w, for a bad cell, a dst_mask
        that is not an (h, w) bool tensor with at least one dst, or an unknown backend.
    """
    _check_tokens("metric", metric)
    B, N, _ = metric.shape
    if N != h * w:
        raise ValueError(f"metric has {N} tokens but the grid is {h} x {w} = {h * w}")
    name = _ops.choose(backend, metric.detach(), "tome_match")  # indices only: no gradient to keep
    dev = metric.device
    if dst_mask is None:
        is_dst = dst_grid(h, w, sx, sy, use_rand=use_rand, generator=generator, device=dev)
        n_dst = (h // sy) * (w // sx)  # known without reading the mask back from the device
    else:
        if not isinstance(dst_mask, torch.Tensor) or dst_mask.dtype != torch.bool or dst_mask.shape != (h, w):
            raise ValueError(f"dst_mask must be an ({h}, {w}) bool tensor (dst_grid), got "
                             f"{getattr(dst_mask, 'dtype', type(dst_mask))} {tuple(getattr(dst_mask, 'shape', ()))}")
        is_dst = dst_mask
        n_dst = int(is_dst.sum())  # the index lists' length: a CPU mask answers without a device sync
        if n_dst == 0:
            raise ValueError("dst_mask has no dst token: nothing could be merged into")
    # dst positions first, each part ascending: tomesd's argsort split, sorted stably
    split = (~is_dst).flatten().to(torch.uint8).argsort(stable=True).to(dev)
    dst_idx, src_idx = split[:n_dst], split[n_dst:]
    n_src = N - n_dst
    r = max(0, min(int(r), n_src))
    if r == 0:
        # nothing merges: no scores needed; unmerge(merge(x)) is x
        unmerged = torch.arange(n_src, device=dev).expand(B, -1)
        merged = into = torch.empty(B, 0, dtype=torch.int64, device=dev)
    else:
        with torch.no_grad():
            if name == "torch":
                best, best_dst = _k.match_reference(metric, src_idx, dst_idx)
            else:
                best, best_dst = torch.ops.fastgen.tome_match(metric, src_idx, dst_idx)
            order = best.argsort(dim=-1, descending=True, stable=True)
        merged, unmerged = order[:, :r], order[:, r:]
        into = best_dst.gather(1, merged)
    return Matching(N, src_idx, dst_idx, unmerged, merged, into, *_k.segments(N, src_idx, dst_idx, unmerged, merged, into))


def merge(x: torch.Tensor, m: Matching, mode: str = "mean", *, backend: str = "auto") -> torch.Tensor:
    """(B, N, C) -> (B, N - r, C): ``[unmerged src, dst]``, each dst reduced with the src merged into it
    by ``mode`` (``"mean"``, the unweighted mean of the dst and its src, as tomesd; or ``"sum"``).

    Args:
        x: (B, N, C) any float dtype, any strides; C need not be the metric's.
        m: the ``Matching`` (batch B, or 1 for every batch).
        mode: ``"mean"`` or ``"sum"``.
        backend: ``"auto"``, ``"triton"`` (one fused pass, fp32 sums rounded once) or ``"torch"``
            (one ``scatter_add`` into the merged rows and one division by the rows' sizes: 2.6x
            faster on a CPU than tomesd's gathers and ``scatter_reduce``, equal to them to rounding;
            ``kernels/merging.py``'s ``merge_reference`` is tomesd's sequence).

    Raises:
        ValueError: for a tensor that is not (B, N, C) float, a batch or device the matching does not
        serve, an unknown mode or backend.
    """
    _check_tokens("x", x, m.n)
    _check_batch("x", x, m)
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    if _ops.choose(backend, x, "tome_merge") == "torch":
        return _segment_merge(x, m, mode == "mean")
    return torch.ops.fastgen.tome_merge(x, m.members, m.offsets, mode == "mean")


def _segment_merge(x: torch.Tensor, m: Matching, mean: bool) -> torch.Tensor:
    # Every token added into its merged row (unmerged src: a row of its own), then each row divided
    # by its size; half precision accumulates in fp32 and rounds once, as the kernel does.
    B, N, C = x.shape
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    index = m.row_of.long().expand(B, N)[..., None].expand(B, N, C)
    out = work.new_zeros(B, m.tokens_out, C).scatter_add_(1, index, work)
    if mean:
        sizes = (m.offsets[:, 1:] - m.offsets[:, :-1]).to(work.dtype).expand(B, -1)
        out.div_(sizes[..., None])
    return out.to(x.dtype)


def unmerge(y: torch.Tensor, m: Matching, *, residual: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """(B, N - r, C) -> (B, N, C): each grid position gets its merged row back (unmerged src and dst
    their own, each merged src its dst's), plus ``residual`` when given, in one pass.

    Args:
        y: (B, N - r, C) any float dtype, any strides.
        m: the ``Matching`` ``y`` was merged by.
        residual: optional (B, N, C) of y's dtype: returns ``residual + unmerge(y, m)`` (one rounding).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: for tensors of the wrong shape, dtype, batch or device, or an unknown backend.
    """
    _check_tokens("y", y, m.tokens_out)
    _check_batch("y", y, m)
    if residual is not None:
        want = (y.shape[0], m.n, y.shape[2])
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != want:
            raise ValueError(f"residual must have shape {want}, got {tuple(getattr(residual, 'shape', ()))}")
        if residual.dtype != y.dtype or residual.device != y.device:
            raise ValueError(f"residual must have y's dtype and device ({y.dtype}, {y.device}), got "
                             f"{residual.dtype}, {residual.device}")
    if _ops.choose(backend, y, "tome_unmerge") == "torch":
        return _k.unmerge_reference(y, m.row_of, residual)
    return torch.ops.fastgen.tome_unmerge(y, m.row_of, residual)
