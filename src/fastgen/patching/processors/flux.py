"""Flux (and every model built of FluxAttention): double-stream blocks attend text + image jointly,
single-stream blocks attend one concatenated stream; QK RMS-norm and RoPE on all tokens. Token
merging (``fastgen.merging.dit``) reduces the image tokens after the prologue: the image part of the
double-stream image group, the trailing image part of the single-stream [text, image] group."""

from __future__ import annotations

import torch

from fastgen.patching.core import ROPE_INTERLEAVED, TokenGroup, joint_attention, reduction_of, unreduced
from fastgen.patching.processors.base import FastgenProcessor

try:  # the upstream projection helper (plain or fused QKV); its absence means a different diffusers
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections
except ImportError:  # pragma: no cover - the processor then always defers to upstream
    _get_qkv_projections = None


def split_rope(image_rotary_emb, start: int, stop: int, mode: str = ROPE_INTERLEAVED):
    """RoPE tables (cos, sin) of the joint sequence, restricted to tokens [start, stop)."""
    if image_rotary_emb is None:
        return None
    cos, sin = image_rotary_emb
    return cos[start:stop], sin[start:stop], mode


class FastgenFluxAttnProcessor(FastgenProcessor):
    technique = "fused qk-norm+rope into a joint query buffer, text/image K/V as in-place segments"
    wraps = ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        state = self.bound(attn)
        reduce = reduction_of(attn, state)  # token merging at this call: fastgen's path wherever it runs
        if (state is None or attention_mask is not None or self.unsupported()
                or not (reduce is not None or self.kernels_here(hidden_states, state.config))):
            return unreduced(self, reduce, "an attention mask or a diffusers backend / parallel config", *args)
        if _get_qkv_projections is None:
            return self.defer("this diffusers has no transformer_flux._get_qkv_projections (fastgen is tested "
                              "with diffusers 0.42)", *args)
        joint_text = encoder_hidden_states is not None
        if image_rotary_emb is not None and not isinstance(image_rotary_emb, (tuple, list)):
            return self.defer("complex RoPE tables are not a layout fastgen reads", *args)
        if joint_text != (attn.added_kv_proj_dim is not None):
            return self.defer("text tokens without their own projections are not a layout fastgen reads", *args)
        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        groups = []
        n_txt = 0
        if joint_text:
            n_txt = eq.shape[1]
            groups.append(TokenGroup(eq, ek, ev, attn.norm_added_q, attn.norm_added_k,
                                     split_rope(image_rotary_emb, 0, n_txt)))
        n_all = n_txt + query.shape[1]
        groups.append(TokenGroup(query, key, value, attn.norm_q, attn.norm_k,
                                 split_rope(image_rotary_emb, n_txt, n_all), reduce))
        outs = joint_attention(groups, attn.head_dim, state.config)

        if joint_text:
            txt, img = outs
            img = attn.to_out[0](img.contiguous())
            img = attn.to_out[1](img)
            txt = attn.to_add_out(txt.contiguous())
            return img, txt
        return outs[0]
