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


def wan_i2v():
    """Wan image-to-video: cross-attention over [image tokens, 512 text tokens] (upstream fixes the
    text length at 512 for I2V), the image context from its own embedder."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                              rope_max_seq_len=32, image_dim=8, added_kv_proj_dim=32).to(DEVICE).eval()
    B = 2
    inputs = dict(hidden_states=_r(B, 4, 2, 4, 4, seed=1), encoder_hidden_states=_r(B, 512, 16, seed=2),
                  encoder_hidden_states_image=_r(B, 5, 8, seed=3), timestep=torch.full((B,), 500.0, device=DEVICE))
    return m, inputs


_HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size_t=1, qk_norm="rms_norm",
                guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 8))


def _text_with_padding(B, T):
    # HunyuanVideo pads the prompt and masks the padding: rows of different real lengths
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[0, T - 2 :] = 0
    mask[-1, T - 4 :] = 0
    return dict(encoder_hidden_states=_r(B, T, 16, seed=2), encoder_attention_mask=mask,
                pooled_projections=_r(B, 8, seed=3), timestep=torch.full((B,), 500.0, device=DEVICE),
                guidance=torch.full((B,), 3.5, device=DEVICE))


def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(patch_size=1, **_HUNYUAN).to(DEVICE).eval()
    return m, dict(hidden_states=_r(2, 4, 2, 4, 4, seed=1), **_text_with_padding(2, 7))


def framepack():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    m = HunyuanVideoFramepackTransformer3DModel(patch_size=2, has_image_proj=True, image_proj_dim=16,
                                                has_clean_x_embedder=True, **_HUNYUAN).to(DEVICE).eval()
    B = 2
    return m, dict(hidden_states=_r(B, 4, 2, 8, 8, seed=1), image_embeds=_r(B, 3, 16, seed=4),
                   indices_latents=torch.arange(1, 3, device=DEVICE), latents_clean=_r(B, 4, 1, 8, 8, seed=5),
                   indices_latents_clean=torch.tensor([0], device=DEVICE),
                   # FramePack's compressed history: 2 frames at 2x, 4 frames at 4x (bigger patch kernels)
                   latents_history_2x=_r(B, 4, 2, 8, 8, seed=6), indices_latents_history_2x=torch.tensor([3, 4], device=DEVICE),
                   latents_history_4x=_r(B, 4, 4, 8, 8, seed=7),
                   indices_latents_history_4x=torch.tensor([5, 6, 7, 8], device=DEVICE), **_text_with_padding(B, 7))


BUILDERS = {"flux": flux, "sd3": sd3, "sd35": sd35, "unet": unet, "wan": wan, "hunyuan": hunyuan,
            "framepack": framepack}
# Models with cross-attention over the text, whose K/V fastgen caches: builder name -> context key
CROSS = {"unet": "encoder_hidden_states", "wan": "encoder_hidden_states", "wan_i2v": "encoder_hidden_states"}
EXTRA = {"wan_i2v": wan_i2v}  # built where a test asks for them, not part of every shared tester


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
