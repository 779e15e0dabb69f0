"""``fastgen.framepack``: long videos at flat cost per section (FramePack, arXiv 2504.12626).

- ``FramePackConfig``, ``section_layouts``, ``num_sections``, ``latent_paddings``,
  ``packed_tokens``: the packing schedule as data (which history frames get which patch kernel, the
  frame indices of every part of a section, vanilla and inverted anti-drifting order);
- ``fastgen.ops.framepack.patchify_pack`` / ``rope_pool``: the fused kernels (every history rate
  patchified into one context buffer in one launch; RoPE tables pooled to match in one launch);
- ``fastgen.patch(transformer_or_pipe)``: diffusers' ``HunyuanVideoFramepackTransformer3DModel``
  with its history packing fused and reused across the steps of a section (``packing``), and
  ``HunyuanVideoFramepackPipeline`` run by fastgen's section loop (``sampler``);
- ``sections(pipe, image, ...)``: the video a section at a time, each decoded section handed out
  as soon as its frames are final, host memory flat however long the video;
- ``enable_low_vram(pipe, ...)``: diffusers' group offloading with CUDA streams, set up for
  FramePack (``offload``).
"""

from fastgen.framepack.schedule import (
    INVERTED_ANTI_DRIFTING,
    RELEASED_HISTORY,
    SAMPLING_TYPES,
    VANILLA,
    FramePackConfig,
    SectionLayout,
    latent_paddings,
    num_sections,
    packed_tokens,
    section_layout,
    section_layouts,
    window_num_frames,
)
from fastgen.framepack.offload import enable_low_vram
from fastgen.framepack.sampler import Section, sections, video_length

__all__ = ["FramePackConfig", "INVERTED_ANTI_DRIFTING", "RELEASED_HISTORY", "SAMPLING_TYPES", "Section",
           "SectionLayout", "VANILLA", "enable_low_vram", "latent_paddings", "num_sections", "packed_tokens", "section_layout", "section_layouts",
           "sections", "video_length", "window_num_frames"]
