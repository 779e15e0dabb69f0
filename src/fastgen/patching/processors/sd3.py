"""SD3 / SD3.5 ``JointAttnProcessor2_0``: sample and context tokens attend jointly (sample first);
SD3.5 adds QK RMS-norm; dual-attention layers run a second, sample-only attention. Token merging
(``fastgen.merging.dit``) reduces the sample tokens after the QK norm, in both attentions."""

from __future__ import annotations

import torch

from fastgen.patching.core import TokenGroup, joint_attention, reduction_of, unreduced
from fastgen.patching.processors.base import FastgenProcessor


class FastgenJointAttnProcessor(FastgenProcessor):
    technique = "fused qk-norm into a joint query buffer, sample/context K/V as in-place segments"
    wraps = ("diffusers.models.attention_processor", "JointAttnProcessor2_0")

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        state = self.bound(attn)
        reduce = reduction_of(attn, state)  # token merging at this call: fastgen's path wherever it runs
        if (state is None or attention_mask is not None or args or kwargs or self.unsupported()
                or not (reduce is not None or self.kernels_here(hidden_states, state.config))):
            return unreduced(self, reduce, "an attention mask, extra arguments or a diffusers backend / parallel "
                             "config", attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        key = attn.to_k(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        groups = [TokenGroup(attn.to_q(hidden_states), key, attn.to_v(hidden_states), attn.norm_q, attn.norm_k,
                             reduce=reduce)]
        if encoder_hidden_states is not None:
            groups.append(TokenGroup(attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                                     attn.add_v_proj(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k))
        outs = joint_attention(groups, head_dim, state.config)
        hidden_states = outs[0]
        if encoder_hidden_states is not None:
            encoder_hidden_states = outs[1]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
