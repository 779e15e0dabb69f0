"""ToMe and ToDo in a UNet (SD 1.5, SDXL: ``UNet2DConditionModel``), through diffusers' hooks.

Where tomesd replaces every ``BasicTransformerBlock``'s class with a copy of an old diffusers
forward, fastgen leaves the block's forward alone and registers PyTorch module hooks (forward pre-
and post-hooks, which never touch ``forward`` itself, so offload hooks and ``torch.compile`` compose
with them) on the block and on the parts that run on merged tokens. Every norm type, GLIGEN,
feed-forward chunking and future diffusers changes run as upstream wrote them, and removing the
hooks leaves nothing behind:

- the UNet: reads the latent size (H, W) of each forward (tomesd reads it likewise from the sample);
- each merging block: computes the matching from the block's input (tomesd's metric: the hidden
  states before ``norm1``) on its token grid;
- ``attn1`` (``merge_attn``), ``attn2`` (``merge_crossattn``), ``ff`` (``merge_mlp``): merge their
  input, unmerge their output, so the block adds the unmerged output to its residual as tomesd does;
- ToDo: ``attn1`` gets its keys and values from the downsampled grid (``encoder_hidden_states`` of
  the self-attention, as ToDo's reference implementation passes them), queries stay whole.

The level of a block (how much smaller its grid is than the latent: 1, 2, 4, 8) comes from the
UNet's structure (down blocks' downsamplers, up blocks' upsamplers); its grid is the latent size
divided by the level, rounded up as the stride-2 convolutions round (tomesd: ``ceil``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastgen._warnings import warn_once
from fastgen.merging.matching import Matching, bipartite_match, merge, unmerge
from fastgen.merging.runtime import Merging, tokens_merged


def unet_blocks(unet) -> list[tuple[str, int, torch.nn.Module]]:
    """(path, level, block) of every ``BasicTransformerBlock`` of a ``UNet2DConditionModel``."""
    out = []

    def collect(prefix: str, parent, level: int):
        for path, module in parent.named_modules(prefix=prefix):
            if type(module).__name__ == "BasicTransformerBlock":
                out.append((path, level, module))

    level = 1
    for i, block in enumerate(unet.down_blocks):
        collect(f"down_blocks.{i}", block, level)
        if getattr(block, "downsamplers", None) is not None:
            level *= 2
    if unet.mid_block is not None:
        collect("mid_block", unet.mid_block, level)
    for i, block in enumerate(unet.up_blocks):
        collect(f"up_blocks.{i}", block, level)
        if getattr(block, "upsamplers", None) is not None:
            level //= 2
    return out


def unet_places(unet, merging: Merging) -> list[tuple[torch.nn.Module, object]]:
    """(module, hook) pairs that apply ``merging`` to ``unet``; fills ``merging.rows``."""
    blocks = unet_blocks(unet)
    tome, todo = merging.tome, merging.todo
    levels = sorted({level for _, level, _ in blocks})
    merging.first_level = first = levels[0] if levels else 1
    places = []
    for path, level, block in blocks:
        ratio = tome.ratio_at(level, first) if tome is not None else 0.0
        factor = todo.factor_at(level, first) if todo is not None else 1
        parts = []
        if ratio > 0:
            parts = [name for name, on in (("attn1", tome.merge_attn), ("attn2", tome.merge_crossattn),
                                           ("ff", tome.merge_mlp)) if on and getattr(block, name, None) is not None]
        if not parts and factor == 1:
            continue
        what = []
        if parts:
            what.append(f"ToMe {ratio:g} in {'+'.join(parts)}")
        if factor > 1:
            what.append(f"ToDo x{factor} K/V")
        merging.rows.append((path, level, ", ".join(what)))
        block_hook = BlockGrid(merging, level, ratio if parts else 0.0, factor, path)
        places.append((block, block_hook))
        for name in ("attn1", "attn2", "ff"):
            todo_here = name == "attn1" and factor > 1
            if name in parts or todo_here:
                places.append((getattr(block, name), MergedPart(block_hook, merge=name in parts, todo=todo_here)))
    places.append((unet, LatentSize(merging)))
    return places


class LatentSize:
    """On the UNet: the latent size and timestep of each forward, for the blocks below."""

    def __init__(self, merging: Merging):
        self.merging = merging

    def pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if torch.is_tensor(sample) and sample.dim() == 4:
            self.merging.begin_forward(tuple(sample.shape[-2:]), timestep)
        else:
            self.merging.size = None
        return args, kwargs


class BlockGrid:
    """On a merging ``BasicTransformerBlock``: its token grid, and the matching of this call."""

    def __init__(self, merging: Merging, level: int, ratio: float, factor: int, path: str):
        self.merging, self.level, self.ratio, self.factor, self.path = merging, level, ratio, factor, path
        self.grid: tuple[int, int] | None = None
        self.matching: Matching | None = None
        self.downsample = False
        self.module = None  # the block, during its forward
        self.ff_calls = 0  # its feed-forward's calls in this forward (diffusers' batch chunking calls it per chunk)

    def pre(self, module, args, kwargs):
        self.grid, self.matching, self.downsample, self.module, self.ff_calls = None, None, False, module, 0
        x = args[0] if args else kwargs.get("hidden_states")
        size = self.merging.size
        if size is None or not torch.is_tensor(x) or x.dim() != 3:
            return args, kwargs
        grid = self._grid(size, x.shape[1])
        if grid is None:
            return args, kwargs
        self.grid = grid
        tome, todo = self.merging.tome, self.merging.todo
        self.downsample = self.factor > 1 and self.merging.on(todo)
        if self.ratio > 0 and self.merging.on(tome) and self.merging.can_match():
            h, w = grid
            cells = self.merging.cells((1, h, w), self.path)
            r = tokens_merged(x.shape[1], self.ratio)
            if r > 0 and cells is not None:
                mask = self.merging.dst_mask((1, h, w), cells=cells)  # on the CPU: no device sync
                self.matching = bipartite_match(x, h, w, tome.sx, tome.sy, r, dst_mask=mask)
        return args, kwargs

    def post(self, module, args, output):
        self.matching, self.module = None, None  # no tensor of this call outlives it
        return output

    def _grid(self, size: tuple[int, ...], n: int) -> tuple[int, int] | None:
        H, W = size[-2:]
        h, w = math.ceil(H / self.level), math.ceil(W / self.level)
        if h * w == n:
            return h, w
        # another layout than the UNet's own (a user's wrapper): tomesd's rule from the token count
        level = int(math.ceil(math.sqrt(H * W // n))) if n else 0
        if level and math.ceil(H / level) * math.ceil(W / level) == n:
            return math.ceil(H / level), math.ceil(W / level)
        warn_once(f"merging-grid:{self.path}:{n}",
                  f"token merging skips {self.path}: its {n} tokens are no grid of the {H} x {W} latent")
        return None


class MergedPart:
    """On ``attn1`` / ``attn2`` / ``ff`` of a merging block: merged input, unmerged output; on
    ``attn1`` with ToDo, keys and values from the downsampled grid."""

    def __init__(self, block: BlockGrid, merge: bool, todo: bool):
        self.block, self.merge, self.todo = block, merge, todo
        self._active: Matching | None = None

    def pre(self, module, args, kwargs):
        self._active = None
        block = self.block
        if not args or not torch.is_tensor(args[0]):
            return args, kwargs
        if kwargs.get("attention_mask") is not None:
            if block.matching is not None or (self.todo and block.downsample):
                warn_once(f"merging-mask:{block.merging.model_name}",
                          f"token merging leaves the attentions of {block.merging.model_name} that get an attention "
                          "mask unmerged (a mask over all tokens cannot follow them)")
            return args, kwargs
        x = args[0]
        if self.todo and block.downsample and kwargs.get("encoder_hidden_states") is None:
            kwargs = dict(kwargs, encoder_hidden_states=downsample_tokens(x, block.grid, block.factor,
                                                                           block.merging.todo.method))
        m = block.matching if self.merge else None
        chunk = getattr(block.module, "_chunk_size", None)
        if m is not None and chunk is not None and module is getattr(block.module, "ff", None):
            m = self._chunk(m, block, chunk)
        if m is not None and x.shape[1] == m.n:
            self._active = m
            args = (merge(x, m), *args[1:])
        return args, kwargs

    def _chunk(self, m: Matching, block: BlockGrid, chunk: int) -> Matching | None:
        # diffusers' feed-forward chunking (set_chunk_feed_forward) calls ``ff`` once per chunk: along
        # the batch, each chunk merges with its own elements' matching; along the tokens no chunk
        # holds the tokens a merge needs, so the feed-forward runs unmerged (said once)
        if getattr(block.module, "_chunk_dim", 0) == 0:
            k = block.ff_calls
            block.ff_calls += 1
            return m.batch(k * chunk, (k + 1) * chunk)
        warn_once(f"merging-ff-chunk:{block.merging.model_name}",
                  f"merge_mlp leaves the feed-forwards of {block.merging.model_name} chunked along the tokens "
                  "(set_chunk_feed_forward(dim=1)) unmerged; chunk along the batch (dim=0) to merge them")
        return None

    def post(self, module, args, output):
        m, self._active = self._active, None
        if m is None or not torch.is_tensor(output):
            return output
        return unmerge(output, m)


def downsample_tokens(x: torch.Tensor, grid: tuple[int, int], factor: int, method: str) -> torch.Tensor:
    """(B, h * w, C) tokens of an (h, w) grid -> (B, h' * w', C) on the grid downsampled by ``factor``.

    ``"nearest"``: ToDo's reference (``F.interpolate(mode="nearest-exact")`` to (h // factor,
    w // factor), at least 1); ``"avg"``: the mean of each factor x factor cell, ragged edge cells
    averaged over the tokens they have (every token counts once). Linear projections commute with
    both, so projecting the downsampled tokens equals downsampling the projected keys and values.
    """
    B, n, C = x.shape
    h, w = grid
    img = x.transpose(1, 2).reshape(B, C, h, w)
    if method == "avg":
        out = F.avg_pool2d(img, factor, factor, ceil_mode=True, count_include_pad=False)
    else:
        out = F.interpolate(img, size=(max(1, h // factor), max(1, w // factor)), mode="nearest-exact")
    return out.flatten(2).transpose(1, 2)
