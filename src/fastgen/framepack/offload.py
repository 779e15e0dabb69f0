"""Low-VRAM FramePack: the 13B transformer streamed to the GPU a block at a time with diffusers' group
offloading (CUDA streams prefetch the next block while the current one runs), the VAE decoding in
tiles. Peak GPU memory is then one or two transformer blocks, the activations of one packed
section and the VAE's tiles, whatever the video's length (fastgen's sections keep the history on
the device bounded; see ``fastgen.framepack.sampler``).

fastgen's transformer patches run inside the model's own ``forward`` (diffusers hooks and per-instance
methods), so the offloading hooks see every submodule as they would upstream: the two compose in
either order.
"""

from __future__ import annotations

import torch


def enable_low_vram(pipe, device: torch.device | str = "cuda", *, num_blocks_per_group: int = 1,
                    use_stream: bool | None = None, record_stream: bool | None = None, low_cpu_mem_usage: bool = False,
                    vae_tiling: bool = True) -> None:
    """Run ``pipe`` (a ``HunyuanVideoFramepackPipeline``) in little GPU memory: every model group-offloaded
    to the CPU with ``diffusers``' ``enable_group_offload`` (block level), the VAE tiled.

    Args:
        device: where the models run (the onload device); "cuda" by default.
        num_blocks_per_group: transformer blocks onloaded together (1: the least memory).
        use_stream: prefetch the next group on a CUDA stream while the current one runs (default:
            on for a CUDA device; it needs one).
        record_stream: let the prefetched weights be freed as soon as their kernels finish instead of
            at the group's end (default: as ``use_stream``).
        low_cpu_mem_usage: pin host memory group by group as it is needed instead of all up front
            (less host memory, slower).
        vae_tiling: decode in spatial and temporal tiles (``pipe.vae.enable_tiling()``).

    Raises:
        ValueError: for a non-FramePack pipeline, ``num_blocks_per_group`` < 1, or streams on a
            device that is not CUDA.
    """
    if type(pipe).__name__ != "HunyuanVideoFramepackPipeline":
        raise ValueError(f"enable_low_vram takes a HunyuanVideoFramepackPipeline, got {type(pipe).__name__}")
    if isinstance(num_blocks_per_group, bool) or not isinstance(num_blocks_per_group, int) or num_blocks_per_group < 1:
        raise ValueError(f"num_blocks_per_group must be a positive int, got {num_blocks_per_group!r}")
    device = torch.device(device)
    use_stream = device.type == "cuda" if use_stream is None else use_stream
    record_stream = use_stream if record_stream is None else record_stream
    if use_stream and device.type != "cuda":
        raise ValueError(f"use_stream needs a CUDA device, got {device}")
    pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                              num_blocks_per_group=num_blocks_per_group, non_blocking=use_stream,
                              use_stream=use_stream, record_stream=record_stream, low_cpu_mem_usage=low_cpu_mem_usage)
    if vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
