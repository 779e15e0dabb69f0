"""Tiny configs of every denoiser fastgen patches, built in code (no downloads), with inputs.

Each builder returns ``(model, call)`` where ``call(model)`` runs one forward on fixed inputs and
returns the output tensor. Shapes stay small so Triton's interpreter runs them in about a second.
"""

from __future__ import annotations

import torch

from helpers import DEVICE


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed)).to(DEVICE)


def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 4, 8)).to(DEVICE).eval()
    B, S, T = 2, 16, 7
    img_ids = torch.zeros(S, 3, device=DEVICE)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(S) // 4, torch.arange(S) % 4
    inputs = dict(hidden_states=_r(B, S, 4, seed=1), encoder_hidden_states=_r(B, T, 32, seed=2),
                  pooled_projections=_r(B, 32, seed=3), timestep=torch.full((B,), 0.5, device=DEVICE),
                  img_ids=img_ids, txt_ids=torch.zeros(T, 3, device=DEVICE))
    return m, inputs


def sd3(qk_norm=None, dual=()):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=32,
                              pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32, qk_norm=qk_norm,
                              dual_attention_layers=dual).to(DEVICE).eval()
    B = 2
    inputs = dict(hidden_states=_r(B, 4, 6, 6, seed=1), encoder_hidden_states=_r(B, 9, 32, seed=2),
                  pooled_projections=_r(B, 64, seed=3), timestep=torch.full((B,), 500.0, device=DEVICE))
    return m, inputs


def sd35():
    return sd3(qk_norm="rms_norm", dual=(0,))


def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                             attention_head_dim=2, norm_num_groups=8).to(DEVICE).eval()
    B = 2
    inputs = dict(sample=_r(B, 4, 8, 8, seed=1), timestep=torch.full((B,), 500.0, device=DEVICE),
                  encoder_hidden_states=_r(B, 7, 32, seed=2))
    return m, inputs


def wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                              rope_max_seq_len=32).to(DEVICE).eval()
    B = 2
    inputs = dict(hidden_states=_r(B, 4, 2, 4, 4, seed=1), encoder_hidden_states=_r(B, 9, 16, seed=2),
                  timestep=torch.full((B,), 500.0, device=DEVICE))
    return m, inputs


BUILDERS = {"flux": flux, "sd3": sd3, "sd35": sd35, "unet": unet, "wan": wan}
# Models with cross-attention over the text, whose K/V fastgen caches: (builder, context key)
CROSS = {"unet": "encoder_hidden_states", "wan": "encoder_hidden_states"}


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
