"""The attention every patched processor runs: token groups in, per-group outputs out.

A *token group* is a set of tokens with its own q/k/v projections, norms and RoPE table: Flux's
text and image streams, SD3's context and sample, HunyuanVideo's video and text. Upstream
concatenates the groups (``torch.cat`` of q, k and v), normalises, rotates and calls SDPA. Here
each group's fused prologue writes its queries straight into its slice of one joint query buffer,
keys and values are attended as in-place segments (no concatenation), and the joint output splits
back into groups as views.

A group may carry a ``Reduction`` (``TokenGroup.reduce``) over a range of its tokens: token merging
or K/V downsampling (``fastgen.merging.dit``) plugs in there, after the prologue, so every token is
normalised and rotated at its own position before it is merged; this module knows nothing more of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

import fastgen.ops as ops
from fastgen._hooks import places_own_weights
from fastgen._warnings import warn_once
from fastgen.kernels.qk_norm_rope import empty_like_bshd
from fastgen.merging.runtime import REDUCTION
from fastgen.patching.config import PatchConfig

# The prologue's modes (``fastgen.ops.qk_norm_rope``'s ``norm`` and ``rope``), named once for the
# library: RMS-norm over each head's D or over all H*D; RoPE pairs (2i, 2i+1) or (i, i + D/2).
NORM_HEAD, NORM_ALL = "head", "all"
ROPE_INTERLEAVED, ROPE_HALF = "interleaved", "half"


@dataclass
class Norm:
    """An RMS-norm the prologue kernel can fuse: mode ``NORM_HEAD`` (over D) or ``NORM_ALL`` (over H*D)."""

    mode: str
    weight: torch.Tensor | None
    eps: float


def fusable_norm(module, heads: int, head_dim: int, dtype: torch.dtype) -> Norm | None | bool:
    """Norm for ``module``; None if there is no module; False if it cannot be fused."""
    if module is None:
        return None
    from diffusers.models.normalization import RMSNorm

    if isinstance(module, RMSNorm):
        if getattr(module, "bias", None) is not None:
            return False
        shape, weight, eps = tuple(module.dim), module.weight, module.eps
    elif isinstance(module, torch.nn.RMSNorm):
        shape, weight = tuple(module.normalized_shape), module.weight
        eps = module.eps if module.eps is not None else torch.finfo(dtype).eps
    else:
        return False
    if shape == (head_dim,):
        return Norm(NORM_HEAD, weight, eps)
    if shape == (heads * head_dim,):
        return Norm(NORM_ALL, weight, eps)
    return False


def _apply_norm(x: torch.Tensor, module, over_heads: bool) -> torch.Tensor:
    # Unfused: the module itself, on (B, S, H*D) when it normalises over all heads.
    if module is None:
        return x
    if over_heads:
        B, H, S, D = x.shape
        return module(x.transpose(1, 2).flatten(2)).unflatten(-1, (H, D)).transpose(1, 2)
    return module(x)


def prologue(q, k, norm_q, norm_k, rope, out_q, config: PatchConfig):
    """Normalise and rotate q and k (each (B, H, S, D)); q into ``out_q`` if given.

    rope: None or (cos, sin, mode) for these tokens. Returns (q, k) ready for attention.
    """
    B, H, S, D = q.shape
    if norm_q is None and norm_k is None and rope is None:
        if out_q is not None:
            out_q.copy_(q)
            return out_q, k
        return q, k
    out_q = out_q if out_q is not None else empty_like_bshd(q)
    out_k = empty_like_bshd(k)
    cos, sin, mode = rope if rope is not None else (None, None, None)
    nq, nk = fusable_norm(norm_q, H, D, q.dtype), fusable_norm(norm_k, H, D, k.dtype)
    same = (nq is None and nk is None) or (
        isinstance(nq, Norm) and isinstance(nk, Norm) and nq.mode == nk.mode and nq.eps == nk.eps
        and (nq.weight is None) == (nk.weight is None)
    )
    if config.fuse_prologue and same and not (places_own_weights(norm_q) or places_own_weights(norm_k)):
        return ops.qk_norm_rope(
            q, k, q_weight=nq.weight if nq else None, k_weight=nk.weight if nk else None, cos=cos, sin=sin,
            eps=nq.eps if nq else 1e-6, norm=nq.mode if nq else None, rope=mode,
            backend=config.prologue_backend, out=(out_q, out_k), autotune=config.autotune,
        )
    # The modules as upstream runs them, then RoPE (the unfused PyTorch sequence) into the buffers.
    q = _apply_norm(q, norm_q, isinstance(nq, Norm) and nq.mode == NORM_ALL)
    k = _apply_norm(k, norm_k, isinstance(nk, Norm) and nk.mode == NORM_ALL)
    if rope is None:
        return out_q.copy_(q), out_k.copy_(k)
    return ops.qk_norm_rope(q, k, cos=cos, sin=sin, norm=None, rope=mode, backend="torch", out=(out_q, out_k))


class Reduction(Protocol):
    """Fewer tokens in attention for tokens [start, stop) of one group (``TokenGroup.reduce``), applied
    to their queries, keys and values after the prologue (post-norm, post-RoPE), all (B, H, S, D)."""

    start: int
    stop: int

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, S, D) -> (B, H, S', D): the queries attention runs (S' = S where queries stay whole)."""

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, S, D) each -> (B, H, S'', D) each: the keys and values attended."""

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """(B, S', H*D) attention output of the queries -> (B, S, H*D), one row per original token."""


def reduction_of(attn, state) -> Reduction | None:
    """The token reduction the current call of attention module ``attn`` runs with under the patch
    ``state`` (a ``PatchState``, or None: no reduction), or None."""
    entry = attn.__dict__.get(REDUCTION)
    return entry[1] if entry is not None and state is not None and entry[0] is state else None


def unreduced(processor, reduce: Reduction | None, why: str, *args, **kwargs):
    """``processor``'s upstream processor on these inputs; where a reduction was asked for this call
    (``reduce``), it does not happen: said once, with ``why``."""
    if reduce is not None:
        warn_once(f"reduce-upstream:{type(processor).__name__}:{why}",
                  f"{type(processor).__name__}: token merging skips calls with {why} (they run diffusers' "
                  f"{type(processor.original).__name__} unmerged)")
    return processor.upstream(*args, **kwargs)


@dataclass
class TokenGroup:
    """One group's projections (B, S, H*D each), norms and RoPE (cos, sin, mode) or None (the
    tables may cover only the first tokens: the rest are not rotated); ``reduce``: a ``Reduction``
    of some of its tokens."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    norm_q: torch.nn.Module | None = None
    norm_k: torch.nn.Module | None = None
    rope: tuple | None = None
    reduce: Reduction | None = None


def heads_view(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D), a view."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def prefix_key_lengths(mask: torch.Tensor, batch: int, n_keys: int) -> list[int] | None | bool:
    """Per-batch count of valid keys when ``mask`` is a key-padding mask whose valid keys are a
    prefix of the sequence (HunyuanVideo: video tokens, then the prompt's real tokens).

    Returns None when every key is valid, the lengths, or False for any other mask (upstream then
    handles it). Reads the mask on the host once; callers cache the answer per mask tensor.
    """
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, 1, 1, n_keys):
        return False
    m = mask.view(batch, n_keys)
    lengths = m.sum(-1)
    if not torch.equal(m, torch.arange(n_keys, device=m.device)[None] < lengths[:, None]):
        return False
    out = lengths.tolist()
    if min(out) == 0:
        return False  # a row with no key at all: leave SDPA's NaN semantics to upstream
    return None if min(out) == n_keys else out


def project_groups(groups: list[TokenGroup], head_dim: int, config: PatchConfig):
    """Every group's fused prologue, queries written into one joint buffer.

    Returns ``(q_joint, keys, values)``: q_joint (B, H, sum S_i, D) and one (B, H, S_i, D) key and
    value per group (views of the projections where no prologue applies), ready for attention.
    """
    sizes = [g.query.shape[1] for g in groups]
    first = heads_view(groups[0].query, head_dim)
    B, H, _, D = first.shape
    q_joint = None
    if len(groups) > 1:
        q_joint = torch.empty((B, sum(sizes), H, D), dtype=first.dtype, device=first.device).transpose(1, 2)
    keys, values, start = [], [], 0
    for g, n in zip(groups, sizes):
        q, k = heads_view(g.query, head_dim), heads_view(g.key, head_dim)
        out_q = q_joint[:, :, start : start + n] if q_joint is not None else None
        q, k = prologue(q, k, g.norm_q, g.norm_k, g.rope, out_q, config)
        if q_joint is None:
            q_joint = q
        keys.append(k)
        values.append(heads_view(g.value, head_dim))
        start += n
    return q_joint, keys, values


def split_heads_output(out: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """(B, H, S, D) attention output -> one (B, S_i, H*D) view per group."""
    flat = out.transpose(1, 2).flatten(2)
    return list(flat.split(sizes, dim=1)) if len(sizes) > 1 else [flat]


class Segment(NamedTuple):
    """Keys and values attended after the token groups' own: ``kv`` a (k, v) pair, each (B or 1,
    H, N, D) ready for attention (post-norm, post-RoPE), or a ``fastgen.ops.Fp8KV``; ``bias`` added
    to their logits (natural log; ``-inf`` drops the segment)."""

    kv: object
    bias: float = 0.0


def attend_groups(q_joint: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], config: PatchConfig,
                  extra: Sequence[Segment] = ()) -> torch.Tensor:
    """Attention of ``project_groups``' joint queries over every group's keys, then the ``extra``
    segments, each read in place (nothing concatenated). Returns (B, H, sum S_i, D)."""
    segments = list(zip(keys[1:], values[1:])) + [s.kv for s in extra]
    biases = [0.0] * (len(keys) - 1) + [s.bias for s in extra]
    return ops.attention(q_joint, keys[0], values[0], extra_kv=segments or None, extra_bias=biases or None,
                         backend=config.attention_backend, autotune=config.autotune)


def joint_attention(groups: list[TokenGroup], head_dim: int, config: PatchConfig,
                    key_lengths: list[int] | None = None) -> list[torch.Tensor]:
    """Attention of every group's queries over all groups' keys, in group order.

    Equivalent to concatenating the groups along the sequence, normalising, rotating and calling
    SDPA, then splitting. ``key_lengths``: per batch element, how many leading keys of the joint
    sequence are valid (a key-padding mask); the rest are excluded by truncating segments in place.
    Groups with a ``reduce`` attend with their reduced tokens (see ``Reduction``); every output has
    the group's own tokens. Returns one (B, S_i, H*D) tensor per group.
    """
    if any(g.reduce is not None for g in groups):
        return _reduced_attention(groups, head_dim, config, key_lengths)
    sizes = [g.query.shape[1] for g in groups]
    q_joint, keys, values = project_groups(groups, head_dim, config)
    return split_heads_output(_attend(q_joint, keys, values, config, key_lengths), sizes)


def _attend(q_joint, keys, values, config: PatchConfig, key_lengths: list[int] | None) -> torch.Tensor:
    if key_lengths is None:
        return attend_groups(q_joint, keys, values, config)
    parts = []
    for b, length in enumerate(key_lengths):
        segs, start = [], 0
        for k, v in zip(keys, values):
            take = min(max(length - start, 0), k.shape[2])
            if take:
                segs.append((k[b : b + 1, :, :take], v[b : b + 1, :, :take]))
            start += k.shape[2]
        parts.append(ops.attention(q_joint[b : b + 1], *segs[0], extra_kv=segs[1:] or None,
                                   backend=config.attention_backend, autotune=config.autotune))
    # one copy, concatenated in (B, S, H, D) order so the flatten below is a view
    return torch.cat([p.transpose(1, 2) for p in parts]).transpose(1, 2)


def split_group(g: TokenGroup, bounds: Sequence[int]) -> list[TokenGroup]:
    """``g`` cut at token positions ``bounds`` (ascending, inside (0, S); none: one copy) into consecutive
    groups with the same norms, each with its rows of the RoPE tables (None where the tables end before
    it), none with ``g``'s reduction."""
    edges = [0, *bounds, g.query.shape[1]]
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        rope = None
        if g.rope is not None and g.rope[0].shape[0] > a:
            cos, sin, mode = g.rope
            rope = (cos[a:b], sin[a:b], mode)
        out.append(TokenGroup(g.query[:, a:b], g.key[:, a:b], g.value[:, a:b], g.norm_q, g.norm_k, rope))
    return out


def _reduced_attention(groups, head_dim, config, key_lengths):
    # Each reduced range becomes a group of its own (the prologue is per token, so cutting a group
    # changes nothing before the reduction); its outputs are joined back at the end.
    parts, spans = [], []
    for g in groups:
        red = g.reduce
        n = g.query.shape[1]
        if red is None:
            spans.append([len(parts)])
            parts.append(g)
            continue
        if not 0 <= red.start < red.stop <= n:
            raise ValueError(f"a reduction of tokens [{red.start}, {red.stop}) does not fit a group of {n} tokens")
        bounds = [i for i in (red.start, red.stop) if 0 < i < n]
        pieces = split_group(g, bounds)
        pieces[1 if red.start > 0 else 0].reduce = red
        spans.append(list(range(len(parts), len(parts) + len(pieces))))
        parts.extend(pieces)
    sizes = [p.query.shape[1] for p in parts]
    q_joint, keys, values = project_groups(parts, head_dim, config)
    key_sizes = [k.shape[2] for k in keys]
    queries, start = [], 0
    for i, (p, n) in enumerate(zip(parts, sizes)):
        q = q_joint[:, :, start : start + n]
        start += n
        if p.reduce is not None:
            q = p.reduce.queries(q)
            keys[i], values[i] = p.reduce.keys_values(keys[i], values[i])
        queries.append(q)
    out_sizes = [q.shape[2] for q in queries]
    if out_sizes != sizes:  # merged queries: one joint buffer again, in (B, S, H, D) order
        q_joint = torch.cat([q.transpose(1, 2) for q in queries], dim=1).transpose(1, 2)
    if key_lengths is not None:
        key_lengths = [_reduced_length(n, key_sizes, [k.shape[2] for k in keys]) for n in key_lengths]
    outs = split_heads_output(_attend(q_joint, keys, values, config, key_lengths), out_sizes)
    outs = [p.reduce.output(o) if p.reduce is not None else o for p, o in zip(parts, outs)]
    return [outs[s[0]] if len(s) == 1 else torch.cat([outs[i] for i in s], dim=1) for s in spans]


def _reduced_length(length: int, before: list[int], after: list[int]) -> int:
    # A key-padding prefix of `length` keys, counted in the reduced segments: a reduced segment must
    # be wholly valid or wholly padding (HunyuanVideo's video tokens always are valid).
    out, start = 0, 0
    for n, m in zip(before, after):
        take = min(max(length - start, 0), n)
        if n != m and 0 < take < n:
            raise ValueError("a key-padding mask that ends inside reduced tokens cannot be reduced with them")
        out += m if take == n else take
        start += n
    return out
