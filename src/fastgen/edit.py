"""KV-Edit: background-preserving editing on Flux (arXiv 2502.17363).

    editor = fastgen.edit.KVEditor(flux_pipe)
    out = editor.edit(image, mask, "a cat on a sofa", "a dog on a sofa")
    out.images[0]

Inversion runs the Euler flow backwards from the source image and keeps, at every step and in
every attention layer, the background tokens' K/V (post-norm, post-RoPE). Denoising then runs
only the foreground tokens: text and foreground queries attend to their fresh K/V plus the
cached background K/V, read in place as one extra attention segment whose logits get
``attn_scale``. The background latents are copied from the source: bit-exact.

The cache can live on the GPU, in (pinned) CPU memory with the next layer's K/V prefetched on a
side stream while the current layer computes, and in fp8. The inversion-free variant keeps one
step's cache (O(1) in the number of steps) and runs two forwards per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fastgen import flux_latents as fl
from fastgen.condition.branches import BranchState, branch_forward
from fastgen.condition.config import ConditionConfig
from fastgen.ops.fp8 import Fp8KV, quantize_kv

CACHE_DTYPES = ("compute", "fp8")


class BackgroundKV:
    """Background K/V per (step, layer): captured by full forwards, supplied to foreground ones.

    ``mode`` is ``"capture"`` (a full forward: keep the background columns of every layer's image
    K/V under ``step``) or ``"use"`` (a foreground forward: attend to ``step``'s entries with
    ``bias``). With ``offload``, entries live on ``storage`` and the next layer's entry is copied
    to the compute device on a side stream while the current one is used: at most two layers'
    background K/V are resident at once (``max_resident`` records it).
    """

    def __init__(self, background: torch.Tensor, storage: torch.device, compute: torch.device, dtype: str = "compute",
                 keep_steps: bool = True):
        self.bg = background  # (N_bg,) long indices of background tokens
        self.storage, self.compute, self.dtype, self.keep_steps = storage, compute, dtype, keep_steps
        self.offload = storage != compute
        self.mode, self.step, self.bias = None, 0, 0.0
        self._entries: dict[tuple[int, int], object] = {}
        self._ready: dict[tuple[int, int], tuple[object, object]] = {}  # prefetched: (entry, event)
        self._stream = torch.cuda.Stream(compute) if (self.offload and compute.type == "cuda") else None
        self.max_resident = 0  # background entries on the compute device at once (offload only)

    # --- storage ---------------------------------------------------------------------------

    def _store(self, k, v):
        k, v = k.index_select(2, self.bg), v.index_select(2, self.bg)
        entry = quantize_kv(k, v) if self.dtype == "fp8" else (k, v)
        if not self.offload:
            return entry
        pin = self.storage.type == "cpu" and torch.cuda.is_available()
        tensors = entry.tensors() if isinstance(entry, Fp8KV) else entry
        moved = [t.to(self.storage, non_blocking=pin) if t.device != self.storage else t.clone() for t in tensors]
        if pin:
            moved = [t.pin_memory() for t in moved]
        return Fp8KV(*moved) if isinstance(entry, Fp8KV) else tuple(moved)

    def _copy_in(self, entry):
        tensors = entry.tensors() if isinstance(entry, Fp8KV) else entry
        # same device (tests on a CPU): a copy anyway, so the offload path runs as on a GPU
        moved = [t.to(self.compute, non_blocking=True) if t.device != self.compute else t.clone() for t in tensors]
        return Fp8KV(*moved) if isinstance(entry, Fp8KV) else tuple(moved)

    def _prefetch(self, key) -> None:
        if key not in self._entries or key in self._ready:
            return
        if self._stream is None:
            self._ready[key] = (self._copy_in(self._entries[key]), None)
        else:
            with torch.cuda.stream(self._stream):
                entry = self._copy_in(self._entries[key])
                event = torch.cuda.Event()
                event.record(self._stream)
            self._ready[key] = (entry, event)

    def _fetch(self, key):
        if not self.offload:
            return self._entries[key]
        self._prefetch(key)
        entry, event = self._ready.pop(key)
        if event is not None:
            current = torch.cuda.current_stream(self.compute)
            current.wait_event(event)
            for t in entry.tensors() if isinstance(entry, Fp8KV) else entry:
                t.record_stream(current)  # freed only once the attention that reads it is done
        self._prefetch((key[0], key[1] + 1))  # the next layer, while this one computes
        self.max_resident = max(self.max_resident, len(self._ready) + 1)  # + the one in use
        return entry

    # --- called by the branch forward in every attention layer ------------------------------

    def attend(self, layer: int, k_img: torch.Tensor, v_img: torch.Tensor) -> list:
        if self.mode == "capture":
            self._entries[(self.step, layer)] = self._store(k_img, v_img)
            return []
        if self.mode == "use" and self.bg.numel():
            return [(self._fetch((self.step, layer)), self.bias)]
        return []

    def begin(self, mode: str, step: int, bias: float = 0.0) -> None:
        if mode == "capture" and not self.keep_steps:
            self._entries.clear()  # inversion-free: one step's cache at a time
        self.mode, self.step, self.bias = mode, step, bias

    @property
    def nbytes(self) -> int:
        total = 0
        for e in self._entries.values():
            total += sum(t.numel() * t.element_size() for t in (e.tensors() if isinstance(e, Fp8KV) else e))
        return total

    def clear(self) -> None:
        self._entries.clear()
        self._ready.clear()


@dataclass
class EditOutput:
    """``images`` as the pipeline's output_type gives them; ``latents`` (1, N, C) packed tokens,
    background equal to the source's; ``stats``: steps, tokens, cache bytes and residency."""

    images: object
    latents: torch.Tensor
    stats: dict = field(default_factory=dict)


class KVEditor:
    """KV-Edit on a ``FluxPipeline`` (its transformer, VAE, scheduler and text encoders).

    Args:
        pipe: a ``FluxPipeline`` (or any pipeline with Flux's components).
        config: attention settings (``ConditionConfig``: attention_backend, prologue_backend,
            fuse_prologue); its condition fields do not apply here.
    """

    def __init__(self, pipe, config: ConditionConfig | None = None):
        from fastgen.condition.pipeline import _check_transformer

        _check_transformer(pipe.transformer)
        self.pipe = pipe
        self.config = ConditionConfig.build(config)

    def _embeds(self, prompt, embeds, pooled, what):
        if embeds is not None:
            if pooled is None:
                raise ValueError(f"{what}_prompt_embeds needs {what}_pooled_prompt_embeds")
            return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
        if prompt is None:
            raise ValueError(f"give {what}_prompt or {what}_prompt_embeds")
        e, p, ids = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.pipe._execution_device)
        return e, p, ids

    def _forward(self, state, z, t, text, guidance, ids):
        embeds, pooled, txt_ids = text
        tr = self.pipe.transformer
        g = torch.full((z.shape[0],), guidance, device=z.device, dtype=torch.float32) if tr.config.guidance_embeds else None
        return branch_forward(tr, state, hidden_states=z, encoder_hidden_states=embeds, pooled_projections=pooled,
                              timestep=t.expand(z.shape[0]).to(z.dtype), img_ids=ids, txt_ids=txt_ids, guidance=g,
                              return_dict=False)[0]

    @torch.no_grad()
    def edit(self, image, mask, source_prompt=None, target_prompt=None, *, source_prompt_embeds=None,
             source_pooled_prompt_embeds=None, target_prompt_embeds=None, target_pooled_prompt_embeds=None,
             num_inference_steps: int = 28, skip_steps: int = 4, inversion_guidance: float = 1.5,
             guidance_scale: float = 5.5, attn_scale: float = 1.0, re_init: bool = False,
             inversion_free: bool = False, cache_device=None, cache_dtype: str = "compute", generator=None,
             output_type: str = "pil") -> EditOutput:
        """Edit the masked region of ``image`` from ``source_prompt`` to ``target_prompt``.

        Args:
            image: PIL image, array (H, W, 3) or tensor (3, H, W) in [0, 1]; sides multiples of 16.
            mask: the region to edit at the image's size (PIL, array or tensor (H, W); nonzero, or
                > 0.5 for floats, marks it). A token is edited if any of its 16 x 16 pixels is.
            source_prompt, target_prompt: text, or the ``*_prompt_embeds`` / ``*_pooled_prompt_embeds``.
            num_inference_steps: the schedule's length (28).
            skip_steps: denoising steps skipped at the start: inversion stops (and editing starts)
                at the schedule's ``skip_steps``-th time (0: from pure noise).
            inversion_guidance, guidance_scale: Flux guidance embedding for inversion and editing.
            attn_scale: added to the logits of background keys for text and foreground queries.
            re_init: start the foreground from fresh noise mixed with the source at the start
                time, instead of the inverted latents.
            inversion_free: no inversion; per step one full source forward (caching that step's
                background K/V only) and one foreground forward; O(1) cache.
            cache_device: where cached K/V live: the transformer's device (default) or ``"cpu"``
                (pinned; the next layer's K/V are prefetched while the current one computes).
            cache_dtype: ``"compute"`` or ``"fp8"`` (e4m3, per-token scales; approximate).
            generator: for the noise of ``re_init`` and ``inversion_free``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        """
        pipe, tr = self.pipe, self.pipe.transformer
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        if not 0 <= skip_steps < num_inference_steps:
            raise ValueError(f"skip_steps must be in [0, {num_inference_steps}), got {skip_steps}")
        x0, (rows, cols) = fl.encode_image(pipe, image, what="image")
        if x0.shape[0] != 1:
            raise ValueError(f"edit one image at a time, got a batch of {x0.shape[0]}")
        height, width = rows * fl.pixels_per_token(pipe), cols * fl.pixels_per_token(pipe)
        fg = fl.token_mask(mask, height, width, fl.pixels_per_token(pipe)).to(x0.device)
        device = x0.device
        compute = torch.device(device)
        storage = torch.device(cache_device) if cache_device is not None else compute
        stats = dict(steps=num_inference_steps - skip_steps, edited_tokens=int(fg.sum()), tokens=rows * cols)
        if not fg.any():  # nothing to edit: the input itself
            stats.update(forwards=0, cache_bytes=0, max_resident_layers=0)
            return EditOutput(self._output_input(image, output_type, x0, height, width), x0, stats)

        src = self._embeds(source_prompt, source_prompt_embeds, source_pooled_prompt_embeds, "source")
        tar = self._embeds(target_prompt, target_prompt_embeds, target_pooled_prompt_embeds, "target")
        sig = self._sigmas(num_inference_steps, rows * cols, device)
        full_ids = fl.grid_ids(rows, cols, device=device)
        fg_idx, bg_idx = fg.nonzero().flatten(), (~fg).nonzero().flatten()
        fg_ids = full_ids[fg_idx]
        bg = BackgroundKV(bg_idx, storage, compute, cache_dtype, keep_steps=not inversion_free)
        state = BranchState.create(tr, [], self.config)
        state.background = bg
        forwards = 0

        def full(z, t, text, guidance, step):
            nonlocal forwards
            bg.begin("capture", step)
            forwards += 1
            return self._forward(state, z, t, text, guidance, full_ids)

        def foreground(z_fg, t, step):
            nonlocal forwards
            bg.begin("use", step, attn_scale)
            forwards += 1
            return self._forward(state, z_fg, t, tar, guidance_scale, fg_ids)

        try:
            noise = None
            if re_init or inversion_free:
                noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device, x0.dtype)
            if inversion_free:
                z = x0.clone()
                for i in range(skip_steps, num_inference_steps):
                    t, dt = sig[i], sig[i + 1] - sig[i]
                    z_src = (1 - t) * x0 + t * noise
                    v_src = full(z_src, t, src, inversion_guidance, 0)
                    z_tar = z[:, fg_idx] + (z_src - x0)[:, fg_idx]
                    v_tar = foreground(z_tar, t, 0)
                    z[:, fg_idx] = z[:, fg_idx] + dt * (v_tar - v_src[:, fg_idx])
                canvas = z
            else:
                z = x0
                for i in range(num_inference_steps - 1, skip_steps - 1, -1):  # Euler, backwards in time
                    z = z + (sig[i] - sig[i + 1]) * full(z, sig[i + 1], src, inversion_guidance, i)
                z_fg = z[:, fg_idx]
                if re_init:
                    t0 = sig[skip_steps]
                    z_fg = t0 * noise[:, fg_idx] + (1 - t0) * x0[:, fg_idx]
                for i in range(skip_steps, num_inference_steps):
                    z_fg = z_fg + (sig[i + 1] - sig[i]) * foreground(z_fg, sig[i], i)
                canvas = x0.clone()
                canvas[:, fg_idx] = z_fg.to(canvas.dtype)
            stats.update(forwards=forwards, cache_bytes=bg.nbytes, max_resident_layers=bg.max_resident)
        finally:
            bg.clear()
            state.clear()
        return EditOutput(self._decode(canvas, height, width, output_type), canvas, stats)

    def _sigmas(self, steps: int, tokens: int, device) -> torch.Tensor:
        """The schedule FluxPipeline would use for this size: (steps + 1,) sigmas ending at 0."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = self.pipe.scheduler
        cfg = sched.config
        mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        retrieve_timesteps(sched, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sched.sigmas.to(device=device, dtype=torch.float32)

    def _decode(self, canvas, height, width, output_type):
        pipe = self.pipe
        if output_type == "latent":
            return canvas
        lat = pipe._unpack_latents(canvas, height, width, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(lat.to(device=pipe.vae.device, dtype=pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    def _output_input(self, image, output_type, x0, height, width):
        if output_type == "latent":
            return x0
        x = fl._image_tensor(self.pipe, image, "image")
        return self.pipe.image_processor.postprocess(x, output_type=output_type)
