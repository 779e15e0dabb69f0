"""ToMe and ToDo in diffusion transformers (Flux, SD3 / SD3.5, Wan 2.x, HunyuanVideo and FramePack).

A DiT has one token grid (level 1): every block's self-attention merges. fastgen merges *inside*
the attention processors, after the projections and the q/k norm + RoPE prologue, so every token is
normalised and rotated at its own position before it is merged (merging before RoPE would give a
merged token one position for tokens of several):

- the model: a forward pre-hook reads the image/video token grid (F, H, W) of each forward and its
  timestep into the ``Merging`` (the registry's ``token_grid`` names the reader: ``"ids"``, Flux's
  ``img_ids`` rows and columns; ``"latent"``, the (B, C, H, W) or (B, C, F, H, W) latent over the
  config's ``patch_size`` / ``patch_size_t``);
- each merging attention (the registry's ``merge_attention``: the self-attentions over image tokens,
  never Wan's cross-attention over text, never HunyuanVideo's text refiner): a pre-hook finds the
  grid's tokens in the attention's ``hidden_states`` (its last F*H*W tokens: all of them, or the
  image part of Flux's single-stream [text, image], or FramePack's noisy latents after its clean
  and history tokens) and puts a ``GridReduction`` of them where the processor reads it
  (``fastgen.patching.core.reduction_of``); the post-hook takes it away. Text tokens are never merged.
- the processor (``fastgen.patching.processors``): projects, normalises and rotates every token as
  without merging, then ``joint_attention`` applies the reduction to the grid's tokens only:

  ToMe: the matching is computed on the image hidden states that enter the attention (tomesd's
  bipartite matching, ``ToMeConfig``'s cells: 2-D per frame, or spatio-temporal with ``sf`` > 1,
  one seeded dst map per forward shared by every block and the whole batch); the rotated q, k and v
  of the merged tokens are averaged into their dst; attention runs over [text, merged image] tokens
  (text queries see merged keys, merged queries see text keys); the image output is unmerged before
  ``to_out``.
  ToDo: only the image keys and values (after RoPE) are downsampled on the token grid, per frame for
  video (``"avg"``: the mean of each factor x factor cell; ``"nearest"``: ToDo's nearest-exact pick);
  queries stay whole, so nothing is unmerged. With both, queries are merged and keys/values downsampled
  from the whole grid (as the UNet path does).

Where merging is on at a step, the processor takes fastgen's path even where it otherwise runs
upstream's (a CPU, fp32); where it is off (ratio 0, a step outside ``steps``) nothing is set and the
processor runs exactly as without merging. ``merge_mlp`` and ``merge_crossattn`` do not apply to
DiTs (their MLP runs on the block's whole stream, their only cross-attention is Wan's over text): said
once, ignored. Inputs a processor hands to upstream (an attention mask fastgen cannot read) run
unmerged, said once.

Measured deviation of merging after RoPE: relative L2 of the model output vs. unpatched (one forward,
``fastgen.models.tiny_denoiser``, fp32 on a CPU; ToMe with ``use_rand=False`` but the last ToMe column,
seeded maps; "no attn": the merging attentions' outputs zeroed, the bound ``tests/test_merging_dit.py``
holds every setting under; 2026-11-30, diffusers 0.42.1):

=========  ==========  ========  ========  ========  ========  ========  ==========  =======
model      grid F H W  ToMe 0.3  ToMe 0.5  ToMe 0.7  ToDo avg  ToDo nr.  ToMe 0.5 r  no attn
=========  ==========  ========  ========  ========  ========  ========  ==========  =======
flux       1 x 4 x 4   0.0157    0.0303    0.0400    0.0396    0.0377    0.0360      0.0587
sd3        1 x 6 x 6   0.0026    0.0038    0.0071    0.0064    0.0103    0.0038      0.0200
sd35       1 x 6 x 6   0.0084    0.0101    0.0142    0.0128    0.0242    0.0088      0.0392
wan        2 x 2 x 2   0.0306    0.0494    0.0519    0.0465    0.0937    0.0425      0.1076
hunyuan    2 x 4 x 4   0.0139    0.0209    0.0280    0.0340    0.0236    0.0170      0.0474
framepack  2 x 4 x 4   0.0128    0.0181    0.0218    0.0209    0.0209    0.0179      0.0661
=========  ==========  ========  ========  ========  ========  ========  ==========  =======

(ToDo: factor 2.) On grids of 8 to 36 tokens merging removes a large share of what attention
contributes (ToMe 0.7 on Flux: 0.040 of the 0.059 that dropping the attention costs; ToDo nearest on
Wan's 2 x 2 frames keeps one key per frame); real grids (4096 tokens at 1024^2) average over far more
similar neighbours. Random weights make these a check of the mechanics, not of image quality.
"""

from __future__ import annotations

import inspect
import math
import re
import weakref

import torch

from fastgen._validity import capturing, tensor_key
from fastgen._warnings import warn_once
from fastgen.merging.matching import Matching, bipartite_match, merge, unmerge
from fastgen.merging.runtime import REDUCTION, Merging, tokens_merged
from fastgen.merging.unet import downsample_tokens

Grid = tuple[int, int, int]  # (frames, rows, columns) of image / video tokens


# --- where the blocks are --------------------------------------------------------------------


def merging_attentions(model, arch) -> list[tuple[str, str, torch.nn.Module]]:
    """(block path, attention path, attention module) of every attention ``arch.merge_attention``
    names in ``model`` (patterns of module paths, ``*`` for one path component: a block index)."""
    patterns = [re.compile(re.escape(p).replace(r"\*", r"[^.]+")) for p in arch.merge_attention]
    out = []
    for path, module in model.named_modules():
        if any(p.fullmatch(path) for p in patterns):
            out.append((path.rpartition(".")[0], path, module))
    return out


def dit_places(model, arch, merging: Merging) -> list[tuple[torch.nn.Module, object]]:
    """(module, hook) pairs that apply ``merging`` to the DiT ``model``; fills ``merging.rows``
    (one row per block: path, level 1, what)."""
    tome, todo = merging.tome, merging.todo
    if tome is not None and (tome.merge_mlp or tome.merge_crossattn):
        warn_once(f"merging-dit-parts:{type(model).__name__}",
                  f"ToMeConfig merge_mlp / merge_crossattn do not apply to {type(model).__name__}: fastgen merges "
                  "tokens in its self-attention only (merge_attn)")
    ratio = tome.ratio_at(1) if tome is not None and tome.merge_attn else 0.0
    factor = todo.factor_at(1) if todo is not None else 1
    if ratio == 0 and factor == 1:
        return []
    what = ", ".join(([f"ToMe {ratio:g} in attention"] if ratio > 0 else [])
                     + ([f"ToDo x{factor} K/V"] if factor > 1 else []))
    places, blocks = [], []
    for block, path, attn in merging_attentions(model, arch):
        if block not in blocks:
            blocks.append(block)
            merging.rows.append((block, 1, what))
        places.append((attn, AttentionMerging(merging, ratio, factor, path)))
    if places:
        places.append((model, TokenGrid(model, arch.token_grid, merging)))
    return places


# --- the model: the token grid of each forward --------------------------------------------------


class TokenGrid:
    """On the model: the image/video token grid (F, H, W) and the timestep of each forward."""

    def __init__(self, model, reader: str, merging: Merging):
        if reader not in GRID_READERS:
            raise ValueError(f"unknown token grid reader {reader!r}: one of {tuple(GRID_READERS)}")
        self.merging, self.read = merging, GRID_READERS[reader]
        self.model_name = type(model).__name__
        self.config = model.config
        # the forward's parameter names, to find an argument given by position or by keyword
        self.names = list(inspect.signature(type(model).forward).parameters)[1:]
        self._ids: tuple | None = None  # (weakref to img_ids, its tensor_key, grid): read once per tensor

    def __getstate__(self):  # pickled with its model: the ids read last time are not part of it
        return dict(self.__dict__, _ids=None)

    def arg(self, args, kwargs, name: str):
        if name in kwargs:
            return kwargs[name]
        i = self.names.index(name) if name in self.names else len(args)
        return args[i] if i < len(args) else None

    def pre(self, module, args, kwargs):
        grid = self.read(self, args, kwargs)
        if grid is None:
            self.merging.size = None
        else:
            self.merging.begin_forward(grid, self.arg(args, kwargs, "timestep"))
        return args, kwargs


def grid_from_latent(hook: TokenGrid, args, kwargs) -> Grid | None:
    """SD3 (B, C, H, W), Wan and HunyuanVideo (B, C, F, H, W) latents over the config's patch sizes:
    ``patch_size`` an int (with ``patch_size_t``, default 1) or Wan's (t, h, w)."""
    x = hook.arg(args, kwargs, "hidden_states")
    if not torch.is_tensor(x) or x.dim() not in (4, 5):
        return None
    p = hook.config.get("patch_size", 1) or 1
    pt, ph, pw = tuple(p) if isinstance(p, (tuple, list)) else (hook.config.get("patch_size_t", 1) or 1, p, p)
    frames = x.shape[2] // pt if x.dim() == 5 else 1
    return frames, x.shape[-2] // ph, x.shape[-1] // pw


def grid_from_ids(hook: TokenGrid, args, kwargs) -> Grid | None:
    """Flux: the rows and columns of ``img_ids`` (S, 3), read on the host once per ids tensor (a
    pipeline passes one tensor at every step). Ids that are no row-major grid of all S tokens
    (Kontext's reference image, a user's layout) give None: nothing merges. Where they cannot be read
    (torch.compile tracing, CUDA graph capture), a square grid if S is a square."""
    ids = hook.arg(args, kwargs, "img_ids")
    x = hook.arg(args, kwargs, "hidden_states")
    if not torch.is_tensor(ids) or not torch.is_tensor(x) or x.dim() != 3:
        return None
    ids = ids[0] if ids.dim() == 3 else ids  # the deprecated batched layout, as the model reads it
    n = x.shape[1]
    if torch.compiler.is_compiling() or capturing():
        side = math.isqrt(n)
        return (1, side, side) if side * side == n else None
    key = tensor_key(ids)
    if hook._ids is not None and hook._ids[0]() is ids and hook._ids[1] == key:
        return hook._ids[2]
    grid = _ids_grid(ids.detach().to("cpu", torch.float64), n)
    hook._ids = (weakref.ref(ids), key, grid)
    if grid is None:
        warn_once(f"merging-ids:{hook.model_name}:{n}",
                  f"token merging skips {hook.model_name}: its img_ids are no row-major grid of its {n} image tokens")
    return grid


def _ids_grid(ids: torch.Tensor, n: int) -> Grid | None:
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 3 or n == 0:
        return None
    rows, cols = ids[:, 1] - ids[:, 1].min(), ids[:, 2] - ids[:, 2].min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    pos = torch.arange(n, dtype=torch.float64)
    if h * w != n or not (torch.equal(rows, (pos // w).floor()) and torch.equal(cols, pos % w)):
        return None
    return 1, h, w


GRID_READERS = {"ids": grid_from_ids, "latent": grid_from_latent}


# --- each merging attention --------------------------------------------------------------------


class AttentionMerging:
    """On a merging attention module: the ``GridReduction`` of each call, where its processor reads it."""

    def __init__(self, merging: Merging, ratio: float, factor: int, path: str):
        self.merging, self.ratio, self.factor, self.path = merging, ratio, factor, path

    def pre(self, module, args, kwargs):
        module.__dict__.pop(REDUCTION, None)
        grid = self.merging.size
        x = args[0] if args else kwargs.get("hidden_states")
        if grid is None or not torch.is_tensor(x) or x.dim() != 3:
            return args, kwargs
        merging = self.merging
        tome, todo = merging.tome, merging.todo
        merge_now = self.ratio > 0 and merging.on(tome) and merging.can_match()
        todo_now = self.factor > 1 and merging.on(todo)
        if not (merge_now or todo_now):
            return args, kwargs
        F, H, W = grid
        n = F * H * W
        if x.shape[1] < n:
            warn_once(f"merging-dit-grid:{self.path}:{x.shape[1]}:{grid}",
                      f"token merging skips {self.path}: its {x.shape[1]} tokens hold no {F} x {H} x {W} token grid")
            return args, kwargs
        start, stop = x.shape[1] - n, x.shape[1]
        matching = None
        cells = merging.cells(grid, self.path) if merge_now else None
        if cells is not None:
            r = tokens_merged(n, self.ratio)
            if r > 0:
                mask = merging.dst_mask(grid, cells=cells)  # on the CPU: no device sync
                matching = bipartite_match(x[:, start:stop], F * H, W, tome.sx, tome.sy, r, dst_mask=mask)
        if matching is not None or todo_now:
            reduction = GridReduction(start, stop, grid, matching, self.factor if todo_now else 1,
                                      todo.method if todo_now else "")
            module.__dict__[REDUCTION] = (merging.patch_state, reduction)
        return args, kwargs

    def post(self, module, args, output):
        module.__dict__.pop(REDUCTION, None)  # no tensor of this call outlives it
        return output


class GridReduction:
    """ToMe and/or ToDo of tokens [start, stop) of an attention's ``hidden_states``, an (F, H, W)
    grid in row-major order (``fastgen.patching.core.Reduction``)."""

    def __init__(self, start: int, stop: int, grid: Grid, matching: Matching | None, factor: int, method: str):
        self.start, self.stop, self.grid = start, stop, grid
        self.matching, self.factor, self.method = matching, factor, method

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        if self.matching is None:
            return q
        return _heads(merge(_tokens(q), self.matching), q.shape[-1])

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factor > 1:
            return tuple(_heads(downsample_grid(_tokens(t), self.grid, self.factor, self.method), t.shape[-1])
                         for t in (k, v))
        if self.matching is None:
            return k, v
        return tuple(_heads(merge(_tokens(t), self.matching), t.shape[-1]) for t in (k, v))

    def output(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.matching is None else unmerge(out, self.matching)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    # (B, S, H*D) -> (B, H, S, D), a view: ``_tokens``' inverse
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    # (B, H, S, D) -> (B, S, H*D): a view for the (B, S, H, D)-ordered buffers the prologue writes
    B, H, S, D = x.shape
    return x.transpose(1, 2).reshape(B, S, H * D)


def downsample_grid(x: torch.Tensor, grid: Grid, factor: int, method: str) -> torch.Tensor:
    """(B, F*H*W, C) tokens of an (F, H, W) grid -> (B, F*h*w, C): each frame downsampled on its own
    (``fastgen.merging.unet.downsample_tokens``: ``"avg"`` or ``"nearest"``)."""
    B, n, C = x.shape
    F, H, W = grid
    out = downsample_tokens(x.reshape(B * F, H * W, C), (H, W), factor, method)
    return out.reshape(B, F * out.shape[1], C)
