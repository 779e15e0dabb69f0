"""Bipartite soft matching on a token grid (ToMe for Stable Diffusion), the plain-PyTorch reference.

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
(``torch.randint(sy * sx, (h // sy, w // sx, 1), generator=generator)``), so one seed gives tomesd's map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Matching:
    """Which tokens merge where, for one (B, N) batch of tokens; index tensors are int64.

    Attributes:
        n: tokens before merging (N = h * w).
        src_idx: (n_src,) grid positions of the src tokens, ascending.
        dst_idx: (n_dst,) grid positions of the dst tokens, ascending.
        unmerged: (B, n_src - r) positions *within src* of the src tokens kept.
        merged: (B, r) positions within src of the src tokens merged.
        into: (B, r) positions within dst each merged src token goes into.
    """

    n: int
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    unmerged: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    @property
    def r(self) -> int:
        """Tokens removed by merging."""
        return self.merged.shape[1]

    @property
    def tokens_out(self) -> int:
        return self.n - self.r


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


def bipartite_match(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, *, use_rand: bool = True,
                    generator: torch.Generator | None = None) -> Matching:
    """Match ``r`` src tokens of ``metric`` to dst tokens (see the module doc).

    Args:
        metric: (B, N, C) with N = h * w, the tokens' features (tomesd: the hidden states), any dtype.
        h, w: the token grid, row-major.
        sx, sy: the cell, in tokens.
        r: tokens to remove; clamped to the number of src tokens.
        use_rand / generator: the dst map (``dst_grid``).

    Returns:
        A ``Matching``; ``merge`` and ``unmerge`` apply it.

    Raises:
        ValueError: when N != h * w, or for a bad cell.
    """
    B, N, _ = metric.shape
    if N != h * w:
        raise ValueError(f"metric has {N} tokens but the grid is {h} x {w} = {h * w}")
    is_dst = dst_grid(h, w, sx, sy, use_rand=use_rand, generator=generator, device=metric.device).flatten()
    dst_idx = is_dst.nonzero().flatten()
    src_idx = (~is_dst).nonzero().flatten()
    r = max(0, min(int(r), src_idx.numel()))
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, src_idx] @ m[:, dst_idx].transpose(-1, -2)  # (B, n_src, n_dst): the reference materialises it
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    return Matching(N, src_idx, dst_idx, order[:, r:], merged, best_dst.gather(1, merged))


def merge(x: torch.Tensor, m: Matching, mode: str = "mean") -> torch.Tensor:
    """(B, N, C) -> (B, N - r, C): ``[unmerged src, dst]``, each merged src reduced into its dst by
    ``mode`` (``"mean"``, as tomesd, or ``"sum"``)."""
    B, _, C = x.shape
    src, dst = x[:, m.src_idx], x[:, m.dst_idx]
    unm = src.gather(1, m.unmerged[..., None].expand(B, -1, C))
    moved = src.gather(1, m.merged[..., None].expand(B, -1, C))
    dst = dst.scatter_reduce(1, m.into[..., None].expand(B, -1, C), moved, reduce=mode)
    return torch.cat([unm, dst], dim=1)


def unmerge(y: torch.Tensor, m: Matching) -> torch.Tensor:
    """(B, N - r, C) -> (B, N, C): unmerged src and dst back at their grid positions, each merged src
    given its dst's value."""
    B, _, C = y.shape
    n_unm = m.unmerged.shape[1]
    unm, dst = y[:, :n_unm], y[:, n_unm:]
    out = y.new_empty(B, m.n, C)
    out[:, m.dst_idx] = dst
    src_pos = m.src_idx[m.unmerged], m.src_idx[m.merged]  # (B, .) grid positions
    out.scatter_(1, src_pos[0][..., None].expand(B, -1, C), unm)
    out.scatter_(1, src_pos[1][..., None].expand(B, -1, C), dst.gather(1, m.into[..., None].expand(B, -1, C)))
    return out
