"""The FractalGen model (arXiv 2502.17437) as plain PyTorch modules, with the parameter layout of the
official LTH14/fractalgen checkpoints, so ``load_state_dict(torch.load(path)["model"])`` loads them.

Parameter layout (a level's modules nest under ``next_fractal`` once per level below the top; the
last ``next_fractal`` is the pixel head). ``D_k``: level k's width; ``C``: the width of the
conditions a level reads (``D_{k-1}``, or ``D_0`` at the top); ``L``: tokens; ``T = 3 p^2``: values
per token; ``c``: ``num_conds``; ``g``: 1 with a guiding pixel, else 0::

    class_emb.weight                       (num_classes, D_0)    models/fractalgen.py
    fake_latent                            (1, D_0)              the unconditional "class"
    generator.*                            level 0
    next_fractal.generator.*               level 1
    next_fractal.next_fractal.*            ... the pixel head after the last level

    MAR level (models/mar.py):
      mask_token (1, 1, D)   patch_emb.{weight,bias} (D, T)   patch_emb_ln.{weight,bias}
      cond_emb.{weight,bias} (D, C)   pix_proj.{weight,bias} (D, 3) [g]   pos_embed_learned (1, L + c + g, D)
      blocks.{i}.norm1, .attn.qkv (3D, D, bias), .attn.proj, .norm2, .mlp.fc1 (4D, D), .mlp.fc2   (timm ViT)
      norm   guiding_pixel_loss.* (a pixel head of width 128 reading C) [g]
    AR level (models/ar.py, LlamaGen blocks):
      patch_emb   patch_emb_ln   pos_embed_learned (1, L + 1, D)   cond_emb (D, C)
      blocks.{i}.attention.wqkv (3D, D, no bias), .attention.wo, .feed_forward.w1 / w3 (H, D), .w2 (D, H)
      (SwiGLU, H = ar_hidden(D)), .attention_norm.weight, .ffn_norm.weight (RMSNorm)   norm
    pixel head (models/pixelloss.py):
      cond_proj (W, C)   r_codebook / g_codebook / b_codebook (256, W)   ln   blocks.{i} (as MAR's, causal)
      norm   r_mlm.bias / g_mlm.bias / b_mlm.bias (1, 256)   (logits = h @ codebook.T + bias)

Sequences and conventions (as the official code runs them):

- MAR: ``[guiding pixel; cond_{c-1}; ...; cond_0; tokens]`` (the official code prepends the
  conditions one at a time, so they end up reversed), masked tokens replaced by ``mask_token``,
  plus ``pos_embed_learned``, then ``patch_emb_ln``, the blocks, ``norm``. Each token's output is
  handed to its child with its four neighbours' (top, right, bottom, left; zero at the borders).
- AR: ``[cond_0; token_0; ...; token_{L-2}]`` plus ``pos_embed_learned``, ``patch_emb_ln``, causal
  blocks with 2-D RoPE over the token grid (the condition's rotation is zero, so its query and key
  are zero: the official table's first row), ``norm``; output ``t`` conditions token ``t``.
- pixel head: ``[cond_proj(cond_0); r; g]`` (no positions), ``ln``, causal blocks, ``norm``; output
  ``c`` gives channel ``c``'s logits against that channel's codebook.
- Pixel values are ImageNet-normalised: ``(v / 255 - mean) / std`` per channel.

Level transformers expose a full forward (bidirectional for MAR, causal for AR and the pixel head)
and, for the causal ones, ``decode`` against a ``KVCache`` preallocated once (only new tokens are
computed). Non-causal attention (MAR levels, one-token decoding) goes through
``fastgen.ops.attention``; causal attention over several tokens through
``F.scaled_dot_product_attention``.

Row invariance (why one seed gives one image whatever the sampler): on a CPU every row of every
operation here is computed the same way however many rows a call has, so a sampler that batches
every patch of an iteration into one call computes bit for bit what one patch at a time computes.
Two things are needed for that, both done here: linear layers (``Linear``, ``linear``) never hand the
BLAS fewer rows than a multiple of 4 (MKL's sgemm takes another kernel below 4 rows and splits rows
over threads, giving other roundings), and a ``KVCache`` made with ``queries=True`` attends over the
causal window of cached queries, so a decoded token equals the same token of a full causal forward
(a one-query attention call rounds differently). Elementwise and row-wise ops (norms, softmax, GELU
on widths that are multiples of 8) do not depend on the rows.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.fractal.config import AR, FractalConfig, LevelConfig, PixelHeadConfig, ar_hidden, get_config
from fastgen.ops.attention import attention

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
ROPE_BASE = 10000.0
_LN_EPS = 1e-6
_RMS_EPS = 1e-5
# Rows a CPU GEMM is given come in multiples of this (module docstring): below 4 rows MKL's sgemm uses
# another kernel, and with several threads a share of fewer than 4 rows does too.
ROW_QUANTUM = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose rows do not depend on how many rows the call has: on a CPU, ``x``'s rows
    (all dims but the last, flattened) are padded with zero rows to a multiple of ``ROW_QUANTUM``
    (a copy, only where they are not one already). Elsewhere ``F.linear`` as is."""
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    short = -rows % ROW_QUANTUM
    if not short:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, k)
    out = F.linear(torch.cat([flat, flat.new_zeros(short, k)]), weight, bias)
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by ``linear``: row invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class KVCache:
    """Static key/value buffers of a causal transformer, allocated once and written in place.

    ``k`` and ``v``: ``(depth, batch, heads, length, head_dim)``. A decode call with ``rows`` rows and
    ``n`` new tokens at position ``pos`` writes ``[:, :rows, :, pos:pos+n]`` and attends over
    ``[:, :rows, :, :pos+n]``: one cache serves any batch up to ``batch`` (the first rows), and
    positions beyond ``pos + n`` are never read, so a cache needs no clearing between uses.

    With ``queries=True`` the queries are kept too (``q``, same shape) and a decode call attends
    causally over the whole window ``[0, pos+n)`` of cached queries, returning the new tokens' rows:
    the result equals a full causal forward bit for bit (module docstring), at the cost of
    recomputing attention (not the projections) over the window; for short sequences (the pixel
    heads' 3 tokens).
    """

    def __init__(self, depth: int, batch: int, heads: int, length: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 queries: bool = False):
        shape = (depth, batch, heads, length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.q = torch.zeros(shape, device=device, dtype=dtype) if queries else None

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[3]


def _attend(q, k, v, *, causal: bool, cache: KVCache | None, layer: int, pos: int):
    # q, k, v: (B, H, n, Dh).
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) if causal else attention(q, k, v)
    rows, n = q.shape[0], q.shape[2]
    if rows > cache.batch or pos + n > cache.length:
        raise ValueError(f"decode of {rows} rows at positions {pos}..{pos + n - 1} does not fit a KVCache of "
                         f"batch {cache.batch} and length {cache.length}")
    end = pos + n
    # The cache keeps the weights' dtype; under autocast the projections come in another (as the official
    # KVCache.update: stored in the cache's dtype), and attention runs in the cache's dtype.
    out_dtype, q = q.dtype, q.to(cache.k.dtype)
    cache.k[layer, :rows, :, pos:end] = k
    cache.v[layer, :rows, :, pos:end] = v
    if cache.q is not None:  # the causal window of cached queries: a full forward's rows, exactly
        cache.q[layer, :rows, :, pos:end] = q
        window = [t[layer, :rows, :, :end] for t in (cache.q, cache.k, cache.v)]
        out = F.scaled_dot_product_attention(*window, is_causal=True)[:, :, pos:end]
    elif n == 1:  # one query sees every cached key: no mask
        out = attention(q, cache.k[layer, :rows, :, :end], cache.v[layer, :rows, :, :end])
    else:  # new token i (at pos + i) sees keys up to pos + i
        mask = torch.arange(end, device=q.device) <= torch.arange(pos, end, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, cache.k[layer, :rows, :, :end], cache.v[layer, :rows, :, :end],
                                             attn_mask=mask)
    return out.to(out_dtype)


class _Attention(nn.Module):
    """timm ViT attention: ``qkv`` (with bias) then ``proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim)

    def forward(self, x, *, causal=False, cache=None, layer=0, pos=0):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = _attend(q, k, v, causal=causal, cache=cache, layer=layer, pos=pos)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-6, GELU MLP of 4x width): MAR levels (bidirectional) and
    pixel heads (causal)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x, *, causal=False, cache=None, layer=0, pos=0):
        x = x + self.attn(self.norm1(x), causal=causal, cache=cache, layer=layer, pos=pos)
        return x + self.mlp(self.norm2(x))


class _RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _RMS_EPS)).type_as(x) * self.weight


def rope_2d(grid: int, head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The AR levels' rotary table: ``(1 + grid**2, head_dim // 2, 2)`` (cos, sin), float32; row 0 (the
    condition) is all zero, row ``1 + i * grid + j`` rotates the first half of each head's pairs by
    row ``i`` and the second half by column ``j`` (official ``precompute_freqs_cis_2d``)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # (grid, head_dim // 4)
    grid_angles = torch.cat([angles[:, None, :].expand(-1, grid, -1), angles[None, :, :].expand(grid, -1, -1)], dim=-1)
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(1, half, 2, dtype=torch.float32), table])


def _rotate(x, table):
    # x: (B, n, H, Dh); table: (n, Dh // 2, 2). Pairs (x0, x1) rotate by (cos, sin), in float32.
    xs = x.float().unflatten(-1, (-1, 2))
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class _ARAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wqkv = Linear(dim, 3 * dim, bias=False)
        self.wo = Linear(dim, dim, bias=False)

    def forward(self, x, table, *, cache=None, layer=0, pos=0):
        b, n, c = x.shape
        q, k, v = self.wqkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        q, k = _rotate(q, table), _rotate(k, table)
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, cache=cache,
                      layer=layer, pos=pos)
        return self.wo(out.transpose(1, 2).reshape(b, n, c))


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = ar_hidden(dim)
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ARBlock(nn.Module):
    """LlamaGen block of an AR level: RMSNorm (eps 1e-5), causal attention with 2-D RoPE, SwiGLU."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = _ARAttention(dim, heads)
        self.feed_forward = _FeedForward(dim)
        self.attention_norm = _RMSNorm(dim)
        self.ffn_norm = _RMSNorm(dim)

    def forward(self, x, table, *, cache=None, layer=0, pos=0):
        h = x + self.attention(self.attention_norm(x), table, cache=cache, layer=layer, pos=pos)
        return h + self.feed_forward(self.ffn_norm(h))


def _init_linear_and_norms(module: nn.Module) -> None:
    # The official initialisation (xavier-uniform linears, zero biases, unit norms): the trained
    # weights replace it, but training from scratch (the tiny demo model) starts from it.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _neighbours(mid: torch.Tensor, grid: int) -> torch.Tensor:
    # mid: (B, L, D) on a grid x grid raster -> (B, L, 5, D): own, top, right, bottom, left (zero
    # beyond the borders).
    b, length, d = mid.shape
    g = mid.reshape(b, grid, grid, d)
    padded = F.pad(g, (0, 0, 1, 1, 1, 1))  # (B, grid + 2, grid + 2, D)
    top = padded[:, :-2, 1:-1]
    right = padded[:, 1:-1, 2:]
    bottom = padded[:, 2:, 1:-1]
    left = padded[:, 1:-1, :-2]
    return torch.stack([g, top, right, bottom, left], dim=3).reshape(b, length, 5, d)


class PixelHead(nn.Module):
    """A pixel's R, G, B as 256-way categoricals from one condition feature (official ``PixelLoss``).

    Args:
        config: width, depth, heads.
        cond_width: width of the condition feature (the last level's width; for a guiding pixel the
            width of the conditions of the level it guides).
    """

    def __init__(self, config: PixelHeadConfig, cond_width: int):
        super().__init__()
        w = config.width
        self.config = config
        self.cond_proj = Linear(cond_width, w)
        self.r_codebook = nn.Embedding(256, w)
        self.g_codebook = nn.Embedding(256, w)
        self.b_codebook = nn.Embedding(256, w)
        self.ln = nn.LayerNorm(w, eps=_LN_EPS)
        self.blocks = nn.ModuleList([Block(w, config.heads) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(w, eps=_LN_EPS)
        self.r_mlm = _MlmBias()
        self.g_mlm = _MlmBias()
        self.b_mlm = _MlmBias()
        for emb in (self.r_codebook, self.g_codebook, self.b_codebook):
            nn.init.normal_(emb.weight, std=0.02)
        _init_linear_and_norms(self)

    @property
    def _codebooks(self):
        return (self.r_codebook, self.g_codebook, self.b_codebook)

    def embed(self, cond: torch.Tensor, ids: torch.Tensor | None, start: int = 0, stop: int = 3) -> torch.Tensor:
        """Input tokens ``[start, stop)`` of ``[cond_proj(cond); r; g]``, after ``ln``.

        Args:
            cond: ``(B, C)`` condition feature.
            ids: ``(B, 3)`` int64 channel values in [0, 256) (those at ``>= stop - 1`` are not read);
                may be None when ``stop == 1``.
        Returns:
            ``(B, stop - start, W)``.
        """
        parts = [self.cond_proj(cond)[:, None] if p == 0 else self._codebooks[p - 1](ids[:, p - 1 : p])
                 for p in range(start, stop)]
        return self.ln(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def hidden(self, tokens: torch.Tensor, *, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """Causal blocks and ``norm`` over ``tokens`` ``(B, n, W)`` at positions ``pos ..``: a full
        forward without ``cache`` (then ``pos`` must be 0), else a decode of the new tokens."""
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, causal=True, cache=cache, layer=i, pos=pos)
        return self.norm(tokens)

    def logits(self, hidden: torch.Tensor, channel: int) -> torch.Tensor:
        """float32 ``(..., 256)`` logits of ``channel`` (0 R, 1 G, 2 B) from the hidden state at
        position ``channel``: ``hidden @ codebook.T + bias``, in float32 as the official code."""
        mlm = (self.r_mlm, self.g_mlm, self.b_mlm)[channel]
        return linear(hidden.float(), self._codebooks[channel].weight.float()) + mlm.bias.float()[0]

    def forward(self, cond: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward: ``(B, 3, 256)`` float32 logits of R, G, B given ``ids`` ``(B, 3)`` (channel
        ``c``'s logits read only ``ids[:, :c]``)."""
        h = self.hidden(self.embed(cond, ids, 0, 3))
        return torch.stack([self.logits(h[:, c], c) for c in range(3)], dim=1)

    def new_cache(self, batch: int, *, device=None, dtype=None, queries: bool = False) -> KVCache:
        """A ``KVCache`` for ``batch`` rows and the 3 positions ``[cond; r; g]`` (``queries``: decode
        exactly as the full forward, ``KVCache``)."""
        p = next(self.parameters())
        return KVCache(self.config.depth, batch, self.config.heads, 3, self.config.width // self.config.heads,
                       device=device or p.device, dtype=dtype or p.dtype, queries=queries)


class _MlmBias(nn.Module):
    # The official MlmLayer: only its bias is a parameter (the logits reuse the codebook).
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 256))


_PIXEL_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def pixel_stats(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(3,)`` ImageNet mean and std on ``device``, made once per device: no host-to-device copy
    after the first call (the block sampler's CUDA graphs capture ``ids_to_values``)."""
    device = torch.device(device)
    stats = _PIXEL_STATS.get(device)
    if stats is None:
        with torch.inference_mode(False):  # kept across calls: an ordinary tensor whatever mode made it
            stats = _PIXEL_STATS[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device)
                                                 for v in (PIXEL_MEAN, PIXEL_STD))
    return stats


def ids_to_values(ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Channel values ``(..., 3)`` int in [0, 256) to normalised pixel values ``(v / 255 - mean) / std``."""
    mean, std = pixel_stats(ids.device)
    return ((ids.float() / 255 - mean) / std).to(dtype)


def values_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised images ``(B, 3, H, W)`` to uint8 (``round(clip((x * std + mean) * 255))``; the values
    the samplers produce map back to the sampled channel values exactly)."""
    shape = (1, 3) + (1,) * (images.dim() - 2)
    mean, std = (t.view(shape) for t in pixel_stats(images.device))
    return torch.round(((images.float() * std + mean) * 255).clamp(0, 255)).to(torch.uint8)


def unpatchify(tokens: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """``(B, grid**2, 3 * patch**2)`` raster tokens, each a flattened ``(3, patch, patch)`` sub-patch, to
    ``(B, 3, grid * patch, grid * patch)`` (official ``unpatchify``)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid, grid, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, 3, grid * patch, grid * patch)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, H)`` to raster tokens ``(B, (H / patch)**2, C * patch**2)``: the inverse of ``unpatchify``."""
    b, c, side = images.shape[:3]
    g = side // patch
    return images.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * patch * patch)


class MARLevel(nn.Module):
    """A MAR level (official ``models/mar.py``): bidirectional over ``[guide; conditions; tokens]``
    with the unknown tokens masked.

    Args:
        config: the level.
        cond_width: width of the conditions it reads.
        num_conds: conditions it reads (``FractalConfig.num_conds``).
        guide_head: the guiding pixel's head config (used when ``config.guiding_pixel``).
    """

    kind = "mar"

    def __init__(self, config: LevelConfig, cond_width: int, num_conds: int, guide_head: PixelHeadConfig):
        super().__init__()
        d = config.width
        self.config, self.num_conds = config, num_conds
        self.prefix = num_conds + int(config.guiding_pixel)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_emb = Linear(config.token_dim, d)
        self.patch_emb_ln = nn.LayerNorm(d, eps=_LN_EPS)
        self.cond_emb = Linear(cond_width, d)
        if config.guiding_pixel:
            self.pix_proj = Linear(3, d)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, config.seq_len + self.prefix, d))
        self.blocks = nn.ModuleList([Block(d, config.heads) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(d, eps=_LN_EPS)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        _init_linear_and_norms(self)
        if config.guiding_pixel:  # built after the init above, as the official code (its own init)
            self.guiding_pixel_loss = PixelHead(guide_head, cond_width)

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor, conds: torch.Tensor,
                guide: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's output and its neighbours'.

        Args:
            tokens: ``(B, L, 3 p^2)`` normalised values (read where not masked).
            masked: ``(B, L)`` bool, True where the token is not generated yet.
            conds: ``(B, >= num_conds, C)`` conditions from the parent (or the class embedding).
            guide: ``(B, 3)`` normalised guiding pixel (levels with a guiding pixel only).

        Returns:
            ``(B, L, 5, D)``: own feature, top, right, bottom, left, for every token.
        """
        b = tokens.shape[0]
        prefix = [self.cond_emb(conds[:, : self.num_conds]).flip(1)]  # reversed, as the official prepending
        if self.config.guiding_pixel:
            if guide is None:
                raise ValueError("this level has a guiding pixel: pass guide (B, 3)")
            prefix.insert(0, self.pix_proj(guide)[:, None])
        x = self.patch_emb(tokens)
        x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed_learned
        x = self.patch_emb_ln(x)
        for block in self.blocks:
            x = block(x)
        mid = self.norm(x)[:, self.prefix:]
        return _neighbours(mid, self.config.grid).view(b, self.config.seq_len, 5, -1)


class ARLevel(nn.Module):
    """An AR level (official ``models/ar.py``): causal over ``[cond_0; token_0; ...; token_{L-2}]`` in
    raster order, LlamaGen blocks with 2-D RoPE. The condition it hands each child is the token's own
    output (one condition)."""

    kind = "ar"

    def __init__(self, config: LevelConfig, cond_width: int):
        super().__init__()
        d = config.width
        self.config = config
        self.patch_emb = Linear(config.token_dim, d)
        self.patch_emb_ln = nn.LayerNorm(d, eps=_LN_EPS)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, config.seq_len + 1, d))
        self.cond_emb = Linear(cond_width, d)
        self.blocks = nn.ModuleList([ARBlock(d, config.heads) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(d, eps=_LN_EPS)
        # Neither a parameter nor a buffer (official: a plain attribute, float32 whatever the weights' dtype):
        # made where the weights are on first use, so .to(dtype), to_empty() and meta builds loaded with
        # assign=True (through this module or any parent) never round or leave it uninitialised.
        self._rope: torch.Tensor | None = None
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        _init_linear_and_norms(self)

    @property
    def rope(self) -> torch.Tensor:
        """The float32 rotary table (``rope_2d``) on the weights' device."""
        device = self.patch_emb.weight.device
        if self._rope is None or self._rope.device != device:
            with torch.inference_mode(False):  # kept across calls: an ordinary tensor whatever mode made it
                self._rope = rope_2d(self.config.grid, self.config.width // self.config.heads).to(device)
        return self._rope

    def embed(self, tokens: torch.Tensor, conds: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Input tokens at positions ``[start, stop)`` (default ``stop = L``) after ``patch_emb_ln``:
        position 0 is ``cond_emb(conds[:, 0])``, position ``t > 0`` is ``patch_emb(tokens[:, t-1])``.

        Args:
            tokens: ``(B, L, 3 p^2)`` normalised values (those from ``stop - 1`` on are not read).
            conds: ``(B, >= 1, C)``.
        Returns:
            ``(B, stop - start, D)``.
        """
        stop = self.config.seq_len if stop is None else stop
        parts = []
        if start == 0:
            parts.append(self.cond_emb(conds[:, 0])[:, None])
        if stop > max(start, 1):
            parts.append(self.patch_emb(tokens[:, max(start, 1) - 1 : stop - 1]))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.patch_emb_ln(x + self.pos_embed_learned[:, start:stop])

    def hidden(self, x: torch.Tensor, *, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """Causal blocks and ``norm`` over embedded tokens ``(B, n, D)`` at positions ``pos ..``: a full
        forward without ``cache``, else a decode of the new tokens against it. Returns ``(B, n, D)``."""
        table = self.rope[pos : pos + x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, table, cache=cache, layer=i, pos=pos)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, conds: torch.Tensor) -> torch.Tensor:
        """Full causal forward: ``(B, L, 1, D)``, output ``t`` (the condition of token ``t``) reading
        ``conds[:, 0]`` and ``tokens[:, :t]``."""
        return self.hidden(self.embed(tokens, conds))[:, :, None]

    def new_cache(self, batch: int, *, device=None, dtype=None) -> KVCache:
        """A ``KVCache`` for ``batch`` rows and the level's ``L`` positions."""
        c = self.config
        return KVCache(c.depth, batch, c.heads, c.seq_len, c.width // c.heads, device=device or self.rope.device,
                       dtype=dtype or self.patch_emb.weight.dtype)


class _Subfractal(nn.Module):
    # Levels below the top, nested as the official FractalGen: generator + next_fractal.
    def __init__(self, config: FractalConfig, k: int):
        super().__init__()
        self.generator = _make_level(config, k)
        self.next_fractal = _make_below(config, k)


def _make_level(config: FractalConfig, k: int) -> nn.Module:
    lv = config.levels[k]
    if lv.kind == AR:
        return ARLevel(lv, config.cond_width(k))
    return MARLevel(lv, config.cond_width(k), config.num_conds, config.guide_head)


def _make_below(config: FractalConfig, k: int) -> nn.Module:
    if k + 1 < config.num_levels:
        return _Subfractal(config, k + 1)
    return PixelHead(config.pixel_head, config.levels[-1].width)


class FractalGen(nn.Module):
    """A class-conditional fractal generator (official ``FractalGen``), built from a ``FractalConfig``
    or a preset name; the parameter layout is the official one (module docstring).

    Args:
        config: a ``FractalConfig`` or a name in ``fastgen.fractal.PRESETS``.

    Raises:
        ValueError: for an unknown preset name or a config of another type.
    """

    def __init__(self, config: FractalConfig | str):
        super().__init__()
        if isinstance(config, str):
            config = get_config(config)
        if not isinstance(config, FractalConfig):
            raise ValueError(f"config must be a FractalConfig or a preset name, got {type(config).__name__}")
        self.config = config
        d0 = config.levels[0].width
        self.class_emb = nn.Embedding(config.num_classes, d0)
        self.fake_latent = nn.Parameter(torch.zeros(1, d0))
        self.generator = _make_level(config, 0)
        self.next_fractal = _make_below(config, 0)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.fake_latent, std=0.02)

    @property
    def levels(self) -> list[nn.Module]:
        """The level modules (``MARLevel`` / ``ARLevel``), top first."""
        out, node = [self.generator], self.next_fractal
        while isinstance(node, _Subfractal):
            out.append(node.generator)
            node = node.next_fractal
        return out

    @property
    def pixel_head(self) -> PixelHead:
        node = self.next_fractal
        while isinstance(node, _Subfractal):
            node = node.next_fractal
        return node

    def class_conditions(self, labels: torch.Tensor, guided: bool) -> torch.Tensor:
        """The top level's conditions: ``(B, n, D_0)`` copies of the class embedding (``n = num_conds``
        for a MAR top, 1 for AR), followed with ``guided`` by ``B`` rows of ``fake_latent`` (the
        unconditional half of a CFG batch, as the official sampler lays it out)."""
        n = self.config.num_conds if self.config.levels[0].kind != AR else 1
        emb = self.class_emb(labels)
        if guided:
            emb = torch.cat([emb, self.fake_latent.expand(labels.shape[0], -1)])
        return emb[:, None].expand(-1, n, -1)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that first checks the layout: the published checkpoints'
        ``checkpoint["model"]`` loads as is.

        Raises:
            ValueError: naming the missing and unexpected keys (``strict``) and the keys whose shape
                differs (always), with a hint at the config when the layout does not match.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        bad = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
        if bad and set(state_dict) & {"model", "model_ema", "state_dict"}:
            raise ValueError(f"this looks like a whole checkpoint (keys {sorted(state_dict)[:6]}): pass its "
                             "'model' entry, e.g. torch.load(path)['model']")
        if bad:
            raise ValueError(f"state dict values must be tensors; not tensors: {_few(bad)}")
        expected = self.state_dict()
        prefix = "module."  # saved from a DistributedDataParallel wrapper
        if strict and state_dict and all(k.startswith(prefix) for k in state_dict) and not any(
                k.startswith(prefix) for k in expected):
            raise ValueError("every key starts with 'module.' (saved from a DistributedDataParallel wrapper): strip "
                             "it, e.g. {k.removeprefix('module.'): v for k, v in state_dict.items()}")
        problems = []
        if strict:
            missing = sorted(set(expected) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(expected))
            if missing:
                problems.append(f"missing keys ({len(missing)}): {_few(missing)}")
            if unexpected:
                problems.append(f"unexpected keys ({len(unexpected)}): {_few(unexpected)}")
        shapes = sorted(f"{k}: expected {tuple(v.shape)}, got {tuple(state_dict[k].shape)}"
                        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape)
        if shapes:
            problems.append(f"mis-shaped keys ({len(shapes)}): {_few(shapes)}")
        if problems:
            raise ValueError("state dict does not match this FractalGen's layout ("
                             f"{self.config.num_levels} levels, {[lv.kind for lv in self.config.levels]}, "
                             f"num_conds={self.config.num_conds}); " + "; ".join(problems)
                             + ". A published checkpoint needs the preset it was trained as (fastgen.fractal.PRESETS) "
                             "and its 'model' entry.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_checkpoint(path, *, key: str = "model", map_location="cpu") -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file: an official FractalGen checkpoint (``util/misc.py``
    ``save_model``: ``{"model": ..., "args": argparse.Namespace, ...}``; its ``key`` entry, default
    ``"model"``) or a plain state dict.

    Loaded with ``torch.load(weights_only=True)`` (no arbitrary code from the file), allowing only the
    ``argparse.Namespace`` the official checkpoints hold besides tensors.

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a file that is not a checkpoint of tensors (with torch's reason in one line).
    """
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch's message spans many lines (and colours); its first line says why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        first = re.sub(r"\x1b\[[0-9;]*m", "", first)
        reason = f"{type(exc).__name__}: {first[:160]}"
        if isinstance(exc, (KeyError, pickle.UnpicklingError, EOFError)):  # pickle's reasons say nothing to a user
            reason = "not a file torch.save wrote, or a truncated one"
        raise ValueError(f"{path} is not a PyTorch checkpoint of tensors ({reason})") from None
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
        state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__} without a {key!r} state dict of tensors")
    return dict(state)


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
