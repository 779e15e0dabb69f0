"""The Flux transformer forward with extra K/V: the one forward image conditions and KV-Edit run.

``branch_forward`` is ``FluxTransformer2DModel.forward`` written out against diffusers' own
modules (the blocks' norms, projections and feed-forwards are called as they are, so weights, LoRA
layers and fused projections are the model's), with one extension point in every attention layer:
*K/V providers* (``KVProvider``) see the layer's fresh keys and values (post-norm, post-RoPE) and
may add extra segments for the text and image queries to attend to, each with a logit bias, read
in place by ``fastgen.ops.attention(extra_kv=..., extra_bias=...)``.

Its clients, each in its own module:

- image conditions (``fastgen.condition.branches``): each condition is a token branch that its
  provider runs through the image stream of every block; its K/V are the extra segments, stored at
  a generation's first forward and served at every later one without running the branches;
- KV-Edit (``fastgen.edit``): full forwards record the background tokens' K/V of every layer
  (inversion); foreground-only forwards attend to them as one extra segment (editing).

The K/V caches of both hold entries made by ``cache_entry``, in one of ``CACHE_DTYPES``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import fastgen.ops as ops
from fastgen._hooks import call_as_forward
from fastgen.patching.config import PatchConfig
from fastgen.patching.core import (ROPE_INTERLEAVED, Segment, TokenGroup, attend_groups, heads_view, project_groups,
                                   prologue, split_heads_output)
from fastgen.patching.processors.flux import split_rope

__all__ = ["CACHE_DTYPES", "Forward", "KVProvider", "Layer", "Segment", "branch_forward", "cache_entry",
           "check_transformer", "entry_tensors", "rope_of"]

# Cached K/V: in the transformer's dtype, or e4m3 with one scale per token and head
# (``fastgen.ops.Fp8KV``, dequantized inside the attention kernel).
CACHE_DTYPES = ("compute", "fp8")


def cache_entry(k: torch.Tensor, v: torch.Tensor, dtype: str) -> object:
    """A (k, v) pair (B or 1, H, N, D) to keep past this forward: a ``fastgen.ops.Fp8KV`` for
    ``dtype="fp8"``, else the pair itself (copied out when it is a view into a larger buffer, such
    as a fused QKV projection, which it would otherwise keep alive whole)."""
    if dtype == "fp8":
        return ops.quantize_kv(k, v)
    return tuple(t.clone(memory_format=torch.contiguous_format)
                 if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t for t in (k, v))


def entry_tensors(entry) -> tuple[torch.Tensor, ...]:
    """The tensors of a cached entry: (k, v), or an ``Fp8KV``'s values and scales."""
    return entry.tensors() if isinstance(entry, ops.Fp8KV) else tuple(entry)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@dataclass
class Forward:
    """One call of ``branch_forward``, as its providers see it.

    ``hidden_states`` (B, N, C), ``pooled_projections`` (B, P) and ``guidance`` (B,) or None are
    the call's arguments; ``config`` its attention settings. ``dtype`` (the compute dtype: the
    embedded tokens'), ``batch`` and ``n_txt`` (text tokens) are set once the inputs are embedded,
    before the first layer.
    """

    model: torch.nn.Module
    hidden_states: torch.Tensor
    pooled_projections: torch.Tensor
    guidance: torch.Tensor | None
    config: PatchConfig
    dtype: torch.dtype | None = None
    batch: int = 0
    n_txt: int = 0


@dataclass
class Layer:
    """One attention layer of a forward: ``index`` counts the double-stream blocks, then the
    single-stream ones. ``keys`` / ``values``: the layer's fresh K/V per token group, each (B, H, S,
    D) post-norm and post-RoPE: [text, image] in a double-stream block, [text + image] in a
    single-stream one."""

    index: int
    block: torch.nn.Module
    double: bool
    forward: Forward
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None

    def image_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tokens' fresh (k, v), each (B, H, N_img, D)."""
        if self.double:
            return self.keys[1], self.values[1]
        n = self.forward.n_txt
        return self.keys[0][:, :, n:], self.values[0][:, :, n:]

    def project(self, hidden: torch.Tensor, temb: torch.Tensor, rope) -> tuple[TokenGroup, tuple]:
        """This block's image stream up to attention, for tokens ``hidden`` (B, N, C) under their
        embedding ``temb`` and RoPE tables ``rope`` (``rope_of``): their ``TokenGroup`` and what
        ``finish`` takes after attention."""
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        block, attn = self.block, self.block.attn
        if self.double:
            normed, *pending = block.norm1(hidden, emb=temb)
        else:
            normed, gate = block.norm(hidden, emb=temb)
            pending = (block.act_mlp(block.proj_mlp(normed)), gate)
        q, k, v, *_ = _get_qkv_projections(attn, normed, None)
        return TokenGroup(q, k, v, attn.norm_q, attn.norm_k, rope), tuple(pending)

    def qkv(self, group: TokenGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A group's q, k, v (B, H, N, D) ready for attention: its prologue under the forward's config."""
        d = self.block.attn.head_dim
        q, k = prologue(heads_view(group.query, d), heads_view(group.key, d), group.norm_q, group.norm_k, group.rope,
                        None, self.forward.config)
        return q, k, heads_view(group.value, d)

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor, pending: tuple) -> torch.Tensor:
        """This block's image-stream update after attention (``attn_out`` (B, N, H*D)), as upstream
        writes it: the new hidden states (B, N, C)."""
        block = self.block
        if self.double:
            gate_msa, shift_mlp, scale_mlp, gate_mlp = pending
            h = hidden + gate_msa.unsqueeze(1) * block.attn.to_out[1](block.attn.to_out[0](attn_out.contiguous()))
            n = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            return h + gate_mlp.unsqueeze(1) * block.ff(n)
        mlp, gate = pending
        out = hidden + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_out, mlp], dim=2))
        return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


class KVProvider:
    """What ``branch_forward`` asks of a client. Every method has a default that does nothing; a
    provider overrides what it needs.

    Per call: ``begin_forward`` before any module runs; per attention layer, ``extra_kv``, then
    ``attend``; ``end_forward`` when the call ends, whether it completed or raised. Providers are
    called in the order given, and their segments are attended in that order. A provider with
    tokens of its own (the conditions' branches) runs them through the layer's block with
    ``Layer.project``, ``Layer.qkv`` and ``Layer.finish``.
    """

    def begin_forward(self, forward: Forward) -> None:
        """A forward starts: inside the transformer's forward hooks (its weights are in place) and
        under the call's LoRA scale; nothing has been embedded yet. Check what a cache was made
        under, select adapters, decide what this forward stores or serves."""

    def extra_kv(self, layer: Layer) -> list[Segment]:
        """Extra K/V for this layer's text and image queries, given its fresh K/V (``layer.keys``,
        ``layer.values``, ``layer.image_kv()``), which a provider may also record: keep them as
        ``cache_entry`` makes them (in fp8, or copied out of a larger buffer)."""
        return []

    def attend(self, layer: Layer, q: torch.Tensor, extra: list[Segment]) -> torch.Tensor | None:
        """The layer's attention computed by the provider (an attention mask), or None (default:
        ``q`` over the groups' keys and every provider's ``extra`` segments). ``q`` (B, H, S, D) is
        the text and image queries, in ``layer.keys``' order; return (B, H, S, D)."""
        return None

    def end_forward(self, forward: Forward, completed: bool) -> None:
        """The forward ended (``completed``: it returned; else it raised). Put back what
        ``begin_forward`` changed."""


# --------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------


def check_transformer(transformer, what: str = "conditions", processors: bool = True, pipe=None) -> None:
    """``ValueError`` unless ``transformer`` is a Flux transformer running Flux's own (or fastgen's)
    attention processors (``processors``): the branch forward is written for it. ``pipe``: the
    pipeline it came from, named in the error."""
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from fastgen.patching.processors.flux import FastgenFluxAttnProcessor

    if not isinstance(transformer, FluxTransformer2DModel):
        got = "no transformer" if transformer is None else f"a {type(transformer).__name__}"
        if pipe is not None:
            denoiser = getattr(pipe, "unet", None)
            got = f"a {type(pipe).__name__} with {got}" + (f" (its denoiser is a {type(denoiser).__name__})"
                                                          if transformer is None and denoiser is not None else "")
        raise ValueError(f"{what}: only Flux is supported, i.e. a pipeline whose transformer is a "
                         f"FluxTransformer2DModel (FluxPipeline, or a pipeline built from its components); got {got}")
    if not processors:
        return
    for name, proc in transformer.attn_processors.items():
        if not isinstance(proc, (FluxAttnProcessor, FastgenFluxAttnProcessor)):
            raise ValueError(f"{name} runs {type(proc).__name__}: {what} replace Flux's attention and would "
                             "silently drop it (IP-Adapter?); unload it first")
        if getattr(proc, "_attention_backend", None) is not None:
            raise ValueError(f"{what}: the condition / KV-Edit forward runs fastgen's attention (the config's "
                             f"attention_backend), not the diffusers backend {proc._attention_backend!s} chosen with "
                             "set_attention_backend; call transformer.reset_attention_backend() first")


def rope_of(model, ids: torch.Tensor) -> tuple:
    """Flux's RoPE tables for position ids (N, 3), as the prologue takes them: (cos, sin, mode)."""
    cos, sin = model.pos_embed(ids)
    return cos, sin, ROPE_INTERLEAVED


def _attend(layer: Layer, groups: list[TokenGroup], providers: Sequence[KVProvider]) -> list[torch.Tensor]:
    """The layer's attention over its groups and the providers' segments: one (B, S_i, H*D) per group."""
    q, layer.keys, layer.values = project_groups(groups, layer.block.attn.head_dim, layer.forward.config)
    extra = [s for p in providers for s in p.extra_kv(layer)]
    out = None
    for p in providers:
        mine = p.attend(layer, q, extra)
        if mine is not None and out is not None:
            raise ValueError("two K/V providers each compute the same layer's attention; give one of them")
        out = mine if mine is not None else out
    if out is None:
        out = attend_groups(q, layer.keys, layer.values, layer.forward.config, extra)
    return split_heads_output(out, [g.query.shape[1] for g in groups])


def _double_block(layer: Layer, c, x, temb, rope, providers):
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    block, attn = layer.block, layer.block.attn
    n_txt, n_img = c.shape[1], x.shape[1]
    nx, *pending = block.norm1(x, emb=temb)
    nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
    q, k, v, eq, ek, ev = _get_qkv_projections(attn, nx, nc)
    groups = [TokenGroup(eq, ek, ev, attn.norm_added_q, attn.norm_added_k, split_rope(rope, 0, n_txt)),
              TokenGroup(q, k, v, attn.norm_q, attn.norm_k, split_rope(rope, n_txt, n_txt + n_img))]
    txt_out, img_out = _attend(layer, groups, providers)
    x = layer.finish(x, img_out, tuple(pending))
    c = c + c_gate_msa.unsqueeze(1) * attn.to_add_out(txt_out.contiguous())
    nc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(nc)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, x


def _single_block(layer: Layer, h, temb, rope, providers):
    group, pending = layer.project(h, temb, rope)
    (out,) = _attend(layer, [group], providers)
    return layer.finish(h, out, pending)


def _controlnet_index(blocks, samples, index, repeat=False):
    if repeat:
        return index % len(samples)
    return index // int(math.ceil(len(blocks) / len(samples)))


def branch_forward(
    model,
    providers: Sequence[KVProvider],
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor = None,
    pooled_projections: torch.Tensor = None,
    timestep: torch.Tensor = None,
    img_ids: torch.Tensor = None,
    txt_ids: torch.Tensor = None,
    guidance: torch.Tensor = None,
    joint_attention_kwargs: dict | None = None,
    controlnet_block_samples=None,
    controlnet_single_block_samples=None,
    return_dict: bool = True,
    controlnet_blocks_repeat: bool = False,
    *,
    config: PatchConfig | None = None,
    image_tokens: torch.Tensor | None = None,
):
    """``FluxTransformer2DModel.forward`` (same arguments; the same result without providers) with
    the extra K/V of ``providers`` in every attention layer.

    ``config``: the attention settings (attention and prologue backends, fused prologue); None:
    ``PatchConfig()``'s. ``image_tokens``: (M,) indices of the image tokens to compute, with their
    ids; the others are left out of the forward and their output is zero (an Euler step keeps
    them). The LoRA scale in ``joint_attention_kwargs["scale"]`` is honoured as upstream; other
    attention kwargs (IP-Adapter) are not supported here."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    kwargs = dict(joint_attention_kwargs or {})
    lora_scale = kwargs.pop("scale", 1.0)
    if kwargs:
        raise ValueError(f"joint_attention_kwargs {sorted(kwargs)} are not supported with conditions or KV-Edit")
    fwd = Forward(model, hidden_states, pooled_projections, guidance, config if config is not None else PatchConfig())
    scale_lora_layers(model, lora_scale)
    begun, completed = [], False
    try:
        for p in providers:
            begun.append(p)  # ended even if its begin raises half-way
            p.begin_forward(fwd)
        canvas = None
        if image_tokens is not None:
            canvas, idx = hidden_states, image_tokens.to(hidden_states.device)
            hidden_states = canvas.index_select(1, idx)
        x = model.x_embedder(hidden_states)
        ts = timestep.to(x.dtype) * 1000
        g = guidance.to(x.dtype) * 1000 if guidance is not None else None
        temb = (model.time_text_embed(ts, pooled_projections) if g is None
                else model.time_text_embed(ts, g, pooled_projections))
        c = model.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        if canvas is not None:
            img_ids = img_ids[idx.to(img_ids.device)]
        if img_ids.shape[0] != x.shape[1]:
            raise ValueError(f"{x.shape[1]} image tokens but {img_ids.shape[0]} image ids")
        rope = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        fwd.dtype, fwd.batch, fwd.n_txt = x.dtype, x.shape[0], c.shape[1]

        for i, block in enumerate(model.transformer_blocks):
            # each block inside its forward hooks (block-level offloading onloads it there); the
            # hooks see no inputs, which are fastgen's own objects, already on the compute device
            layer = Layer(i, block, True, fwd)
            c, x = call_as_forward(block, lambda: _double_block(layer, c, x, temb, rope, providers))
            if controlnet_block_samples is not None:
                x = x + controlnet_block_samples[_controlnet_index(model.transformer_blocks, controlnet_block_samples,
                                                                  i, controlnet_blocks_repeat)]
        n_txt, n_double = c.shape[1], len(model.transformer_blocks)
        h = torch.cat([c, x], dim=1)
        cos, sin = rope
        for j, block in enumerate(model.single_transformer_blocks):
            layer = Layer(n_double + j, block, False, fwd)
            h = call_as_forward(block, lambda: _single_block(layer, h, temb, (cos, sin, ROPE_INTERLEAVED), providers))
            if controlnet_single_block_samples is not None:
                k = _controlnet_index(model.single_transformer_blocks, controlnet_single_block_samples, j)
                h = torch.cat([h[:, :n_txt], h[:, n_txt:] + controlnet_single_block_samples[k]], dim=1)
        out = model.proj_out(model.norm_out(h[:, n_txt:], temb))
        if canvas is not None:
            out = out.new_zeros(canvas.shape[0], canvas.shape[1], out.shape[2]).index_copy_(1, idx, out)
        completed = True
    finally:
        for p in begun:
            p.end_forward(fwd, completed)
        unscale_lora_layers(model, lora_scale)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)
