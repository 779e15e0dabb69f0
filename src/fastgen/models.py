"""Diffusers models and pipelines of every family fastgen patches, built in code with random weights
(no download), with the inputs of one forward: what the demo, the benchmark suites and the tests run.

Three scales, each for its user:

- ``build_pipeline(family, size)``: whole pipelines (denoiser, a small VAE, a scheduler) at the
  widths of ``SIZES``, with the call's prompt embeddings; ``fastgen demo`` and the pipeline tests.
- ``real_denoisers()`` / ``small_denoisers()``: ``DenoiserSpec`` s of the released configs (Flux-dev,
  SDXL, SD3.5-medium, Wan 2.1 1.3B, HunyuanVideo) and of small CPU stand-ins (Flux, SD 1.5, Wan,
  HunyuanVideo); the benchmark suites.
- ``tiny_denoiser(name, device)``: the smallest configs of every denoiser (SD3 and SD3.5, Wan
  image-to-video and FramePack too), small enough for Triton's interpreter; the shared model tests.

Timing does not depend on weight values, and fastgen's results are compared with the same model
unpatched, so random weights serve all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

FAMILIES = ("flux", "sd3", "sd15", "sdxl", "wan", "hunyuan", "framepack")

# Width knobs and image side per pipeline size. The VAEs downsample 8x like the real ones, so token
# counts are real: Flux at 1024^2 attends over 4096 image tokens. "tiny" is for tests on a CPU, "small"
# the CPU demo's default, "large" (Flux-dev's width, fewer layers) the GPU demo's default.
SIZES = {
    "tiny": dict(heads=2, head_dim=16, layers=1, side=64),
    "small": dict(heads=4, head_dim=32, layers=1, side=256),
    "medium": dict(heads=8, head_dim=128, layers=2, side=512),
    "large": dict(heads=24, head_dim=128, layers=4, side=1024),
}

# --------------------------------------------------------------------------------------------
# VAEs: narrow (16 or 8 channels) but with the real 8x spatial downsampling
# --------------------------------------------------------------------------------------------


def autoencoder_kl(latent_channels: int = 4, flux_style: bool = False):
    """An image ``AutoencoderKL`` (SD 1.5, SDXL; SD3 and Flux with ``flux_style``: a latent shift, which
    their pipelines add back before decoding, of 0, and scale 1),
    4 blocks of 16 channels, 8x downsampling: a (B, 3, H, W) image <-> (B, latent_channels, H/8, W/8)."""
    from diffusers import AutoencoderKL

    kw = dict(shift_factor=0.0, scaling_factor=1.0) if flux_style else {}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, **kw)


def autoencoder_kl_wan(latent_channels: int = 4):
    """Wan's video ``AutoencoderKLWan``, 8 channels wide: 8x spatial, 4x temporal downsampling,
    latents of mean 0 and std 1."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * latent_channels,
                            latents_std=[1.0] * latent_channels)


def autoencoder_kl_hunyuan_video(latent_channels: int = 4):
    """HunyuanVideo's ``AutoencoderKLHunyuanVideo``, 8 channels wide: 8x spatial, 4x temporal
    downsampling, no mid-block attention."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=latent_channels,
                                     down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                     up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                     layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
                                     temporal_compression_ratio=4, mid_block_add_attention=False)


# --------------------------------------------------------------------------------------------
# Pipelines (the demo's)
# --------------------------------------------------------------------------------------------


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def build_pipeline(family: str = "flux", size: str = "small"):
    """(pipeline, call kwargs) of a ``family`` pipeline (one of ``FAMILIES``) at ``size`` (a key of
    ``SIZES``), built on the CPU in float32 with random weights (seed 0), models in eval mode. The
    call holds fixed random prompt embeddings (128 wide; 8 prompt tokens at "tiny", else 77),
    ``height`` and ``width`` in pixels, and the family's guidance; video families add ``num_frames``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    s = SIZES[size]
    heads, hd, layers, side = s["heads"], s["head_dim"], s["layers"], s["side"]
    n_txt = 8 if size == "tiny" else 77  # prompt tokens (Flux takes 512 at full size; the cost is in the image)
    torch.manual_seed(0)
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        axes = (hd // 4, 3 * hd // 8, 3 * hd // 8) if hd >= 32 else (4, 4, 8)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=2 * layers,
                                    attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=128,
                                    pooled_projection_dim=64, axes_dims_rope=axes)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=autoencoder_kl(4, flux_style=True),
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                    guidance_scale=3.5)
    elif family == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        tr = SD3Transformer2DModel(sample_size=side // 8, patch_size=2, in_channels=4, num_layers=2 * layers,
                                   attention_head_dim=hd, num_attention_heads=heads, caption_projection_dim=heads * hd,
                                   joint_attention_dim=128, pooled_projection_dim=64, out_channels=4,
                                   pos_embed_max_size=max(8, side // 16), qk_norm="rms_norm", dual_attention_layers=(0,))
        pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(),
                                        vae=autoencoder_kl(4, flux_style=True),
                                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        text_encoder_3=None, tokenizer_3=None)
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                    negative_prompt_embeds=_rand(1, n_txt, 128, seed=3), negative_pooled_prompt_embeds=_rand(1, 64, seed=4),
                    guidance_scale=5.0)
    elif family == "wan":
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

        vae = autoencoder_kl_wan(4)
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd, in_channels=4,
                                   out_channels=4, text_dim=128, freq_dim=256, ffn_dim=4 * heads * hd, num_layers=2 * layers,
                                   rope_max_seq_len=1024)
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        # Wan runs CFG as two calls with separate embeddings, each reused at every step
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), negative_prompt_embeds=_rand(1, n_txt, 128, seed=3),
                    guidance_scale=5.0, num_frames=5 if size == "tiny" else 17)
    elif family == "hunyuan":
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

        vae = autoencoder_kl_hunyuan_video(4)
        axes = (hd // 4, 3 * hd // 8, 3 * hd // 8) if hd >= 32 else (4, 4, 8)
        tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=hd,
                                            num_layers=layers, num_single_layers=2 * layers, num_refiner_layers=1,
                                            mlp_ratio=4.0, patch_size=1 if size == "tiny" else 2, patch_size_t=1,
                                            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=128,
                                            pooled_projection_dim=64, rope_axes_dim=axes)
        pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae, text_encoder_2=None,
                                    tokenizer_2=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
        mask = torch.ones(1, n_txt, dtype=torch.long)
        mask[:, n_txt * 5 // 8 :] = 0  # a padded prompt, as the LLaMA encoder hands it over
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                    prompt_attention_mask=mask, num_frames=5 if size == "tiny" else 17)
        if size == "tiny":  # video multiplies tokens: keep the interpreter's per-token programs few in tests
            side = 32
    elif family == "framepack":
        pipe, call = _framepack_pipeline(heads, hd, layers, n_txt, size)
        side = call.pop("side")
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

        xl = family == "sdxl"
        width = heads * hd // 2
        unet = UNet2DConditionModel(
            sample_size=side // 8, block_out_channels=(width, 2 * width), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # UNet's legacy `attention_head_dim` is the number of heads: head dim = channels / heads = hd
            cross_attention_dim=128, attention_head_dim=(heads // 2, heads),
            norm_num_groups=8, **(dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                                       projection_class_embeddings_input_dim=64 + 6 * 8) if xl else {}),
        )
        sched = EulerDiscreteScheduler(steps_offset=1)  # as released SD checkpoints configure it (0 is deprecated)
        if xl:
            pipe = StableDiffusionXLPipeline(vae=autoencoder_kl(4), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                             tokenizer_2=None, unet=unet, scheduler=sched)
            call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                        negative_prompt_embeds=_rand(1, n_txt, 128, seed=3),
                        negative_pooled_prompt_embeds=_rand(1, 64, seed=4), guidance_scale=5.0)
        else:
            pipe = StableDiffusionPipeline(vae=autoencoder_kl(4), text_encoder=None, tokenizer=None, unet=unet,
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
            call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), negative_prompt_embeds=_rand(1, n_txt, 128, seed=3),
                        guidance_scale=7.5)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    call.update(height=side, width=side)
    return pipe, call


def _framepack_pipeline(heads: int, hd: int, layers: int, n_txt: int, size: str):
    # HunyuanVideoFramepackPipeline: the FramePack transformer (history embedders, SigLIP image
    # projection), HunyuanVideo's VAE and a small SigLIP image encoder with its processor; prompts
    # come as embeddings (no LLaMA / CLIP text encoders)
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline, HunyuanVideoFramepackTransformer3DModel
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:  # transformers >= 5 names the torchvision-free processor (the other one warns without torchvision)
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    image_dim = 32
    axes = (hd // 4, 3 * hd // 8, 3 * hd // 8) if hd >= 32 else (4, 4, 8)
    tr = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=hd, num_layers=layers,
        num_single_layers=2 * layers, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=128, pooled_projection_dim=64, rope_axes_dim=axes,
        has_image_proj=True, image_proj_dim=image_dim, has_clean_x_embedder=True)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim,
                                                   num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                                   patch_size=8))
    processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    pipe = HunyuanVideoFramepackPipeline(text_encoder=None, tokenizer=None, transformer=tr,
                                         vae=autoencoder_kl_hunyuan_video(4), scheduler=FlowMatchEulerDiscreteScheduler(),
                                         text_encoder_2=None, tokenizer_2=None, image_encoder=encoder,
                                         feature_extractor=processor)
    side = 32 if size == "tiny" else 256  # latent 4x4 at "tiny": the 4x history kernel (8 latent px) pads it
    pixels = (torch.rand(side, side, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    mask = torch.ones(1, n_txt, dtype=torch.long)
    mask[:, n_txt * 5 // 8 :] = 0  # a padded prompt, as the LLaMA encoder hands it over
    call = dict(image=Image.fromarray(pixels.numpy()), prompt_embeds=_rand(1, n_txt, 128, seed=1),
                pooled_prompt_embeds=_rand(1, 64, seed=2), prompt_attention_mask=mask, guidance_scale=9.0,
                num_frames=33 if size == "tiny" else 33 * 3, side=side)
    return pipe, call


# --------------------------------------------------------------------------------------------
# Denoisers at benchmark sizes: real configs, small CPU stand-ins
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenoiserSpec:
    """One denoiser at one size: its diffusers class name, config, the inputs of one forward, and
    how many forwards make a denoising step (2 where CFG runs as separate calls, as Wan does)."""

    name: str
    cls: str  # a diffusers model class, e.g. "FluxTransformer2DModel"
    config: dict
    inputs: Callable  # (device, dtype) -> kwargs of one forward
    forwards_per_step: int = 1

    def build(self, device, dtype) -> torch.nn.Module:
        """The model with random weights, in eval mode, created on ``device`` in ``dtype``."""
        import diffusers

        # Built on the device in the target dtype: a 12B Flux initialises there, with no fp32 copy.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = getattr(diffusers, self.cls)(**self.config)
        finally:
            torch.set_default_dtype(previous)
        # torch's Module.to: diffusers' ModelMixin.to warns about modules to keep in float32 even for a
        # model built in code, which has none (a checkpoint gets its dtype from from_pretrained instead).
        return torch.nn.Module.to(model, device=device, dtype=dtype).eval()


def _randn(device, dtype, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(device, dtype)


def flux_inputs(batch: int, tokens: int, text_tokens: int, channels: int, joint_dim: int, pooled_dim: int,
                guidance: bool) -> Callable:
    """``make(device, dtype)`` -> one forward's kwargs of ``FluxTransformer2DModel``: packed latents
    (batch, tokens, channels) on a square grid of side sqrt(tokens), text (batch, text_tokens,
    joint_dim), pooled text (batch, pooled_dim), timestep 0.5, ids, and guidance 3.5 if ``guidance``."""
    side = int(tokens**0.5)

    def make(device, dtype):
        ids = torch.zeros(tokens, 3, device=device)
        ids[:, 1], ids[:, 2] = torch.arange(tokens) // side, torch.arange(tokens) % side
        kw = dict(hidden_states=_randn(device, dtype, batch, tokens, channels),
                  encoder_hidden_states=_randn(device, dtype, batch, text_tokens, joint_dim),
                  pooled_projections=_randn(device, dtype, batch, pooled_dim),
                  timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                  img_ids=ids, txt_ids=torch.zeros(text_tokens, 3, device=device))
        if guidance:
            kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return kw

    return make


def unet_inputs(batch: int, side: int, channels: int, text_tokens: int, context_dim: int, xl: bool) -> Callable:
    """``make(device, dtype)`` -> one forward's kwargs of ``UNet2DConditionModel``: latents (batch,
    channels, side, side), timestep 500, text (batch, text_tokens, context_dim); SDXL's added
    conditions (1280-wide pooled text, 1024^2 time ids) if ``xl``."""
    def make(device, dtype):
        kw = dict(sample=_randn(device, dtype, batch, channels, side, side),
                  timestep=torch.full((batch,), 500.0, device=device),
                  encoder_hidden_states=_randn(device, dtype, batch, text_tokens, context_dim))
        if xl:
            kw["added_cond_kwargs"] = dict(
                text_embeds=_randn(device, dtype, batch, 1280),
                time_ids=torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=dtype))
        return kw

    return make


def sd3_inputs(batch: int, side: int, channels: int, text_tokens: int, joint_dim: int, pooled_dim: int) -> Callable:
    """``make(device, dtype)`` -> one forward's kwargs of ``SD3Transformer2DModel``: latents (batch,
    channels, side, side), text (batch, text_tokens, joint_dim), pooled text (batch, pooled_dim),
    timestep 500."""
    def make(device, dtype):
        return dict(hidden_states=_randn(device, dtype, batch, channels, side, side),
                    encoder_hidden_states=_randn(device, dtype, batch, text_tokens, joint_dim),
                    pooled_projections=_randn(device, dtype, batch, pooled_dim),
                    timestep=torch.full((batch,), 500.0, device=device))

    return make


def wan_inputs(batch: int, frames: int, height: int, width: int, channels: int, text_tokens: int,
               text_dim: int) -> Callable:
    """``make(device, dtype)`` -> one forward's kwargs of ``WanTransformer3DModel``: latents (batch,
    channels, frames, height, width), text (batch, text_tokens, text_dim), timestep 500."""
    def make(device, dtype):
        return dict(hidden_states=_randn(device, dtype, batch, channels, frames, height, width),
                    encoder_hidden_states=_randn(device, dtype, batch, text_tokens, text_dim),
                    timestep=torch.full((batch,), 500.0, device=device))

    return make


def hunyuan_video_inputs(batch: int, frames: int, height: int, width: int, channels: int, text_tokens: int,
                         real_text_tokens: int, text_dim: int, pooled_dim: int) -> Callable:
    """``make(device, dtype)`` -> one forward's kwargs of ``HunyuanVideoTransformer3DModel``: latents
    (batch, channels, frames, height, width), timestep 500, text (batch, text_tokens, text_dim) of
    which the first ``real_text_tokens`` are unmasked (the rest is padding), pooled text (batch,
    pooled_dim), guidance 6."""
    def make(device, dtype):
        mask = torch.zeros(batch, text_tokens, dtype=torch.long, device=device)
        mask[:, :real_text_tokens] = 1  # the prompt's real tokens; the rest is padding, masked
        return dict(hidden_states=_randn(device, dtype, batch, channels, frames, height, width),
                    timestep=torch.full((batch,), 500.0, device=device),
                    encoder_hidden_states=_randn(device, dtype, batch, text_tokens, text_dim),
                    encoder_attention_mask=mask, pooled_projections=_randn(device, dtype, batch, pooled_dim),
                    guidance=torch.full((batch,), 6.0, device=device, dtype=dtype))

    return make


# The released checkpoints' configs.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# The released SD 1.5 UNet (stable-diffusion-v1-5, unet/config.json): diffusers' defaults but for the
# 768-wide CLIP text embeddings.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  eps=1e-6, rope_max_seq_len=1024)
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_axes_dim=(16, 56, 56))
# lllyasviel/FramePackI2V_HY's transformer (HunyuanVideo 13B with FramePack's history embedders and the
# SigLIP image projection): diffusers' HunyuanVideoFramepackTransformer3DModel defaults but for these three.
FRAMEPACK_I2V_HY = dict(HUNYUAN_VIDEO, has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True)
# FramePack's image encoder (SigLIP so400m-patch14-384, lllyasviel/flux_redux_bfl): its width and its 27 x 27
# = 729 image tokens; one layer instead of 27 (a stand-in: its cost is not what the benchmarks measure).
SIGLIP_SO400M_STANDIN = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                             image_size=384, patch_size=14)


def real_denoisers() -> list[DenoiserSpec]:
    """The released configs at their usual sizes (issue #3): Flux-dev, SDXL (CFG batch of 2) and
    SD3.5-medium (CFG batch) at 1024^2, Wan 2.1 1.3B at 480p with 33 frames (CFG as 2 calls),
    HunyuanVideo at 544x960 with 33 frames."""
    return [
        DenoiserSpec("flux-dev 1024^2", "FluxTransformer2DModel", FLUX_DEV,
                     flux_inputs(1, 4096, 512, 64, 4096, 768, True)),
        DenoiserSpec("sdxl 1024^2 cfg", "UNet2DConditionModel", SDXL_UNET, unet_inputs(2, 128, 4, 77, 2048, True)),
        DenoiserSpec("sd3.5-medium 1024^2 cfg", "SD3Transformer2DModel", SD35_MEDIUM,
                     sd3_inputs(2, 128, 16, 333, 4096, 2048)),
        DenoiserSpec("wan2.1-1.3b 480p 33f cfg", "WanTransformer3DModel", WAN21_1_3B,
                     wan_inputs(1, 9, 60, 104, 16, 512, 4096), forwards_per_step=2),
        # 544x960, 33 frames: 9 latent frames x 34 x 60 patches = 18360 video tokens + 256 text
        DenoiserSpec("hunyuanvideo 544x960 33f", "HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO,
                     hunyuan_video_inputs(1, 9, 68, 120, 16, 256, 40, 4096, 768)),
    ]


def small_denoisers() -> list[DenoiserSpec]:
    """Small stand-ins of Flux (256^2), SD 1.5 (256^2, CFG batch), Wan (CFG as 2 calls) and
    HunyuanVideo for a CPU, where a run shows what patching costs, not kernel speed."""
    return [
        DenoiserSpec("flux small 256^2", "FluxTransformer2DModel",
                     dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                          axes_dims_rope=(8, 12, 12)),
                     flux_inputs(1, 256, 32, 16, 64, 32, False)),
        DenoiserSpec("sd15 small 256^2 cfg", "UNet2DConditionModel",
                     dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                          attention_head_dim=(1, 2), norm_num_groups=8),
                     unet_inputs(2, 32, 4, 77, 64, False)),
        DenoiserSpec("wan small cfg", "WanTransformer3DModel",
                     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                          out_channels=4, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
                     wan_inputs(1, 3, 16, 16, 4, 32, 32), forwards_per_step=2),
        DenoiserSpec("hunyuanvideo small", "HunyuanVideoTransformer3DModel",
                     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
                          num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                          qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
                          rope_axes_dim=(8, 12, 12)),
                     hunyuan_video_inputs(1, 3, 16, 16, 4, 32, 20, 32, 16)),
    ]


# --------------------------------------------------------------------------------------------
# FramePack at its released size
# --------------------------------------------------------------------------------------------


def framepack_inputs(batch: int, height: int, width: int, channels: int = 16, text_tokens: int = 256,
                     real_text_tokens: int = 40, text_dim: int = 4096, pooled_dim: int = 768, image_tokens: int = 729,
                     image_dim: int = 1152, window: int = 9) -> Callable:
    """``make(device, dtype)`` -> one forward's kwargs of ``HunyuanVideoFramepackTransformer3DModel`` at
    the released packing (``fastgen.framepack.section_layouts``, the first section of a 2-section
    inverted video): noisy latents (batch, channels, window, height / 8, width / 8), the clean (start +
    1x), 2x and 4x history latents at the same latent size with their frame indices, SigLIP image
    tokens (batch, image_tokens, image_dim), text (batch, text_tokens, text_dim) of which the first
    ``real_text_tokens`` are unmasked, pooled text, timestep 500, guidance 10 (x 1000, as the pipeline
    passes it)."""
    from fastgen.framepack.schedule import FramePackConfig, section_layouts

    config = FramePackConfig(latent_window_size=window)
    layout = section_layouts(config, 2)[0]
    lh, lw = height // 8, width // 8

    def make(device, dtype):
        mask = torch.zeros(batch, text_tokens, dtype=torch.long, device=device)
        mask[:, :real_text_tokens] = 1
        def latents(frames, seed):
            return _r(device, batch, channels, frames, lh, lw, seed=seed).to(dtype)

        return dict(hidden_states=latents(window, 1),
                    timestep=torch.full((batch,), 500.0, device=device),
                    encoder_hidden_states=_randn(device, dtype, batch, text_tokens, text_dim),
                    encoder_attention_mask=mask, pooled_projections=_randn(device, dtype, batch, pooled_dim),
                    image_embeds=_randn(device, dtype, batch, image_tokens, image_dim),
                    guidance=torch.full((batch,), 10000.0, device=device, dtype=dtype),
                    indices_latents=layout.latents.to(device),
                    latents_clean=latents(layout.clean.numel(), 2), indices_latents_clean=layout.clean.to(device),
                    latents_history_2x=latents(layout.history[0].numel(), 3),
                    indices_latents_history_2x=layout.history[0].to(device),
                    latents_history_4x=latents(layout.history[1].numel(), 4),
                    indices_latents_history_4x=layout.history[1].to(device))

    return make


def framepack_denoiser(height: int = 608, width: int = 640) -> DenoiserSpec:
    """FramePackI2V_HY's transformer (13B, ``FRAMEPACK_I2V_HY``) at ``height`` x ``width`` pixels
    (default 640 wide, 608 high: 13680 noisy, 3040 clean, 380 2x and 400 4x tokens per step)."""
    return DenoiserSpec(f"framepack-i2v-hy {width}x{height}", "HunyuanVideoFramepackTransformer3DModel",
                        FRAMEPACK_I2V_HY, framepack_inputs(1, height, width))


def framepack_i2v_pipeline(device, dtype, height: int = 608, width: int = 640):
    """(pipeline, call kwargs) of FramePack image-to-video at its released size, random weights: the
    13B transformer built on ``device`` in ``dtype`` (``framepack_denoiser``), a one-layer SigLIP
    stand-in of the released width and token count (``SIGLIP_SO400M_STANDIN``) and the narrow
    HunyuanVideo VAE (``autoencoder_kl_hunyuan_video``: the real 8x spatial and 4x temporal
    compression, 8 channels wide instead of 128-512) at 16 latent channels, both on ``device`` in
    ``dtype``. The call holds a random ``width`` x ``height`` start image, 256 prompt tokens 4096
    wide of which 40 are real, 768-wide pooled text, guidance 10 (the released default), height and
    width; no ``num_frames`` (the caller's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
    from PIL import Image
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:  # transformers >= 5 names the torchvision-free processor (the other one warns without torchvision)
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    torch.manual_seed(0)
    transformer = framepack_denoiser(height, width).build(device, dtype)
    encoder = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M_STANDIN)).eval().to(device, dtype)
    side = SIGLIP_SO400M_STANDIN["image_size"]
    vae = torch.nn.Module.to(autoencoder_kl_hunyuan_video(FRAMEPACK_I2V_HY["in_channels"]).eval(), device, dtype)
    pipe = HunyuanVideoFramepackPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                         scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None,
                                         tokenizer_2=None, image_encoder=encoder,
                                         feature_extractor=SiglipImageProcessor(size={"height": side, "width": side}))
    pixels = (torch.rand(height, width, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    mask = torch.zeros(1, 256, dtype=torch.long)
    mask[:, :40] = 1  # a padded prompt, as the LLaMA encoder hands it over
    call = dict(image=Image.fromarray(pixels.numpy()), prompt_embeds=_rand(1, 256, 4096, seed=1).to(device, dtype),
                pooled_prompt_embeds=_rand(1, 768, seed=2).to(device, dtype), prompt_attention_mask=mask.to(device),
                guidance_scale=10.0, height=height, width=width)
    return pipe, call


# --------------------------------------------------------------------------------------------
# Tiny denoisers: every supported model at the smallest size that exercises its attention paths
# --------------------------------------------------------------------------------------------


def _r(device, *shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _tiny_flux(device):
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 4, 8))
    B, S, T = 2, 16, 7
    img_ids = torch.zeros(S, 3, device=device)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(S) // 4, torch.arange(S) % 4
    return m, dict(hidden_states=_r(device, B, S, 4, seed=1), encoder_hidden_states=_r(device, B, T, 32, seed=2),
                   pooled_projections=_r(device, B, 32, seed=3), timestep=torch.full((B,), 0.5, device=device),
                   img_ids=img_ids, txt_ids=torch.zeros(T, 3, device=device))


def _tiny_sd3(device, qk_norm=None, dual=()):
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=32,
                              pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32, qk_norm=qk_norm,
                              dual_attention_layers=dual)
    B = 2
    return m, dict(hidden_states=_r(device, B, 4, 6, 6, seed=1), encoder_hidden_states=_r(device, B, 9, 32, seed=2),
                   pooled_projections=_r(device, B, 64, seed=3), timestep=torch.full((B,), 500.0, device=device))


def _tiny_sd35(device):
    return _tiny_sd3(device, qk_norm="rms_norm", dual=(0,))


def _tiny_unet(device):
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                             attention_head_dim=2, norm_num_groups=8)
    B = 2
    return m, dict(sample=_r(device, B, 4, 8, 8, seed=1), timestep=torch.full((B,), 500.0, device=device),
                   encoder_hidden_states=_r(device, B, 7, 32, seed=2))


_TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _tiny_wan(device):
    from diffusers import WanTransformer3DModel

    B = 2
    return WanTransformer3DModel(**_TINY_WAN), dict(hidden_states=_r(device, B, 4, 2, 4, 4, seed=1),
                                                    encoder_hidden_states=_r(device, B, 9, 16, seed=2),
                                                    timestep=torch.full((B,), 500.0, device=device))


def _tiny_wan_i2v(device):
    # Wan image-to-video: cross-attention over [image tokens, 512 text tokens] (upstream fixes the
    # text length at 512 for I2V), the image context from its own embedder.
    from diffusers import WanTransformer3DModel

    B = 2
    m = WanTransformer3DModel(**_TINY_WAN, image_dim=8, added_kv_proj_dim=32)
    return m, dict(hidden_states=_r(device, B, 4, 2, 4, 4, seed=1),
                   encoder_hidden_states=_r(device, B, 512, 16, seed=2),
                   encoder_hidden_states_image=_r(device, B, 5, 8, seed=3),
                   timestep=torch.full((B,), 500.0, device=device))


_TINY_HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                     num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size_t=1, qk_norm="rms_norm",
                     guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 8))


def _text_with_padding(device, B, T):
    # HunyuanVideo pads the prompt and masks the padding: rows of different real lengths
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[0, T - 2 :] = 0
    mask[-1, T - 4 :] = 0
    return dict(encoder_hidden_states=_r(device, B, T, 16, seed=2), encoder_attention_mask=mask,
                pooled_projections=_r(device, B, 8, seed=3), timestep=torch.full((B,), 500.0, device=device),
                guidance=torch.full((B,), 3.5, device=device))


def _tiny_hunyuan(device):
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(patch_size=1, **_TINY_HUNYUAN)
    return m, dict(hidden_states=_r(device, 2, 4, 2, 4, 4, seed=1), **_text_with_padding(device, 2, 7))


def _tiny_framepack(device):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    m = HunyuanVideoFramepackTransformer3DModel(patch_size=2, has_image_proj=True, image_proj_dim=16,
                                                has_clean_x_embedder=True, **_TINY_HUNYUAN)
    B = 2
    return m, dict(hidden_states=_r(device, B, 4, 2, 8, 8, seed=1), image_embeds=_r(device, B, 3, 16, seed=4),
                   indices_latents=torch.arange(1, 3, device=device), latents_clean=_r(device, B, 4, 1, 8, 8, seed=5),
                   indices_latents_clean=torch.tensor([0], device=device),
                   # FramePack's compressed history: 2 frames at 2x, 4 frames at 4x (bigger patch kernels)
                   latents_history_2x=_r(device, B, 4, 2, 8, 8, seed=6),
                   indices_latents_history_2x=torch.tensor([3, 4], device=device),
                   latents_history_4x=_r(device, B, 4, 4, 8, 8, seed=7),
                   indices_latents_history_4x=torch.tensor([5, 6, 7, 8], device=device),
                   **_text_with_padding(device, B, 7))


_TINY = {"flux": _tiny_flux, "sd3": _tiny_sd3, "sd35": _tiny_sd35, "unet": _tiny_unet, "wan": _tiny_wan,
         "wan_i2v": _tiny_wan_i2v, "hunyuan": _tiny_hunyuan, "framepack": _tiny_framepack}
TINY_DENOISERS = tuple(_TINY)


def tiny_denoiser(name: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model, inputs) of the tiny ``name`` denoiser (one of ``TINY_DENOISERS``: flux, sd3, sd35
    (QK RMS-norm, a dual-attention layer), unet (SD 1.5 layout), wan, wan_i2v (512 text tokens and 5
    image tokens), hunyuan (padded prompts of different lengths), framepack (clean latents and
    2x/4x history)), built in float32 with seed 0 and moved to ``device`` in eval mode; batch 2,
    heads of 16 dims, a few to a few dozen tokens: Triton's interpreter runs one forward in about a
    second. ``model(**inputs, return_dict=False)[0]`` is one forward."""
    if name not in _TINY:
        raise ValueError(f"name must be one of {TINY_DENOISERS}, got {name!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    model, inputs = _TINY[name](device)
    return model.to(device).eval(), inputs
