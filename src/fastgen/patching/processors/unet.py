"""``Attention`` with ``AttnProcessor2_0``: the UNet's self- and cross-attention (SD 1.5, SDXL) and
the VAE's mid-block attention. Cross-attention K/V over the text embeddings come from the
per-generation cache; attention goes through fastgen's op."""

from __future__ import annotations

import torch

from fastgen import ops
from fastgen.patching.core import heads_view, prologue
from fastgen.patching.processors.base import FastgenProcessor


class FastgenAttnProcessor(FastgenProcessor):
    technique = "cross-attention K/V cached per generation, fastgen attention"
    wraps = ("diffusers.models.attention_processor", "AttnProcessor2_0")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        state = self.bound(attn)
        config = state.config if state is not None else None
        # only a cross-attention's context is step-invariant: a self-attention given other keys and
        # values (ToDo's downsampled grid) computes them afresh at every call
        cross = encoder_hidden_states is not None and attn.is_cross_attention
        cached = cross and config is not None and config.cache_cross_attention_kv and state.kv_cache.open
        # an attention mask (the token refiner's, a user's) runs upstream: fastgen's op takes none
        if (state is None or attention_mask is not None or args or kwargs or self.unsupported()
                or not (cached or self.kernels_here(hidden_states, config))):
            return self.upstream(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            context = encoder_hidden_states

            def project():
                c = attn.norm_encoder_hidden_states(context) if attn.norm_cross else context
                return attn.to_k(c), attn.to_v(c)

            if cross and config.cache_cross_attention_kv:
                mods = (attn.to_k, attn.to_v) + ((attn.norm_cross,) if attn.norm_cross else ())
                key, value = state.kv_cache.get(attn, context, project, mods)
            else:
                key, value = project()

        head_dim = key.shape[-1] // attn.heads
        q, k = prologue(heads_view(query, head_dim), heads_view(key, head_dim), attn.norm_q, attn.norm_k, None,
                        None, config)
        out = ops.attention(q, k, heads_view(value, head_dim), backend=config.attention_backend,
                            autotune=config.autotune)
        hidden_states = out.transpose(1, 2).flatten(2).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
