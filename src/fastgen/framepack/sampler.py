"""FramePack's section sampler: a long video a section at a time, each section streamed out decoded as
soon as its frames are final, with memory that does not grow with the video.

diffusers' ``HunyuanVideoFramepackPipeline`` keeps every latent frame made so far and the whole decoded
video until the end (host memory grows with the length; each section concatenates onto both). Here,
with the same random draws in the same order, the same schedules and the same blending:

- the history latents are a rolling buffer of the frames a section can still read (the packed
  context, and the 2*window frames one decode spans);
- the decoded video is never held: after each section, the frames no later section will blend
  (everything outside the ``overlap`` frames at the open end) are handed out (``Section``) and
  dropped; a video of any length holds at most one decode and one overlap of frames;
- the history and the image conditioning are cast to the transformer's dtype once per section (the
  pipeline casts them at every step), so the patched transformer's step-invariant work (history
  packing, pooled RoPE, image projection) is computed once per section and reused at every step.

``sections(pipe, ...)`` is the generator; a patched pipeline's ``__call__`` (``fastgen.patch(pipe)``)
runs the same loop and assembles the full video, which equals the unpatched pipeline's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fastgen.framepack.schedule import (
    INVERTED_ANTI_DRIFTING,
    VANILLA,
    FramePackConfig,
    _positive_int,
    num_sections,
    section_layout,
    window_num_frames,
)


@dataclass
class Section:
    """One section of a FramePack video, handed out as soon as it is made.

    Attributes:
        index: 0-based, in the order sections are made (inverted anti-drifting order makes the end
            of the video first).
        count: sections in the whole video.
        start: position of ``frames``' first frame in the final video (pixel frames).
        frames: the frames that became final with this section, in time order, postprocessed as
            ``output_type`` asks (None for "latent") ("pt": (B, F, C, H, W) in [0, 1]; "np": (B, F, H, W, C); "pil": B
            lists of images). The first section of an inverted video may have none (its frames are
            blended by the next); the last one also carries the frames held back for blending.
        num_frames: how many frames ``frames`` holds.
        latents: (B, C, T, h, w) float32, the latent frames this section made (with the start
            image's latent prepended on the last section of an inverted video, as upstream does).
    """

    index: int
    count: int
    start: int
    frames: object
    num_frames: int
    latents: torch.Tensor


def video_length(n: int, latent_window_size: int, sampling_type: str, vae_scale_factor_temporal: int = 4) -> int:
    """Pixel frames of the video diffusers' pipeline returns for ``n`` sections: decoded sections of
    ``(T - 1) * temporal + 1`` frames blended over ``window_num_frames`` frames, then cut to a
    multiple of the temporal factor plus one.

    Raises:
        ValueError: for a count or size that is not a positive int, or an unknown sampling type.
    """
    n = _positive_int(n, "the number of sections")
    latent_window_size = _positive_int(latent_window_size, "latent_window_size")
    tf = _positive_int(vae_scale_factor_temporal, "vae_scale_factor_temporal")
    sampling_type = getattr(sampling_type, "value", sampling_type)
    if sampling_type not in (VANILLA, INVERTED_ANTI_DRIFTING):
        raise ValueError(f"sampling_type must be {VANILLA!r} or {INVERTED_ANTI_DRIFTING!r}, got {sampling_type!r}")
    return (_blended_length(n, latent_window_size, sampling_type, tf) - 1) // tf * tf + 1


def _blended_length(n: int, w: int, sampling_type: str, tf: int) -> int:
    # before diffusers' final cut (inverted sections are placed counting from this end)
    overlap = window_num_frames(w, tf)

    def decoded(t):
        return (t - 1) * tf + 1

    if sampling_type == INVERTED_ANTI_DRIFTING:
        return decoded(w + (n == 1)) + sum(decoded(2 * w + (k == n - 1)) - overlap for k in range(1, n))
    return decoded(1 + w) + (n - 1) * (decoded(2 * w) - overlap)


class _Stream:
    """Blends decoded sections exactly as diffusers' ``_soft_append`` does, keeping only the
    ``overlap`` frames at the open end, and hands out every frame that no later section changes."""

    def __init__(self, sampling_type: str, overlap: int, blended: int, total: int):
        self.inverted = sampling_type == INVERTED_ANTI_DRIFTING
        self.overlap, self.blended, self.total = overlap, blended, total
        self.pending: torch.Tensor | None = None
        self.out = 0  # frames handed out so far

    def _blend(self, history: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        # diffusers' _soft_append, restricted to the frames around the seam (bit for bit the same math)
        ov = self.overlap
        weights = torch.linspace(1, 0, ov, dtype=history.dtype, device=history.device).view(1, 1, -1, 1, 1)
        return (weights * history[:, :, -ov:] + (1 - weights) * current[:, :, :ov]).to(history)

    def add(self, decoded: torch.Tensor, last: bool) -> tuple[int, torch.Tensor]:
        """(start, frames) final after this decoded section, in time order."""
        ov = self.overlap
        if self.pending is None:
            seam = decoded
        elif self.inverted:  # the new section comes before everything made so far
            if decoded.shape[2] < ov:
                raise RuntimeError(f"a decoded section of {decoded.shape[2]} frames is shorter than the overlap {ov}")
            seam = torch.cat([decoded[:, :, :-ov], self._blend(decoded, self.pending)], dim=2)
        else:
            if decoded.shape[2] < ov:
                raise RuntimeError(f"a decoded section of {decoded.shape[2]} frames is shorter than the overlap {ov}")
            seam = torch.cat([self._blend(self.pending, decoded), decoded[:, :, ov:]], dim=2)
        keep = min(ov, seam.shape[2])
        if last:
            final, self.pending = seam, None
        elif self.inverted:
            final, self.pending = seam[:, :, keep:], seam[:, :, :keep]
        else:
            final, self.pending = seam[:, :, : seam.shape[2] - keep], seam[:, :, seam.shape[2] - keep:]
        n = final.shape[2]
        if self.inverted:  # handed out from the end of the video backwards
            start = self.blended - self.out - n
        else:
            start = self.out
        self.out += n
        # diffusers cuts the finished video to total frames: drop what lies beyond
        stop = min(start + n, self.total)
        final = final[:, :, : max(0, stop - start)]
        return start, final


def _no_frames(decoded: torch.Tensor, output_type: str):
    # an empty section in the layout its output type has: (B, 0, C, H, W), (B, 0, H, W, C), B lists
    B, C, _, H, W = decoded.shape
    if output_type == "pil":
        return [[] for _ in range(B)]
    if output_type == "np":
        return np.zeros((B, 0, H, W, C), dtype=np.float32)
    return decoded.new_zeros((B, 0, C, H, W), dtype=torch.float32)


def _call_args(pipe, kwargs: dict) -> dict:
    """The pipeline call's arguments with diffusers' defaults filled in (its signature, not a copy)."""
    import inspect

    from diffusers import HunyuanVideoFramepackPipeline

    sig = inspect.signature(HunyuanVideoFramepackPipeline.__call__)
    unknown = sorted(set(kwargs) - set(sig.parameters) - {"self"})
    if unknown:
        raise TypeError(f"{type(pipe).__name__}.__call__ got unexpected keyword argument(s) {unknown}")
    bound = sig.bind(pipe, **kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("self")
    return args


@torch.no_grad()
def sections(pipe, image=None, *, output_type: str = "pt", progress: bool = True,
             image_embeds: torch.Tensor | None = None, **kwargs) -> Iterator[Section]:
    """Generate a FramePack video with ``pipe`` (a ``HunyuanVideoFramepackPipeline``, patched or not)
    section by section, each yielded as soon as it is made (``Section``): write its frames out and
    drop them, and a video of any length runs in flat host memory.

    Args:
        pipe: the pipeline; its transformer runs fastgen's kernels where ``fastgen.patch`` put them.
        image: the start image, as the pipeline takes it; None when both ``image_latents`` and
            ``image_embeds`` are given (then the pipeline needs no VAE encoder pass nor image encoder).
        output_type: how ``Section.frames`` come: ``"pt"`` (default), ``"np"`` or ``"pil"``; with
            ``"latent"`` nothing is decoded (``frames`` is None, ``latents`` holds the section).
        progress: a progress bar over sections (beside the pipeline's bar over each section's steps).
        image_embeds: (B, N, image_proj_dim) image-encoder features of the start image, precomputed
            (``pipe.encode_image``); the pipeline's ``image_encoder`` then is not run (may be None).
        **kwargs: the pipeline call's other arguments (``prompt`` / ``prompt_embeds``, ``height``,
            ``width``, ``num_frames``, ``latent_window_size``, ``num_inference_steps``,
            ``sampling_type``, ``last_image``, ``generator``, ...), with its defaults and meaning; not
            ``return_dict``.

    Yields:
        One ``Section`` per section, in the order made (the end of the video first in inverted
        anti-drifting order; ``Section.start`` places the frames).

    Raises:
        ValueError: for a pipeline that is not a ``HunyuanVideoFramepackPipeline``, as its
            ``check_inputs`` does, for ``image_latents`` / ``image_embeds`` that do not match the
            pipeline, the size or the batch, and for an unknown ``output_type``.

    The generation scope (``fastgen.generation``: the cache of step-invariant work) stays open until
    the generator finishes: run it to its end, or ``close()`` it when stopping early.
    """
    if type(pipe).__name__ != "HunyuanVideoFramepackPipeline" and not any(
            c.__name__ == "HunyuanVideoFramepackPipeline" for c in type(pipe).__mro__):
        raise ValueError(f"sections() takes a HunyuanVideoFramepackPipeline, got {type(pipe).__name__}")
    if output_type not in ("pt", "np", "pil", "latent"):
        raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")
    if "return_dict" in kwargs:
        raise ValueError("sections() yields Section objects: return_dict does not apply")
    args = _call_args(pipe, dict(kwargs, image=image, output_type=output_type))
    args["image_embeds"] = image_embeds
    import fastgen  # fastgen.generation: a patched pipeline reuses step-invariant work (a no-op unpatched)

    with fastgen.generation(pipe, args["generator"]):
        yield from _run(pipe, args, progress=progress, decode=output_type != "latent")
    pipe.maybe_free_model_hooks()


@torch.no_grad()
def pipeline_call(pipe, *args, **kwargs):
    """``HunyuanVideoFramepackPipeline.__call__`` run by fastgen's section loop (same arguments, same
    output): what a patched pipeline's call does."""
    from diffusers.pipelines.hunyuan_video.pipeline_output import HunyuanVideoFramepackPipelineOutput

    import inspect

    from diffusers import HunyuanVideoFramepackPipeline

    bound = inspect.signature(HunyuanVideoFramepackPipeline.__call__).bind(pipe, *args, **kwargs)
    call = _call_args(pipe, {k: v for k, v in bound.arguments.items() if k != "self"})
    output_type, return_dict = call["output_type"], call["return_dict"]
    chunks, latents_out = [], []
    # diffusers' latent output is the history after every section: kept only when asked for
    collect = latents_out if output_type == "latent" else None
    for section in _run(pipe, call, progress=True, collect_latents=collect, decode=output_type != "latent",
                        postprocess=False):
        if section.num_frames:
            chunks.append((section.start, section.frames))
    if output_type == "latent":
        video = latents_out
    else:
        chunks.sort(key=lambda c: c[0])
        video = torch.cat([c[1] for c in chunks], dim=2)
        video = pipe.video_processor.postprocess_video(video, output_type=output_type)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (video,)
    return HunyuanVideoFramepackPipelineOutput(frames=video)


def _run(pipe, a: dict, *, progress: bool, collect_latents: list | None = None, decode: bool = True,
         postprocess: bool = True) -> Iterator[Section]:
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import calculate_shift, retrieve_timesteps
    from tqdm.auto import tqdm

    callback = a["callback_on_step_end"]
    tensor_inputs = a["callback_on_step_end_tensor_inputs"]
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    sampling_type = getattr(a["sampling_type"], "value", a["sampling_type"])
    height, width = a["height"], a["width"]
    pipe.check_inputs(a["prompt"], a["prompt_2"], height, width, a["prompt_embeds"], tensor_inputs,
                      a["prompt_template"], a["image"], a["image_latents"], a["last_image"], a["last_image_latents"],
                      sampling_type)
    config = FramePackConfig(latent_window_size=a["latent_window_size"], sampling_type=sampling_type)
    num_frames = _positive_int(a["num_frames"], "num_frames")

    has_neg = a["negative_prompt"] is not None or (
        a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None)
    do_true_cfg = a["true_cfg_scale"] > 1 and has_neg
    pipe._guidance_scale = a["guidance_scale"]
    pipe._attention_kwargs = a["attention_kwargs"]
    pipe._current_timestep = None
    pipe._interrupt = False
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    vae_dtype = pipe.vae.dtype
    prompt = a["prompt"]
    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else a["prompt_embeds"].shape[0]

    # --- conditioning: diffusers' own encoders, in diffusers' order (same random draws) ------------
    def encode(prompt, prompt_2, embeds, pooled, mask):
        e, p, m = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, prompt_template=a["prompt_template"],
                                     num_videos_per_prompt=a["num_videos_per_prompt"], prompt_embeds=embeds,
                                     pooled_prompt_embeds=pooled, prompt_attention_mask=mask, device=device,
                                     max_sequence_length=a["max_sequence_length"])
        return e.to(dtype), p.to(dtype), m.to(dtype)

    prompt_embeds, pooled, mask = encode(prompt, a["prompt_2"], a["prompt_embeds"], a["pooled_prompt_embeds"],
                                         a["prompt_attention_mask"])
    if do_true_cfg:
        neg_embeds, neg_pooled, neg_mask = encode(a["negative_prompt"], a["negative_prompt_2"],
                                                  a["negative_prompt_embeds"], a["negative_pooled_prompt_embeds"],
                                                  a["negative_prompt_attention_mask"])
    image, image_embeds = a["image"], a.get("image_embeds")
    if image is None and (image_embeds is None or a["image_latents"] is None):
        raise ValueError("image is required unless both image_latents and image_embeds are given")
    if image is not None:
        image = pipe.video_processor.preprocess(image, height, width)
    if image_embeds is None:
        image_embeds = pipe.encode_image(image, device=device)
    image_embeds = image_embeds.to(device=device, dtype=dtype)
    last_image = a["last_image"]
    if last_image is not None:
        # diffusers 0.42 averages the two images' embeddings into a variable it never reads: the
        # transformer sees the start image's alone, as here (the original FramePack code averages)
        last_image = pipe.video_processor.preprocess(last_image, height, width)
    generator = a["generator"]
    image_latents = pipe.prepare_image_latents(image, dtype=torch.float32, device=device, generator=generator,
                                               latents=a["image_latents"])
    # as diffusers: the last frame conditions the first section only when given as an image
    # (``last_image_latents`` alone is checked, then not used)
    last_image_latents = None
    if last_image is not None:
        last_image_latents = pipe.prepare_image_latents(last_image, dtype=torch.float32, device=device,
                                                        generator=generator)

    w = config.latent_window_size
    tf = pipe.vae_scale_factor_temporal
    n = num_sections(num_frames, w, tf)
    sizes = list(config.history_sizes)
    C = pipe.transformer.config.in_channels
    lh, lw = height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial
    if image_latents.dim() != 5 or image_latents.shape[1:] != (C, 1, lh, lw) or image_latents.shape[0] != batch_size:
        raise ValueError(f"image_latents of shape {tuple(image_latents.shape)} do not match {C} latent channels at "
                         f"{lh}x{lw} (height {height}, width {width}): expected ({batch_size}, {C}, 1, {lh}, {lw})")
    proj_dim = getattr(pipe.transformer.config, "image_proj_dim", None)
    if image_embeds.dim() != 3 or image_embeds.shape[0] not in (1, batch_size) or (
            proj_dim is not None and image_embeds.shape[-1] != proj_dim):
        raise ValueError(f"image_embeds of shape {tuple(image_embeds.shape)} do not match the transformer: expected "
                         f"(1 or {batch_size}, tokens, {proj_dim})")
    inverted = sampling_type == INVERTED_ANTI_DRIFTING
    # the frames any later section reads: its packed context, and the 2*window (+1) one decode spans
    keep = None if collect_latents is not None else max(config.history_frames, 2 * w + 1)
    history = torch.zeros(batch_size, C, sum(sizes), lh, lw, device=device, dtype=torch.float32)
    generated = 0
    if not inverted:
        history = torch.cat([history, image_latents], dim=2)
        generated = 1
    guidance = torch.tensor([a["guidance_scale"]] * batch_size, dtype=dtype, device=device) * 1000.0
    overlap = window_num_frames(w, tf)
    stream = _Stream(sampling_type, overlap, _blended_length(n, w, sampling_type, tf),
                     video_length(n, w, sampling_type, tf))
    sigmas_arg = a["sigmas"]
    window = window_num_frames(w, tf)

    quiet = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    bar = tqdm(total=n, desc="FramePack sections", unit="section", disable=not progress or quiet)
    try:
        for k in range(n):
            # built as its section starts: the previous section's index tensors, and the packed
            # context and RoPE tables cached on them, go with it (flat memory over sections)
            layout = section_layout(config, n, k)
            if inverted:
                parts = history[:, :, : sum(sizes)].split(sizes, dim=2)
                one_x, rest = parts[0], parts[1:]
                if last_image_latents is not None and layout.first:
                    one_x = last_image_latents
            else:
                parts = history[:, :, -sum(sizes):].split(list(reversed(sizes)), dim=2)
                one_x, rest = parts[-1], tuple(reversed(parts[:-1]))
            # cast once per section: the very same tensors at every step (the pipeline casts per step)
            clean = torch.cat([image_latents, one_x], dim=2).to(dtype)
            history_2x, history_4x = (r.to(dtype) for r in rest)
            latents = pipe.prepare_latents(batch_size, C, height, width, window, dtype=torch.float32, device=device,
                                           generator=generator, latents=None)
            sigmas = np.linspace(1.0, 0.0, a["num_inference_steps"] + 1)[:-1] if sigmas_arg is None else sigmas_arg
            seq_len = latents.shape[2] * latents.shape[3] * latents.shape[4] / pipe.transformer.config.patch_size ** 2
            cfg = pipe.scheduler.config
            mu = min(calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)), float(np.log(7.0)))
            timesteps, steps = retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, sigmas=sigmas, mu=mu)
            warmup = len(timesteps) - steps * pipe.scheduler.order
            pipe._num_timesteps = len(timesteps)
            common = dict(image_embeds=image_embeds, indices_latents=layout.latents, guidance=guidance,
                          latents_clean=clean, indices_latents_clean=layout.clean,
                          latents_history_2x=history_2x, indices_latents_history_2x=layout.history[0],
                          latents_history_4x=history_4x, indices_latents_history_4x=layout.history[1],
                          attention_kwargs=a["attention_kwargs"], return_dict=False)
            with pipe.progress_bar(total=steps) as step_bar:
                for i, t in enumerate(timesteps):
                    if pipe.interrupt:
                        continue
                    pipe._current_timestep = t
                    timestep = t.expand(latents.shape[0])
                    x = latents.to(dtype)
                    noise_pred = pipe.transformer(hidden_states=x, timestep=timestep,
                                                  encoder_hidden_states=prompt_embeds, encoder_attention_mask=mask,
                                                  pooled_projections=pooled, **common)[0]
                    if do_true_cfg:
                        neg = pipe.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=neg_embeds,
                                               encoder_attention_mask=neg_mask, pooled_projections=neg_pooled,
                                               **common)[0]
                        noise_pred = neg + a["true_cfg_scale"] * (noise_pred - neg)
                    latents = pipe.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]
                    if callback is not None:
                        env = {"latents": latents, "prompt_embeds": prompt_embeds}
                        outputs = callback(pipe, i, t, {name: env[name] for name in tensor_inputs})
                        latents = outputs.pop("latents", latents)
                        prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % pipe.scheduler.order == 0):
                        step_bar.update()

            if inverted:
                if layout.last:
                    latents = torch.cat([image_latents, latents], dim=2)
                generated += latents.shape[2]
                history = torch.cat([latents, history], dim=2)
                if keep is not None:
                    history = history[:, :, :keep]
                real = history[:, :, :generated]
                span = slice(0, 2 * w + 1 if layout.last else 2 * w)
            else:
                generated += latents.shape[2]
                history = torch.cat([history, latents], dim=2)
                if keep is not None:
                    history = history[:, :, -keep:]
                real = history[:, :, -min(generated, history.shape[2]):]
                span = slice(-2 * w, None)
            if collect_latents is not None:
                collect_latents.append(real)
            start, frames = 0, None
            if decode:
                current = real if layout.first else real[:, :, span]
                decoded = pipe.vae.decode(current.to(vae_dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
                expect = (current.shape[2] - 1) * tf + 1
                if decoded.shape[2] != expect:
                    raise RuntimeError(f"{type(pipe.vae).__name__} decoded {current.shape[2]} latent frames to "
                                       f"{decoded.shape[2]} frames, not (T - 1) * {tf} + 1 = {expect}: the section "
                                       "loop places frames by that count")
                start, frames = stream.add(decoded, layout.last)
            count = frames.shape[2] if frames is not None else 0
            if postprocess and frames is not None:
                frames = (pipe.video_processor.postprocess_video(frames, output_type=a["output_type"]) if count
                          else _no_frames(frames, a["output_type"]))
            bar.update()
            yield Section(index=k, count=n, start=start, frames=frames, num_frames=count, latents=latents)
    finally:
        bar.close()
        pipe._current_timestep = None


__all__ = ["Section", "VANILLA", "INVERTED_ANTI_DRIFTING", "pipeline_call", "sections", "video_length"]
