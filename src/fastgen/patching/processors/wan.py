"""Wan 2.x ``WanAttnProcessor``: self-attention with RMS-norm over all heads and Wan's RoPE;
cross-attention over the text (and, for image-to-video, a second attention over the image
context), whose K/V are the same at every step and come from the per-generation cache. Token
merging (``fastgen.merging.dit``) reduces the video tokens of the self-attention after RoPE; the
cross-attention is never merged."""

from __future__ import annotations

import torch

from fastgen import ops
from fastgen.patching.core import ROPE_INTERLEAVED, TokenGroup, heads_view, joint_attention, reduction_of, unreduced
from fastgen.patching.processors.base import FastgenProcessor

try:
    from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections
except ImportError:  # pragma: no cover - then the processor defers to upstream
    _get_qkv_projections = _get_added_kv_projections = None

TEXT_LEN = 512  # upstream hard-codes the text context length for image-to-video


def wan_rope(rotary_emb):
    """Wan's (freqs_cos, freqs_sin), each (1, S, 1, D), as per-pair tables: out[2i] = a c - b s with
    c = cos[2i], s = sin[2i + 1] (upstream indexes them so)."""
    cos, sin = rotary_emb
    if cos.dim() != 4 or cos.shape[0] != 1 or cos.shape[2] != 1:
        return None
    return cos[0, :, 0, 0::2], sin[0, :, 0, 1::2], ROPE_INTERLEAVED


class FastgenWanAttnProcessor(FastgenProcessor):
    technique = "fused all-heads qk-norm+rope, cross-attention K/V cached per generation"
    wraps = ("diffusers.models.transformers.transformer_wan", "WanAttnProcessor")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        state = self.bound(attn)
        config = state.config if state is not None else None
        cached = (encoder_hidden_states is not None and config is not None and config.cache_cross_attention_kv
                  and state.kv_cache.open)
        reduce = reduction_of(attn, state)  # token merging at this call: fastgen's path wherever it runs
        if (state is None or attention_mask is not None or self.unsupported()
                or not (cached or reduce is not None or self.kernels_here(hidden_states, config))):
            return unreduced(self, reduce, "an attention mask or a diffusers backend / parallel config", *args)
        if _get_qkv_projections is None:
            return self.defer("this diffusers has no transformer_wan._get_qkv_projections (fastgen is tested with "
                              "diffusers 0.42)", *args)
        rope = wan_rope(rotary_emb) if rotary_emb is not None else None
        if rotary_emb is not None and rope is None:
            return self.defer("RoPE tables of a shape other than Wan's (1, S, 1, D)", *args)
        if encoder_hidden_states is None:  # self-attention
            query, key, value = _get_qkv_projections(attn, hidden_states, None)
            (out,) = joint_attention([TokenGroup(query, key, value, attn.norm_q, attn.norm_k, rope, reduce)],
                                     query.shape[-1] // attn.heads, config)
            return attn.to_out[1](attn.to_out[0](out.type_as(query)))

        # The cache is keyed on the tensor the caller passed; its slices are new objects every step.
        context = encoder_hidden_states
        image_ctx = None
        if attn.add_k_proj is not None:
            n_img = encoder_hidden_states.shape[1] - TEXT_LEN
            image_ctx, encoder_hidden_states = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
        query = attn.norm_q(attn.to_q(hidden_states))
        head_dim = query.shape[-1] // attn.heads
        text = encoder_hidden_states

        def text_kv():
            if attn.fused_projections:
                k, v = attn.to_kv(text).chunk(2, dim=-1)
            else:
                k, v = attn.to_k(text), attn.to_v(text)
            return attn.norm_k(k), v

        key, value = self._cached(state, attn, context, text_kv, "text")
        q = heads_view(query, head_dim)
        out = ops.attention(q, heads_view(key, head_dim), heads_view(value, head_dim), backend=config.attention_backend,
                            autotune=config.autotune).transpose(1, 2).flatten(2).type_as(query)
        if image_ctx is not None:

            def image_kv():
                k, v = _get_added_kv_projections(attn, image_ctx)
                return attn.norm_added_k(k), v

            key_img, value_img = self._cached(state, attn, context, image_kv, "image")
            out_img = ops.attention(q, heads_view(key_img, head_dim), heads_view(value_img, head_dim),
                                    backend=config.attention_backend, autotune=config.autotune)
            out = out + out_img.transpose(1, 2).flatten(2).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def _cached(state, attn, context, compute, slot):
        if not state.config.cache_cross_attention_kv:
            return compute()
        mods = tuple(m for m in (getattr(attn, n, None) for n in ("to_k", "to_v", "to_kv", "norm_k", "add_k_proj",
                                                                     "add_v_proj", "to_added_kv", "norm_added_k"))
                     if isinstance(m, torch.nn.Module))
        return state.kv_cache.get(attn, context, compute, mods, slot=slot)
