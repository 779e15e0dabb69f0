"""HunyuanVideo (and FramePack's HunyuanVideo) ``HunyuanVideoAttnProcessor2_0``: double-stream
blocks attend video + text jointly (video first, RoPE on video only); single-stream blocks project
the concatenation and rotate its video part. The model's text-padding mask is a per-batch key
prefix: attended exactly by truncating the text segment, with no mask. Token merging
(``fastgen.merging.dit``) reduces the video tokens after RoPE (FramePack: its noisy latents, the last
video tokens; clean and history tokens stay whole); the text is never merged."""

from __future__ import annotations

import torch

from fastgen.patching.core import ROPE_INTERLEAVED, TokenGroup, joint_attention, reduction_of, unreduced
from fastgen.patching.processors.base import FastgenProcessor


class FastgenHunyuanVideoAttnProcessor(FastgenProcessor):
    technique = "fused qk-norm+rope into a joint query buffer, video/text K/V as in-place segments, padding as key lengths"
    wraps = ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        state = self.bound(attn)
        reduce = reduction_of(attn, state)  # token merging at this call: fastgen's path wherever it runs
        if (state is None or self.unsupported()
                or not (reduce is not None or self.kernels_here(hidden_states, state.config))):
            return unreduced(self, reduce, "a diffusers backend / parallel config", *args)
        if image_rotary_emb is not None and not isinstance(image_rotary_emb, (tuple, list)):
            return self.defer("complex RoPE tables are not a layout fastgen reads", *args)
        B = hidden_states.shape[0]
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        n_vid = hidden_states.shape[1]
        lengths = state.key_lengths(attention_mask, B, n_vid + n_txt)
        if lengths is False:
            return unreduced(self, reduce, "an attention mask other than a key-padding prefix", *args)
        rope = None
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            if cos.shape[0] != n_vid:
                return self.defer("RoPE tables that do not cover exactly the video tokens", *args)
            rope = (cos, sin, ROPE_INTERLEAVED)

        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
        query = attn.to_q(x)
        head_dim = query.shape[-1] // attn.heads
        groups = [TokenGroup(query, attn.to_k(x), attn.to_v(x), attn.norm_q, attn.norm_k, rope, reduce)]
        if encoder_hidden_states is not None and not single:
            groups.append(TokenGroup(attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                                     attn.add_v_proj(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k))
        outs = joint_attention(groups, head_dim, state.config, lengths)

        if encoder_hidden_states is None:
            return outs[0], None
        hidden_states, encoder_hidden_states = (outs[0][:, :n_vid], outs[0][:, n_vid:]) if single else outs
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
