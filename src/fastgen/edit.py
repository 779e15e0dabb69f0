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

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fastgen import flux_latents as fl
from fastgen.condition.branches import BranchState, branch_forward
from fastgen.condition.config import ConditionConfig
from fastgen._hooks import call_as_forward
from fastgen.ops.fp8 import Fp8KV, quantize_kv

CACHE_DTYPES = ("compute", "fp8")


class PinnedArena:
    """Host memory for many cached tensors, carved out of a few large (pinned) chunks.

    PyTorch's pinned-memory allocator rounds every allocation up to a power of two, so an 18 MiB
    per-layer K of Flux-dev would take 32 MiB (~1.8x of a 48 GiB cache). Bump-allocating into
    power-of-two chunks wastes at most the tail of each chunk. ``reset`` reuses the chunks (the
    inversion-free variant overwrites one step's cache with the next).
    """

    CHUNK = 1 << 28  # 256 MiB
    ALIGN = 256

    def __init__(self, pin: bool):
        self.pin = pin
        self.chunks: list[torch.Tensor] = []
        self._chunk, self._offset = 0, 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        size = -(-n // self.ALIGN) * self.ALIGN
        while self._chunk < len(self.chunks) and self._offset + size > self.chunks[self._chunk].numel():
            self._chunk, self._offset = self._chunk + 1, 0
        if self._chunk == len(self.chunks):
            self.chunks.append(torch.empty(max(self.CHUNK, 1 << (size - 1).bit_length()), dtype=torch.uint8,
                                           pin_memory=self.pin))
        out = self.chunks[self._chunk][self._offset : self._offset + n].view(dtype).view(shape)
        self._offset += size
        return out

    def reset(self) -> None:
        self._chunk, self._offset = 0, 0

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)


def _tensors(entry) -> tuple[torch.Tensor, ...]:
    return entry.tensors() if isinstance(entry, Fp8KV) else tuple(entry)


def _like(entry, tensors):
    return Fp8KV(*tensors) if isinstance(entry, Fp8KV) else tuple(tensors)


class BackgroundKV:
    """Background K/V per (step, layer): captured by full forwards, supplied to foreground ones.

    ``mode`` is ``"capture"`` (a full forward: keep the background columns of every layer's image
    K/V under ``step``) or ``"use"`` (a foreground forward: attend to ``step``'s entries with
    ``bias``). With ``offload``, entries live on ``storage`` (host memory: a ``PinnedArena``) and
    move on a side stream, overlapping the compute: captured K/V are copied out as soon as they
    exist, and while one layer attends to its entry the next layer's is copied in, so at most
    two layers' background K/V are on the compute device at once (``max_resident`` records it).
    """

    def __init__(self, background: torch.Tensor, storage: torch.device, compute: torch.device, dtype: str = "compute",
                 keep_steps: bool = True, offload: bool | None = None):
        self.bg = background  # (N_bg,) long indices of background tokens
        self.storage, self.compute, self.dtype, self.keep_steps = storage, compute, dtype, keep_steps
        self.offload = storage != compute if offload is None else offload  # forced: tests on a CPU
        self.mode, self.step, self.bias = None, 0, 0.0
        self._entries: dict[tuple[int, int], object] = {}
        self._ready: dict[tuple[int, int], tuple[object, object]] = {}  # prefetched: (entry, event)
        self._stream = torch.cuda.Stream(compute) if (self.offload and compute.type == "cuda") else None
        self._arena = PinnedArena(pin=self._stream is not None) if storage.type == "cpu" else None
        self.max_resident = 0  # background entries on the compute device at once (offload only)

    # --- storage ---------------------------------------------------------------------------

    def _store(self, k, v):
        k, v = k.index_select(2, self.bg), v.index_select(2, self.bg)
        entry = quantize_kv(k, v) if self.dtype == "fp8" else (k, v)
        if not self.offload:
            return entry
        src = _tensors(entry)
        if self._arena is None:  # another device
            return _like(entry, [t.to(self.storage) for t in src])
        dst = [self._arena.empty(t.shape, t.dtype) for t in src]
        if self._stream is None:
            for d, t in zip(dst, src):
                d.copy_(t)
        else:  # copy out on the side stream once the forward has produced k and v
            self._stream.wait_stream(torch.cuda.current_stream(self.compute))
            with torch.cuda.stream(self._stream):
                for d, t in zip(dst, src):
                    d.copy_(t, non_blocking=True)
                    t.record_stream(self._stream)  # not reused before the copy is done
        return _like(entry, dst)

    def _copy_in(self, entry):
        # same device (tests on a CPU): a copy anyway, so the offload path runs as on a GPU
        return _like(entry, [t.to(self.compute, non_blocking=True) if t.device != self.compute else t.clone()
                             for t in _tensors(entry)])

    def _prefetch(self, key) -> None:
        if key not in self._entries or key in self._ready:
            return
        if self._stream is None:
            self._ready[key] = (self._copy_in(self._entries[key]), None)
        else:  # the side stream is in order: copies in follow the copies out of the same memory
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
            for t in _tensors(entry):
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
        if mode == "capture" and not self.keep_steps:  # inversion-free: one step's cache at a time
            self._entries.clear()
            if self._arena is not None:
                self._arena.reset()  # safe: the side stream reads the old entries before it writes
        self.mode, self.step, self.bias = mode, step, bias
        if mode == "use" and self.offload:
            self._prefetch((step, 0))  # the first layer's copy overlaps the embedding and norms

    @property
    def nbytes(self) -> int:
        """Bytes of the cached K/V (and fp8 scales)."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in _tensors(e))

    @property
    def host_bytes(self) -> int:
        """Host memory reserved for an offloaded cache (whole chunks)."""
        return self._arena.nbytes if self._arena is not None else 0

    def clear(self) -> None:
        self._entries.clear()
        self._ready.clear()
        if self._arena is not None:
            self._arena.chunks.clear()
            self._arena.reset()


@dataclass
class EditOutput:
    """``images`` as the pipeline's output_type gives them; ``latents`` (1, N, C) packed tokens,
    background equal to the source's; ``stats``: steps, tokens, forwards, cache bytes and residency."""

    images: object
    latents: torch.Tensor
    stats: dict = field(default_factory=dict)


@dataclass
class Inversion:
    """A source image inverted by ``KVEditor.invert``: what ``KVEditor.denoise`` edits from.

    ``x0`` (1, N, C) the source latents, ``z`` the inverted latents at the edit's start time,
    ``fg`` (N,) bool the edited tokens, ``sigmas`` the schedule, ``cache`` the background K/V of
    every step and layer. One inversion serves any number of edits (target prompts, attn_scale);
    ``release()``, or leaving a ``with`` block, frees the cache.
    """

    image: object
    x0: torch.Tensor
    z: torch.Tensor
    fg: torch.Tensor
    sigmas: torch.Tensor
    skip_steps: int
    grid: tuple[int, int]  # token rows, cols
    size: tuple[int, int]  # pixel height, width
    cache: BackgroundKV | None
    stats: dict = field(default_factory=dict)

    @property
    def released(self) -> bool:
        return self.cache is None and bool(self.fg.any())

    def release(self) -> None:
        if self.cache is not None:
            self.cache.clear()
            self.cache = None

    def __enter__(self) -> Inversion:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class KVEditor:
    """KV-Edit on a ``FluxPipeline`` (its transformer, VAE, scheduler and text encoders).

    ``edit`` inverts and edits in one call; ``invert`` then ``denoise`` (any number of times)
    edits one source image towards several targets while paying for the inversion once.

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
        # inside the transformer's forward hooks, as a call of the transformer would be (offloading)
        return call_as_forward(tr, functools.partial(branch_forward, tr, state), hidden_states=z,
                               encoder_hidden_states=embeds, pooled_projections=pooled,
                               timestep=t.expand(z.shape[0]).to(z.dtype), img_ids=ids, txt_ids=txt_ids, guidance=g,
                               return_dict=False)[0]

    def _prepare(self, image, mask, num_inference_steps, skip_steps, cache_dtype):
        """(x0, fg, sigmas, grid, size, stats) of a source image and mask, checked."""
        pipe = self.pipe
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        if not 0 <= skip_steps < num_inference_steps:
            raise ValueError(f"skip_steps must be in [0, {num_inference_steps}), got {skip_steps}")
        x0, (rows, cols) = fl.encode_image(pipe, image, what="image")
        if x0.shape[0] != 1:
            raise ValueError(f"edit one image at a time, got a batch of {x0.shape[0]}")
        px = fl.pixels_per_token(pipe)
        fg = fl.token_mask(mask, rows * px, cols * px, px).to(x0.device)
        sig = self._sigmas(num_inference_steps, rows * cols, x0.device)
        stats = dict(steps=num_inference_steps - skip_steps, edited_tokens=int(fg.sum()), tokens=rows * cols,
                     forwards=0, cache_bytes=0, host_cache_bytes=0, max_resident_layers=0)
        return x0, fg, sig, (rows, cols), (rows * px, cols * px), stats

    def _cache(self, fg, x0, cache_device, cache_dtype, keep_steps) -> BackgroundKV:
        compute = x0.device
        storage = torch.device(cache_device) if cache_device is not None else compute
        return BackgroundKV((~fg).nonzero().flatten(), storage, compute, cache_dtype, keep_steps=keep_steps)

    @torch.no_grad()
    def invert(self, image, mask, source_prompt=None, *, source_prompt_embeds=None, source_pooled_prompt_embeds=None,
               num_inference_steps: int = 28, skip_steps: int = 4, inversion_guidance: float = 1.5,
               cache_device=None, cache_dtype: str = "compute", attention_mask: bool = False) -> Inversion:
        """Invert ``image`` under ``source_prompt``, caching the background K/V of every step and layer.

        Args: as ``edit``. Returns an ``Inversion`` for ``denoise``; release it when done.
        """
        x0, fg, sig, grid, size, stats = self._prepare(image, mask, num_inference_steps, skip_steps, cache_dtype)
        if not fg.any():  # nothing to edit: no forward, no cache
            return Inversion(image, x0, x0, fg, sig, skip_steps, grid, size, None, stats)
        src = self._embeds(source_prompt, source_prompt_embeds, source_pooled_prompt_embeds, "source")
        cache = self._cache(fg, x0, cache_device, cache_dtype, keep_steps=True)
        state = BranchState.create(self.pipe.transformer, [], self.config)
        state.background = cache
        ids = fl.grid_ids(*grid, device=x0.device)
        order = None
        if attention_mask:  # tokens as [foreground, background]: each query group reads a slice of the K/V
            order = torch.cat([fg.nonzero().flatten(), cache.bg])
            ids, state.token_split = ids[order], int(fg.sum())
            cache.bg = torch.arange(state.token_split, fg.numel(), device=x0.device)  # same columns, same order
        try:
            z = x0 if order is None else x0[:, order]
            for i in range(num_inference_steps - 1, skip_steps - 1, -1):  # Euler, backwards in time
                cache.begin("capture", i)
                z = z + (sig[i] - sig[i + 1]) * self._forward(state, z, sig[i + 1], src, inversion_guidance, ids)
        except BaseException:
            cache.clear()
            raise
        finally:
            state.clear()
        if order is not None:
            z = torch.empty_like(z).index_copy_(1, order, z)
        stats.update(forwards=num_inference_steps - skip_steps, cache_bytes=cache.nbytes,
                     host_cache_bytes=cache.host_bytes)
        return Inversion(image, x0, z, fg, sig, skip_steps, grid, size, cache, stats)

    @torch.no_grad()
    def denoise(self, inversion: Inversion, target_prompt=None, *, target_prompt_embeds=None,
                target_pooled_prompt_embeds=None, guidance_scale: float = 5.5, attn_scale: float = 1.0,
                re_init: bool = False, generator=None, output_type: str = "pil") -> EditOutput:
        """Edit an ``Inversion``'s foreground towards ``target_prompt``; the inversion stays usable.

        Args: as ``edit``. Only foreground tokens are processed; every layer reads the cached
        background K/V of the same step in place. The background is the source's, bit-exact.
        """
        inv = inversion
        if inv.released:
            raise ValueError("this Inversion was released; invert the image again")
        stats = dict(inv.stats)
        if not inv.fg.any():
            return EditOutput(self._output_input(inv.image, output_type, inv.x0), inv.x0, stats)
        tar = self._embeds(target_prompt, target_prompt_embeds, target_pooled_prompt_embeds, "target")
        x0, sig, skip = inv.x0, inv.sigmas, inv.skip_steps
        fg_idx = inv.fg.nonzero().flatten()
        fg_ids = fl.grid_ids(*inv.grid, device=x0.device)[fg_idx]
        cache = inv.cache
        state = BranchState.create(self.pipe.transformer, [], self.config)
        state.background = cache
        z_fg = inv.z[:, fg_idx]
        if re_init:  # fresh noise at the start time, mixed with the source as the schedule does
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
            z_fg = sig[skip] * noise[:, fg_idx] + (1 - sig[skip]) * x0[:, fg_idx]
        cache.max_resident = 0
        try:
            for i in range(skip, len(sig) - 1):
                cache.begin("use", i, attn_scale)
                z_fg = z_fg + (sig[i + 1] - sig[i]) * self._forward(state, z_fg, sig[i], tar, guidance_scale, fg_ids)
        finally:
            state.clear()
        canvas = x0.clone()
        canvas[:, fg_idx] = z_fg.to(canvas.dtype)
        stats.update(forwards=stats["forwards"] + len(sig) - 1 - skip, max_resident_layers=cache.max_resident)
        return EditOutput(self._decode(canvas, *inv.size, output_type), canvas, stats)

    @torch.no_grad()
    def edit(self, image, mask, source_prompt=None, target_prompt=None, *, source_prompt_embeds=None,
             source_pooled_prompt_embeds=None, target_prompt_embeds=None, target_pooled_prompt_embeds=None,
             num_inference_steps: int = 28, skip_steps: int = 4, inversion_guidance: float = 1.5,
             guidance_scale: float = 5.5, attn_scale: float = 1.0, re_init: bool = False,
             inversion_free: bool = False, cache_device=None, cache_dtype: str = "compute",
             attention_mask: bool = False, generator=None, output_type: str = "pil") -> EditOutput:
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
                (pinned; copied out and the next layer's K/V copied in on a side stream while the
                current layer computes).
            cache_dtype: ``"compute"`` or ``"fp8"`` (e4m3, per-token scales; approximate).
            attention_mask: mask attention during inversion as KV-Edit's option does: background
                tokens attend to text + background, foreground to text + foreground, text to all.
            generator: for the noise of ``re_init`` and ``inversion_free``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        """
        src = dict(source_prompt=source_prompt, source_prompt_embeds=source_prompt_embeds,
                   source_pooled_prompt_embeds=source_pooled_prompt_embeds)
        if inversion_free:
            if attention_mask:
                raise ValueError("attention_mask applies to the inversion; inversion_free has none")
            return self._edit_inversion_free(image, mask, src, (target_prompt, target_prompt_embeds,
                                                                target_pooled_prompt_embeds),
                                             num_inference_steps, skip_steps, inversion_guidance, guidance_scale,
                                             attn_scale, cache_device, cache_dtype, generator, output_type)
        for what, prompt, embeds in (("source", source_prompt, source_prompt_embeds),
                                     ("target", target_prompt, target_prompt_embeds)):
            if prompt is None and embeds is None:  # before paying for the inversion
                raise ValueError(f"give {what}_prompt or {what}_prompt_embeds")
        with self.invert(image, mask, **src, num_inference_steps=num_inference_steps, skip_steps=skip_steps,
                         inversion_guidance=inversion_guidance, cache_device=cache_device,
                         cache_dtype=cache_dtype, attention_mask=attention_mask) as inv:
            return self.denoise(inv, target_prompt, target_prompt_embeds=target_prompt_embeds,
                                target_pooled_prompt_embeds=target_pooled_prompt_embeds, guidance_scale=guidance_scale,
                                attn_scale=attn_scale, re_init=re_init, generator=generator, output_type=output_type)

    def _edit_inversion_free(self, image, mask, src, tar, num_inference_steps, skip_steps, inversion_guidance,
                             guidance_scale, attn_scale, cache_device, cache_dtype, generator, output_type):
        # Per step: z_src = (1 - t) x0 + t n (same n every step), a full source forward caching
        # this step's background K/V, a foreground target forward, z += dt (v_tar - v_src)[fg].
        x0, fg, sig, grid, size, stats = self._prepare(image, mask, num_inference_steps, skip_steps, cache_dtype)
        if not fg.any():
            return EditOutput(self._output_input(image, output_type, x0), x0, stats)
        src = self._embeds(src["source_prompt"], src["source_prompt_embeds"], src["source_pooled_prompt_embeds"],
                           "source")
        tar = self._embeds(*tar, "target")
        ids = fl.grid_ids(*grid, device=x0.device)
        fg_idx = fg.nonzero().flatten()
        cache = self._cache(fg, x0, cache_device, cache_dtype, keep_steps=False)
        state = BranchState.create(self.pipe.transformer, [], self.config)
        state.background = cache
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        z, cache_bytes = x0.clone(), 0
        try:
            for i in range(skip_steps, num_inference_steps):
                t, dt = sig[i], sig[i + 1] - sig[i]
                z_src = (1 - t) * x0 + t * noise
                cache.begin("capture", 0)
                v_src = self._forward(state, z_src, t, src, inversion_guidance, ids)
                cache_bytes = max(cache_bytes, cache.nbytes)
                cache.begin("use", 0, attn_scale)
                v_tar = self._forward(state, z[:, fg_idx] + (z_src - x0)[:, fg_idx], t, tar, guidance_scale,
                                      ids[fg_idx])
                z[:, fg_idx] = z[:, fg_idx] + dt * (v_tar - v_src[:, fg_idx])
            stats.update(forwards=2 * (num_inference_steps - skip_steps), cache_bytes=cache_bytes,
                         host_cache_bytes=cache.host_bytes, max_resident_layers=cache.max_resident)
        finally:
            cache.clear()
            state.clear()
        return EditOutput(self._decode(z, *size, output_type), z, stats)

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
        image = canvas
        if output_type != "latent":
            lat = pipe._unpack_latents(canvas, height, width, pipe.vae_scale_factor)
            lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(lat.to(device=pipe.vae.device, dtype=pipe.vae.dtype), return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()  # as a pipeline call ends: offloaded models go back to the CPU
        return image

    def _output_input(self, image, output_type, x0):
        if output_type == "latent":
            return x0
        x = fl._image_tensor(self.pipe, image, "image")
        return self.pipe.image_processor.postprocess(x, output_type=output_type)
