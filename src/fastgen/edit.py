"""KV-Edit: background-preserving editing on Flux (arXiv 2502.17363).

    editor = fastgen.edit.KVEditor(flux_pipe)
    out = editor.edit(image, mask, "a cat on a sofa", "a dog on a sofa")
    out.images[0]

Inversion runs the Euler flow backwards from the source image and keeps, at every step and in
every attention layer, the background tokens' K/V (post-norm, post-RoPE). Denoising then runs
only the foreground tokens: text and foreground queries attend to their fresh K/V plus the
cached background K/V, read in place as one extra attention segment whose logits get
``attn_scale``. The background latents are copied from the source: bit-exact. Both run the Flux
branch forward of ``fastgen.flux_branches`` with KV-Edit's K/V providers: ``BackgroundKV`` (records
and serves the cache) and, for the optional inversion mask, ``InversionMask``.

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

import fastgen.ops as ops
from fastgen import flux_latents as fl
from fastgen._hooks import call_as_forward
from fastgen._validity import ambient_key, modules_key
from fastgen.condition.config import ConditionConfig
from fastgen.flux_branches import (CACHE_DTYPES, Forward, KVProvider, Layer, Segment, branch_forward, cache_entry,
                                   check_transformer, entry_tensors)
from fastgen.ops.fp8 import Fp8KV
from fastgen.patching.config import PatchConfig, build_config, validated

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@validated
@dataclass(frozen=True)
class EditConfig:
    """How KV-Edit runs its attention (``KVEditor(pipe, EditConfig(...))``).

    Attributes:
        attention_backend, prologue_backend, fuse_prologue: as in ``fastgen.PatchConfig``.

    Where the background K/V live and in which dtype are arguments of ``invert`` / ``edit``
    (``cache_device``, ``cache_dtype``), as they may differ from one image to the next.
    """

    attention_backend: str = "auto"
    prologue_backend: str = "auto"
    fuse_prologue: bool = True

    def __post_init__(self):
        self.patch_config()  # the attention settings, checked as fastgen.PatchConfig checks them

    def patch_config(self) -> PatchConfig:
        """The attention settings, as ``fastgen.flux_branches.branch_forward`` takes them."""
        return PatchConfig(attention_backend=self.attention_backend, prologue_backend=self.prologue_backend,
                           fuse_prologue=self.fuse_prologue)

    @classmethod
    def build(cls, config: EditConfig | None = None, **overrides) -> EditConfig:
        """``config`` with ``overrides``; unknown keys raise ``ValueError`` naming the known ones."""
        if config is not None and not isinstance(config, EditConfig):
            extra = (": ConditionConfig's condition fields (attention, kv_cache, cache_dtype) do not apply to KV-Edit; "
                     "cache_device and cache_dtype are arguments of KVEditor.invert / edit"
                     if isinstance(config, ConditionConfig) else "")
            raise ValueError(f"KVEditor takes a fastgen.edit.EditConfig (attention_backend, prologue_backend, "
                             f"fuse_prologue), got a {type(config).__name__}{extra}")
        return build_config(cls, config, overrides, "fastgen.edit.EditConfig")


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


def _like(entry, tensors):
    return Fp8KV(*tensors) if isinstance(entry, Fp8KV) else tuple(tensors)


class BackgroundKV(KVProvider):
    """Background K/V per (step, layer): captured by full forwards, supplied to foreground ones.
    KV-Edit's K/V provider in ``fastgen.flux_branches.branch_forward``.

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
        self.state: dict | None = None  # what the captured K/V were computed under (``state_of``)

    # --- validity ---------------------------------------------------------------------------

    def begin_forward(self, forward: Forward) -> None:
        """At the start of each forward (inside the transformer's forward hooks: model offload has
        placed its weights), a capture records the state the K/V are computed under; a foreground
        forward under another state raises instead of mixing the two."""
        if self.mode not in ("capture", "use"):
            return
        now = state_of(forward.model, forward.hidden_states)
        if self.state is None and self.mode == "capture":
            self.state = now
            return
        changed = [what for what, key in now.items() if self.state is None or self.state.get(what) != key]
        if "the transformer" in changed:  # another model: its weights and LoRA state differ by definition
            changed = ["the transformer (an inversion made by another KVEditor?)"]
        if changed:
            when = "during the inversion" if self.mode == "capture" else "since the inversion"
            raise ValueError(f"{', '.join(changed)} changed {when}: the cached background K/V were computed under "
                             "another state and would not match the foreground's; invert the image again "
                             "(KVEditor.invert) under the current one")

    # --- storage ---------------------------------------------------------------------------

    def _store(self, k, v):
        entry = cache_entry(k.index_select(2, self.bg), v.index_select(2, self.bg), self.dtype)
        if not self.offload:
            return entry
        src = entry_tensors(entry)
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
                             for t in entry_tensors(entry)])

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
            for t in entry_tensors(entry):
                t.record_stream(current)  # freed only once the attention that reads it is done
        self._prefetch((key[0], key[1] + 1))  # the next layer, while this one computes
        self.max_resident = max(self.max_resident, len(self._ready) + 1)  # + the one in use
        return entry

    # --- called by the branch forward in every attention layer ------------------------------

    def extra_kv(self, layer: Layer) -> list[Segment]:
        if self.mode == "capture":
            self._entries[(self.step, layer.index)] = self._store(*layer.image_kv())
            return []
        if self.mode == "use" and self.bg.numel():
            return [Segment(self._fetch((self.step, layer.index)), self.bias)]
        return []

    def begin(self, mode: str, step: int, bias: float = 0.0) -> None:
        if mode == "capture" and not self.keep_steps:  # inversion-free: one step's cache at a time
            self._entries.clear()
            self.state = None
            if self._arena is not None:
                self._arena.reset()  # safe: the side stream reads the old entries before it writes
        self.mode, self.step, self.bias = mode, step, bias
        if mode == "use" and self.offload:
            self._prefetch((step, 0))  # the first layer's copy overlaps the embedding and norms

    @property
    def nbytes(self) -> int:
        """Bytes of the cached K/V (and fp8 scales)."""
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in entry_tensors(e))

    @property
    def host_bytes(self) -> int:
        """Host memory reserved for an offloaded cache (whole chunks)."""
        return self._arena.nbytes if self._arena is not None else 0

    def clear(self) -> None:
        self._entries.clear()
        self._ready.clear()
        self.state = None
        if self._arena is not None:
            self._arena.chunks.clear()
            self._arena.reset()


class InversionMask(KVProvider):
    """KV-Edit's optional inversion mask, a K/V provider that computes the attention itself. Image
    tokens come ordered [foreground (``n_fg``), background]: text queries see every key, foreground
    queries text + foreground keys, background ones text + background keys. Three launches over
    slices of the same K/V (segments read in place, nothing concatenated)."""

    def __init__(self, n_fg: int):
        self.n_fg = n_fg

    def attend(self, layer: Layer, q: torch.Tensor, extra: list[Segment]) -> torch.Tensor:
        if extra:
            raise ValueError("the KV-Edit inversion mask takes no extra K/V segments")
        n_txt, n_fg = layer.forward.n_txt, self.n_fg
        kt, vt = layer.keys[0][:, :, :n_txt], layer.values[0][:, :, :n_txt]
        ki, vi = layer.image_kv()
        parts = []
        for rows, cols in ((slice(0, n_txt), slice(None)), (slice(n_txt, n_txt + n_fg), slice(0, n_fg)),
                           (slice(n_txt + n_fg, None), slice(n_fg, None))):
            qr, kc, vc = q[:, :, rows], ki[:, :, cols], vi[:, :, cols]
            if qr.shape[2]:
                parts.append(ops.attention(qr, kt, vt, extra_kv=[(kc, vc)] if kc.shape[2] else None,
                                           backend=layer.forward.config.attention_backend,
                                           autotune=layer.forward.config.autotune))
        return torch.cat(parts, dim=2)


def state_of(model, hidden: torch.Tensor) -> dict:
    """What KV-Edit's background K/V depend on besides the latents and text, by what a user would
    have changed: the key of ``fastgen._validity`` (ambient state; weights and PEFT state, in the
    form offloading leaves unchanged: ``fastgen._validity.modules_key``)."""
    modules = modules_key([model])
    return {
        "the transformer": id(model),
        "the LoRA state (scales, active, merged or disabled adapters)": tuple((m[0], m[1]) for m in modules),
        "the transformer's weights (changed in place, or moved to another dtype or device)":
            tuple((m[0], m[2]) for m in modules),
        "autocast, grad or inference mode": ambient_key(),
        "the latents' dtype or device": (hidden.dtype, hidden.device),
    }


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
    ``fg`` (N,) bool the edited tokens, ``sigmas`` and ``timesteps`` (steps + 1,) the schedule
    (``FluxPipeline``'s at this size), ``cache`` the background K/V of every step and layer, and
    the state they were computed under. One inversion serves any number of edits (target prompts,
    attn_scale) under that state; ``release()``, or leaving a ``with`` block, frees the cache.
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
    timesteps: torch.Tensor | None = None

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


def _number(x, what: str) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {x!r}")
    return float(x)


def _flag(x, what: str) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"{what} must be True or False, got {x!r}")
    return x


def _cache_device(cache_device, compute: torch.device) -> torch.device:
    """Where the background K/V live: ``compute`` (None), the CPU or a CUDA device that exists."""
    if cache_device is None:
        return compute
    try:
        dev = torch.device(cache_device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"cache_device must be a device such as 'cpu' or 'cuda', got {cache_device!r}") from None
    if dev.type not in ("cpu", "cuda", compute.type):
        raise ValueError(f"cache_device must be 'cpu', a CUDA device or the transformer's device ({compute}), "
                         f"got {cache_device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"cache_device={cache_device!r} but this machine has no CUDA GPU; use 'cpu', or leave it "
                             "out to keep the cache on the transformer's device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"cache_device={cache_device!r} but there are {torch.cuda.device_count()} CUDA devices")
    return dev


class KVEditor:
    """KV-Edit on a ``FluxPipeline`` (its transformer, VAE, scheduler and text encoders).

    ``edit`` inverts and edits in one call; ``invert`` then ``denoise`` (any number of times)
    edits one source image towards several targets while paying for the inversion once.

    The schedule is the one ``FluxPipeline.__call__`` uses at the image's size (same sigmas, same
    timesteps given to the transformer, Euler steps in float32 as its scheduler takes them), and
    fresh noise (``re_init``, ``inversion_free``) is the noise it starts from with the same
    generator. Every argument is checked before any model runs.

    Args:
        pipe: a ``FluxPipeline`` (or a pipeline with Flux's components: a ``FluxTransformer2DModel``
            transformer, a VAE, a flow-matching scheduler).
        config: ``EditConfig`` (attention settings); None: the defaults.
    """

    def __init__(self, pipe, config: EditConfig | None = None):
        check_transformer(getattr(pipe, "transformer", None), "KVEditor", pipe=pipe)
        for name in ("vae", "scheduler", "image_processor"):
            if getattr(pipe, name, None) is None:
                raise ValueError(f"KVEditor needs the pipeline's {name}; {type(pipe).__name__} has none")
        self.pipe = pipe
        self.config = EditConfig.build(config)
        self._patch_config = self.config.patch_config()

    # --- checks, before any model runs ------------------------------------------------------------

    def _check_text(self, prompt, embeds, pooled, what: str) -> None:
        tr = self.pipe.transformer.config
        if embeds is None:
            if prompt is None:
                raise ValueError(f"give {what}_prompt or {what}_prompt_embeds")
            if not isinstance(prompt, str) and not (isinstance(prompt, list) and len(prompt) == 1
                                                    and isinstance(prompt[0], str)):
                raise ValueError(f"{what}_prompt must be one string (KV-Edit edits one image), got {prompt!r}")
            if getattr(self.pipe, "text_encoder_2", None) is None:
                raise ValueError(f"the pipeline has no text encoders: give {what}_prompt_embeds and "
                                 f"{what}_pooled_prompt_embeds instead of {what}_prompt")
            return
        if pooled is None:
            raise ValueError(f"{what}_prompt_embeds needs {what}_pooled_prompt_embeds")
        d, p = tr.joint_attention_dim, tr.pooled_projection_dim
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != d:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{what}_prompt_embeds must be (1, S, {d}), got {got}")
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (1, p):
            got = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(f"{what}_pooled_prompt_embeds must be (1, {p}), got {got}")
        dtype = self.pipe.transformer.dtype
        for name, t in ((f"{what}_prompt_embeds", embeds), (f"{what}_pooled_prompt_embeds", pooled)):
            if t.dtype != dtype:
                raise ValueError(f"{name} is {t.dtype} but the transformer computes in {dtype}: pass them in {dtype}")

    def _check_source(self, image, mask, num_inference_steps, skip_steps, inversion_guidance, cache_device,
                      cache_dtype, attention_mask):
        """(x (1, 3, H, W) in [-1, 1], fg (N,) bool, cache device): the image, mask and options, checked."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(skip_steps, int) or isinstance(skip_steps, bool) or not 0 <= skip_steps < num_inference_steps:
            raise ValueError(f"skip_steps must be an integer in [0, {num_inference_steps}), got {skip_steps!r}")
        _number(inversion_guidance, "inversion_guidance")
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
        _flag(attention_mask, "attention_mask")
        storage = _cache_device(cache_device, self.pipe._execution_device)
        x = fl.image_tensor(self.pipe, image, "image")
        if x.shape[0] != 1:
            raise ValueError(f"image must be one image (3, H, W), got a batch of {x.shape[0]}: edit one at a time")
        px = fl.pixels_per_token(self.pipe)
        fg = fl.token_mask(mask, x.shape[2], x.shape[3], px, what="mask")
        return x, fg, storage

    def _check_target(self, guidance_scale, attn_scale, re_init, generator, output_type, device) -> None:
        _number(guidance_scale, "guidance_scale")
        _number(attn_scale, "attn_scale")
        _flag(re_init, "re_init")
        fl.check_generator(generator, 1, device)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    # --- model calls --------------------------------------------------------------------------------

    def _embeds(self, prompt, embeds, pooled, what):
        if embeds is not None:
            return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
        e, p, ids = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.pipe._execution_device)
        return e, p, ids

    def _forward(self, providers, z, t, text, guidance, ids):
        """The transformer's velocity at time ``t`` (a scheduler timestep, 0..1000), called as
        ``FluxPipeline`` calls it: ``timestep = t.expand(B).to(latents.dtype) / 1000``."""
        embeds, pooled, txt_ids = text
        tr = self.pipe.transformer
        g = torch.full((z.shape[0],), guidance, device=z.device, dtype=torch.float32) if tr.config.guidance_embeds else None
        # inside the transformer's forward hooks, as a call of the transformer would be (offloading)
        return call_as_forward(tr, functools.partial(branch_forward, tr, providers, config=self._patch_config),
                               hidden_states=z,
                               encoder_hidden_states=embeds, pooled_projections=pooled,
                               timestep=t.expand(z.shape[0]).to(z.dtype) / 1000, img_ids=ids, txt_ids=txt_ids,
                               guidance=g, return_dict=False)[0]

    def _prepare(self, x, fg, num_inference_steps, skip_steps):
        """(x0, fg, sigmas, timesteps, grid, size, stats) of a checked source image and mask."""
        pipe = self.pipe
        rows, cols = fl.token_grid(pipe, x.shape[2], x.shape[3])
        x0 = fl.encode(pipe, x)
        fg = fg.to(x0.device)
        sig, times = self._schedule(num_inference_steps, rows * cols, x0.device)
        px = fl.pixels_per_token(pipe)
        stats = dict(steps=num_inference_steps - skip_steps, edited_tokens=int(fg.sum()), tokens=rows * cols,
                     forwards=0, cache_bytes=0, host_cache_bytes=0, max_resident_layers=0)
        return x0, fg, sig, times, (rows, cols), (rows * px, cols * px), stats

    def _cache(self, fg, x0, storage, cache_dtype, keep_steps) -> BackgroundKV:
        return BackgroundKV((~fg).nonzero().flatten(), storage, x0.device, cache_dtype, keep_steps=keep_steps)

    def _noise(self, x0, grid, generator, text) -> torch.Tensor:
        """The packed noise a FluxPipeline call with ``generator`` starts from, in x0's dtype."""
        noise = fl.initial_noise(self.pipe, 1, *grid, generator, x0.device, fl.latent_dtype(self.pipe, text[0]))
        return noise.to(x0.dtype)

    @torch.no_grad()
    def invert(self, image, mask, source_prompt=None, *, source_prompt_embeds=None, source_pooled_prompt_embeds=None,
               num_inference_steps: int = 28, skip_steps: int = 4, inversion_guidance: float = 1.5,
               cache_device=None, cache_dtype: str = "compute", attention_mask: bool = False) -> Inversion:
        """Invert ``image`` under ``source_prompt``, caching the background K/V of every step and layer.

        Args: as ``edit``. Returns an ``Inversion`` for ``denoise``; release it when done. The
        state the K/V are computed under (LoRA scales and adapters, weights, autocast) is recorded:
        ``denoise`` under another one raises.
        """
        check_transformer(self.pipe.transformer, "KVEditor")
        x, fg, storage = self._check_source(image, mask, num_inference_steps, skip_steps, inversion_guidance,
                                            cache_device, cache_dtype, attention_mask)
        self._check_text(source_prompt, source_prompt_embeds, source_pooled_prompt_embeds, "source")
        return self._invert(image, x, fg, storage, (source_prompt, source_prompt_embeds, source_pooled_prompt_embeds),
                            num_inference_steps, skip_steps, inversion_guidance, cache_dtype, attention_mask)

    def _invert(self, image, x, fg, storage, source, num_inference_steps, skip_steps, inversion_guidance, cache_dtype,
                attention_mask) -> Inversion:
        x0, fg, sig, times, grid, size, stats = self._prepare(x, fg, num_inference_steps, skip_steps)
        if not fg.any():  # nothing to edit: no forward, no cache
            return Inversion(image, x0, x0, fg, sig, skip_steps, grid, size, None, stats, timesteps=times)
        src = self._embeds(*source, "source")
        cache = self._cache(fg, x0, storage, cache_dtype, keep_steps=True)
        providers = [cache]
        ids = fl.grid_ids(*grid, device=x0.device)
        order = None
        if attention_mask:  # tokens as [foreground, background]: each query group reads a slice of the K/V
            order = torch.cat([fg.nonzero().flatten(), cache.bg])
            n_fg = int(fg.sum())
            ids = ids[order]
            providers.append(InversionMask(n_fg))
            cache.bg = torch.arange(n_fg, fg.numel(), device=x0.device)  # same columns, same order
        try:
            z = x0 if order is None else x0[:, order]
            for i in range(num_inference_steps - 1, skip_steps - 1, -1):  # Euler, backwards in time
                cache.begin("capture", i)
                v = self._forward(providers, z, times[i + 1], src, inversion_guidance, ids)
                z = _euler(z, sig[i] - sig[i + 1], v)
        except BaseException:
            cache.clear()
            raise
        if order is not None:
            z = torch.empty_like(z).index_copy_(1, order, z)
        stats.update(forwards=num_inference_steps - skip_steps, cache_bytes=cache.nbytes,
                     host_cache_bytes=cache.host_bytes)
        return Inversion(image, x0, z, fg, sig, skip_steps, grid, size, cache, stats, timesteps=times)

    @torch.no_grad()
    def denoise(self, inversion: Inversion, target_prompt=None, *, target_prompt_embeds=None,
                target_pooled_prompt_embeds=None, guidance_scale: float = 5.5, attn_scale: float = 1.0,
                re_init: bool = False, generator=None, output_type: str = "pil") -> EditOutput:
        """Edit an ``Inversion``'s foreground towards ``target_prompt``; the inversion stays usable.

        Args: as ``edit``. Only foreground tokens are processed; every layer reads the cached
        background K/V of the same step in place. The background is the source's, bit-exact.
        Raises ``ValueError`` when the LoRA state, the weights, autocast or the transformer differ
        from the inversion's (invert again).
        """
        inv = inversion
        if not isinstance(inv, Inversion):
            raise ValueError(f"inversion must be what KVEditor.invert returned, got {type(inv).__name__}")
        if inv.released:
            raise ValueError("this Inversion was released; invert the image again")
        check_transformer(self.pipe.transformer, "KVEditor")
        self._check_text(target_prompt, target_prompt_embeds, target_pooled_prompt_embeds, "target")
        self._check_target(guidance_scale, attn_scale, re_init, generator, output_type, inv.x0.device)
        return self._denoise(inv, (target_prompt, target_prompt_embeds, target_pooled_prompt_embeds), guidance_scale,
                             attn_scale, re_init, generator, output_type)

    def _denoise(self, inv, target, guidance_scale, attn_scale, re_init, generator, output_type) -> EditOutput:
        stats = dict(inv.stats)
        if not inv.fg.any():
            return EditOutput(self._output_input(inv.image, output_type, inv.x0), inv.x0, stats)
        tar = self._embeds(*target, "target")
        x0, sig, times, skip = inv.x0, inv.sigmas, inv.timesteps, inv.skip_steps
        fg_idx = inv.fg.nonzero().flatten()
        fg_ids = fl.grid_ids(*inv.grid, device=x0.device)[fg_idx]
        cache = inv.cache
        z_fg = inv.z[:, fg_idx]
        if re_init:  # fresh noise at the start time, mixed with the source as the schedule does
            noise = self._noise(x0, inv.grid, generator, tar)
            z_fg = sig[skip] * noise[:, fg_idx] + (1 - sig[skip]) * x0[:, fg_idx]
        cache.max_resident = 0
        for i in range(skip, len(sig) - 1):
            cache.begin("use", i, attn_scale)
            v = self._forward([cache], z_fg, times[i], tar, guidance_scale, fg_ids)
            z_fg = _euler(z_fg, sig[i + 1] - sig[i], v)
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
            image: PIL image, array (H, W, 3) or tensor (3, H, W), float in [0, 1] or uint8; sides
                multiples of 16.
            mask: the region to edit at the image's size (PIL, array or tensor (H, W); nonzero, or
                > 0.5 for floats in [0, 1], marks it). A token is edited if any of its 16 x 16 pixels is.
            source_prompt, target_prompt: one string each, or the ``*_prompt_embeds`` (1, S,
                joint_attention_dim) / ``*_pooled_prompt_embeds`` (1, pooled_projection_dim).
            num_inference_steps: the schedule's length (28): ``FluxPipeline``'s schedule at the
                image's size.
            skip_steps: denoising steps skipped at the start: inversion stops (and editing starts)
                at the schedule's ``skip_steps``-th time (0: from pure noise).
            inversion_guidance, guidance_scale: Flux guidance embedding for inversion and editing.
            attn_scale: added to the logits of background keys for text and foreground queries.
            re_init: start the foreground from fresh noise mixed with the source at the start
                time, instead of the inverted latents.
            inversion_free: no inversion; per step one full source forward (caching that step's
                background K/V only) and one foreground forward; O(1) cache.
            cache_device: where cached K/V live: the transformer's device (default), ``"cpu"``
                (pinned; copied out and the next layer's K/V copied in on a side stream while the
                current layer computes) or another CUDA device.
            cache_dtype: ``"compute"`` or ``"fp8"`` (e4m3, per-token scales; approximate).
            attention_mask: mask attention during inversion as KV-Edit's option does: background
                tokens attend to text + background, foreground to text + foreground, text to all.
            generator: for the noise of ``re_init`` and ``inversion_free`` (as diffusers takes it:
                a CPU generator, or one on the transformer's device).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.

        Every argument is checked before any model runs (``ValueError`` naming it).
        """
        check_transformer(self.pipe.transformer, "KVEditor")
        x, fg, storage = self._check_source(image, mask, num_inference_steps, skip_steps, inversion_guidance,
                                            cache_device, cache_dtype, attention_mask)
        source = (source_prompt, source_prompt_embeds, source_pooled_prompt_embeds)
        target = (target_prompt, target_prompt_embeds, target_pooled_prompt_embeds)
        self._check_text(*source, "source")
        self._check_text(*target, "target")
        self._check_target(guidance_scale, attn_scale, re_init, generator, output_type, self.pipe._execution_device)
        if _flag(inversion_free, "inversion_free"):
            if attention_mask:
                raise ValueError("attention_mask applies to the inversion; inversion_free has none")
            return self._edit_inversion_free(image, x, fg, storage, source, target, num_inference_steps, skip_steps,
                                             inversion_guidance, guidance_scale, attn_scale, cache_dtype, generator,
                                             output_type)
        with self._invert(image, x, fg, storage, source, num_inference_steps, skip_steps, inversion_guidance,
                          cache_dtype, attention_mask) as inv:
            return self._denoise(inv, target, guidance_scale, attn_scale, re_init, generator, output_type)

    def _edit_inversion_free(self, image, x, fg, storage, source, target, num_inference_steps, skip_steps,
                             inversion_guidance, guidance_scale, attn_scale, cache_dtype, generator, output_type):
        # Per step: z_src = (1 - t) x0 + t n (same n every step), a full source forward caching
        # this step's background K/V, a foreground target forward, z += dt (v_tar - v_src)[fg].
        x0, fg, sig, times, grid, size, stats = self._prepare(x, fg, num_inference_steps, skip_steps)
        if not fg.any():
            return EditOutput(self._output_input(image, output_type, x0), x0, stats)
        src = self._embeds(*source, "source")
        tar = self._embeds(*target, "target")
        ids = fl.grid_ids(*grid, device=x0.device)
        fg_idx = fg.nonzero().flatten()
        cache = self._cache(fg, x0, storage, cache_dtype, keep_steps=False)
        noise = self._noise(x0, grid, generator, src)
        z, cache_bytes = x0.clone(), 0
        try:
            for i in range(skip_steps, num_inference_steps):
                t, dt = sig[i], sig[i + 1] - sig[i]
                z_src = (1 - t) * x0 + t * noise
                cache.begin("capture", 0)
                v_src = self._forward([cache], z_src, times[i], src, inversion_guidance, ids)
                cache_bytes = max(cache_bytes, cache.nbytes)
                cache.begin("use", 0, attn_scale)
                v_tar = self._forward([cache], z[:, fg_idx] + (z_src - x0)[:, fg_idx], times[i], tar, guidance_scale,
                                      ids[fg_idx])
                z[:, fg_idx] = _euler(z[:, fg_idx], dt, v_tar - v_src[:, fg_idx])
            stats.update(forwards=2 * (num_inference_steps - skip_steps), cache_bytes=cache_bytes,
                         host_cache_bytes=cache.host_bytes, max_resident_layers=cache.max_resident)
        finally:
            cache.clear()
        return EditOutput(self._decode(z, *size, output_type), z, stats)

    def _schedule(self, steps: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``FluxPipeline.__call__`` gives its scheduler for ``steps`` at an image of ``tokens``
        tokens: (sigmas, timesteps), each (steps + 1,) float32, ending at 0 (sigma 0 at time 0)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = self.pipe.scheduler
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(cfg, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, n = retrieve_timesteps(sched, steps, device, sigmas=sigmas, mu=mu)
        if n != steps or sched.sigmas.numel() != steps + 1:
            raise ValueError(f"KV-Edit needs a scheduler with one sigma per step (a flow-matching Euler scheduler); "
                             f"{type(sched).__name__} gave {n} steps and {sched.sigmas.numel()} sigmas for {steps}")
        sig = sched.sigmas.to(device=device, dtype=torch.float32)
        times = torch.cat([timesteps.to(device=device, dtype=torch.float32), torch.zeros(1, device=device)])
        return sig, times

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
        x = fl.image_tensor(self.pipe, image, "image")
        return self.pipe.image_processor.postprocess(x, output_type=output_type)


def _euler(z: torch.Tensor, dt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``z + dt * v`` as diffusers' FlowMatchEulerDiscreteScheduler.step takes it: in float32, then
    back to the velocity's dtype."""
    return (z.to(torch.float32) + dt * v).to(v.dtype)
