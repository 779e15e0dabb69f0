"""Per-architecture facts, in one place: which denoiser classes fastgen patches, where a pipeline
keeps them, and which upstream attention processors it replaces with which fastgen processor.
Classes are matched by name within diffusers (as tomesd does), so nothing here imports a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastgen.patching.processors.flux import FastgenFluxAttnProcessor
from fastgen.patching.processors.hunyuan import FastgenHunyuanVideoAttnProcessor
from fastgen.patching.processors.sd3 import FastgenJointAttnProcessor
from fastgen.patching.processors.unet import FastgenAttnProcessor
from fastgen.patching.processors.wan import FastgenWanAttnProcessor


@dataclass(frozen=True)
class Architecture:
    name: str  # short name, e.g. for the demo's --model-family
    model_classes: tuple[str, ...]  # denoiser classes (diffusers names)
    processors: dict[str, type] = field(default_factory=dict)  # upstream processor name -> fastgen's
    # submodules whose output depends only on the prompt (not the step): reused while the very same
    # embeddings tensor comes in, so cross-attention downstream sees one context tensor all along
    step_invariant: tuple[str, ...] = ()
    # a submodule returning (..., text, image) whose two contexts the model's forward joins as
    # torch.concat([image, text], dim=1) and uses only so: the join is done (and reused) by its hook,
    # which returns (..., joined, None), so the joined context is one tensor all generation long
    joined_context: str = ""
    # token merging (fastgen.merging.dit): how a forward's image/video token grid (F, H, W) is read
    # ("ids": Flux's img_ids rows and columns; "latent": the latent's (F,) H, W over the config's
    # patch sizes; "": not a DiT fastgen merges in), and the self-attentions over those tokens that
    # merge (module path patterns, ``*`` for a block index; the block is the path's parent)
    token_grid: str = ""
    merge_attention: tuple[str, ...] = ()
    # FramePack's history packing (fastgen.framepack.packing): fused multi-rate patchify and pooled
    # RoPE, computed once per section
    history_packing: bool = False


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("sd15/sdxl", ("UNet2DConditionModel",), {"AttnProcessor2_0": FastgenAttnProcessor}),
    # attn2: the sample-only second attention of SD3.5's dual-attention layers
    Architecture("sd3", ("SD3Transformer2DModel",),
                 {"JointAttnProcessor2_0": FastgenJointAttnProcessor, "AttnProcessor2_0": FastgenAttnProcessor},
                 token_grid="latent", merge_attention=("transformer_blocks.*.attn", "transformer_blocks.*.attn2")),
    Architecture("flux", ("FluxTransformer2DModel",), {"FluxAttnProcessor": FastgenFluxAttnProcessor},
                 token_grid="ids", merge_attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")),
    # attn2 is the cross-attention over the text: not merged
    Architecture("wan", ("WanTransformer3DModel",), {"WanAttnProcessor": FastgenWanAttnProcessor},
                 step_invariant=("condition_embedder.text_embedder", "condition_embedder.image_embedder"),
                 # WanTransformer3DModel.forward: encoder_hidden_states = torch.concat([image, text], dim=1)
                 joined_context="condition_embedder", token_grid="latent", merge_attention=("blocks.*.attn1",)),
    # The token refiner's Attention (AttnProcessor2_0) runs with a square mask: left to upstream, never merged.
    Architecture("hunyuanvideo", ("HunyuanVideoTransformer3DModel",),
                 {"HunyuanVideoAttnProcessor2_0": FastgenHunyuanVideoAttnProcessor,
                  "AttnProcessor2_0": FastgenAttnProcessor},
                 token_grid="latent",
                 merge_attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")),
    # FramePack's HunyuanVideo: the same blocks; its image projection (SigLIP features -> tokens) and
    # its history packing do not depend on the step
    Architecture("framepack", ("HunyuanVideoFramepackTransformer3DModel",),
                 {"HunyuanVideoAttnProcessor2_0": FastgenHunyuanVideoAttnProcessor,
                  "AttnProcessor2_0": FastgenAttnProcessor},
                 step_invariant=("image_projection",), token_grid="latent",
                 merge_attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
                 history_packing=True),
)

# The VAE is patched only on request (PatchConfig.include_vae).
VAE = Architecture("vae", ("AutoencoderKL",), {"AttnProcessor2_0": FastgenAttnProcessor})


def architecture_of(model) -> Architecture | None:
    name = type(model).__name__
    for arch in ARCHITECTURES + (VAE,):
        if name in arch.model_classes:
            return arch
    return None


def supported_models() -> list[str]:
    return [c for arch in ARCHITECTURES for c in arch.model_classes]


def replacement_for(arch: Architecture, processor) -> type | None:
    """fastgen's processor for this upstream processor, or None (left alone)."""
    cls = type(processor)
    if not cls.__module__.startswith("diffusers."):
        return None
    return arch.processors.get(cls.__name__)
