"""``to_onnx``: a diffusers denoiser exported to ONNX with dynamic batch / resolution / frames / text
length, in the operator forms of a target runtime, checked by ``onnx.checker`` and validated against
PyTorch with onnxruntime (issue #13). Flux, UNet2DConditionModel (SD 1.5, SDXL), SD3 / SD3.5, Wan and
HunyuanVideo; patched models too, their custom ops lowered to standard ONNX.

The export goes through ``torch.export`` (which proves the dynamic dimensions or raises), then
``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`` with ``torch.export.Dim``: ``dynamic_axes``
with dynamo mislabels inputs, and the legacy TorchScript exporter fails on ``aten::rms_norm`` (docs:
ENGINEERING.md). Per-architecture facts (inputs, which of their dimensions are batch / spatial /
frame / token dimensions, pixels per step, limits) live in one table, ``_ARCHES``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen.ops.portable import portable

# ONNX protobufs cannot exceed 2 GiB: above that the weights must go to an external data file.
_PROTO_LIMIT = 2**31 - 2**20  # a MiB below the limit, for the graph itself


@dataclass
class ShapeCheck:
    """One onnxruntime-vs-PyTorch comparison: the shape (``batch``; ``height`` and ``width`` in
    pixels; ``text_tokens``), the largest absolute difference, and that difference relative to the
    largest absolute PyTorch output (elementwise relative differences blow up near zero)."""

    batch: int
    height: int
    width: int
    text_tokens: int
    max_abs_diff: float
    max_rel_diff: float
    frames: int | None = None  # video frames (video models)


@dataclass
class ExportReport:
    """What ``to_onnx`` wrote and how it was checked.

    - ``inputs`` / ``outputs``: ONNX name -> dimensions as the graph declares them (``int`` for
      a static dimension, ``str`` for a symbolic one, e.g. ``"batch"`` or ``"2*height"``; the
      symbols ``height``, ``width`` and ``latent_frames`` count the model's spatial / frame steps).
    - ``ranges``: ``batch`` / ``height`` / ``width`` in pixels -> (min, max) declared at export;
      ``max`` None means unbounded.
    - ``file_bytes``: the ``.onnx`` file plus its external data file, if any.
    - ``checks``: one ``ShapeCheck`` per validated shape (empty with ``validate=False``).
    - ``weights``: False where the model was on the meta device: the graph takes each weight as an
      input of the parameter's name instead of holding it (a structural export of a model larger
      than memory: checker, operator check and dims, no numbers).
    """

    path: Path
    architecture: str
    opset: int
    target: str | None
    weights: bool  # False for a model on the meta device: its weights are graph inputs
    dtype: torch.dtype
    inputs: dict[str, tuple[int | str, ...]]
    outputs: dict[str, tuple[int | str, ...]]
    ranges: dict[str, tuple[int, int | None]]
    external_data: bool
    file_bytes: int
    export_seconds: float
    checks: list[ShapeCheck] = field(default_factory=list)
    validate_seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float("nan"))

    @property
    def max_rel_diff(self) -> float:
        return max((c.max_rel_diff for c in self.checks), default=float("nan"))


# --------------------------------------------------------------------------------------------
# Per-architecture facts
# --------------------------------------------------------------------------------------------


class _Arch:
    """How one denoiser class is called with plain tensors. ``px_step``: pixels per step of the
    model's spatial grid (what a dynamic spatial dimension counts); ``latent_step``: latent
    pixels per step (the multiple a latent side must be); ``max_units``: the largest spatial size
    in steps the model itself accepts, or None (unbounded)."""

    name = ""
    inputs: tuple[str, ...] = ()

    def __init__(self, model):
        self.config = model.config

    px_step = 16
    latent_step = 1
    max_units: int | None = None
    max_batch: int | None = None
    max_batch_limit = "what the model accepts"
    # Video models: ``frame_step`` latent frames per model step (patch_size_t), ``max_frame_units``
    # the most steps the model accepts; the VAE makes (frames - 1) / 4 + 1 latent frames.
    masked_attention = False  # attention takes a padding mask (HunyuanVideo's text)
    video = False
    frame_step = 1
    max_frame_units: int | None = None

    def wrapper(self, model) -> torch.nn.Module:
        raise NotImplementedError

    def traceable(self, model):
        """A context in which ``model`` traces with dynamic shapes (default: as it is)."""
        return contextlib.nullcontext()

    def tensors(self, b, hu, wu, t, dtype, device, fu=1) -> dict[str, torch.Tensor]:
        """One forward's inputs: batch ``b``, ``hu`` x ``wu`` spatial steps, ``t`` text tokens,
        ``fu`` frame steps (video models)."""
        raise NotImplementedError

    def dynamic_shapes(self, batch, h, w, text, f=None) -> dict:
        """torch.export dynamic shapes per input: ``batch`` / ``text`` Dims (or None), ``h`` /
        ``w`` / ``f`` ``_Range``s in steps."""
        raise NotImplementedError


def _scheduler_timesteps(b: int, device) -> torch.Tensor:
    # float32 whatever the export dtype: the UNet, SD3 and Wan pipelines pass the scheduler's
    # timesteps as they come (Euler's are fractional; fp16 would round them) and the models embed
    # them in float32. Flux and HunyuanVideo pipelines cast theirs to the latents' dtype: so do theirs.
    return torch.linspace(300.0, 900.0, b, device=device)


def _randn(*shape, dtype, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


class _FluxWrapper(torch.nn.Module):
    def __init__(self, model, guidance: bool):
        super().__init__()
        self.model, self.guidance = model, guidance

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                          txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


class _Flux(_Arch):
    """FluxTransformer2DModel: packed image tokens ``hidden_states [B, S, C]`` with
    S = (height/16) * (width/16) (VAE /8, then 2x2 packing), ``img_ids [S, 3]``, ``txt_ids [T, 3]``,
    ``timestep [B]`` in [0, 1] (the pipeline's t / 1000), ``guidance [B]`` for guidance-distilled
    models (Flux-dev)."""

    name = "flux"
    px_step = 16

    def __init__(self, model):
        super().__init__(model)
        self.guidance = bool(self.config.guidance_embeds)
        self.inputs = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                       "txt_ids") + (("guidance",) if self.guidance else ())

    def wrapper(self, model):
        return _FluxWrapper(model, self.guidance)

    def tensors(self, b, hu, wu, t, dtype, device, fu=1):
        c = self.config
        img_ids = torch.zeros(hu * wu, 3)
        img_ids[:, 1] = torch.arange(hu * wu) // wu  # row, column of each packed token (RoPE positions)
        img_ids[:, 2] = torch.arange(hu * wu) % wu
        out = dict(hidden_states=_randn(b, hu * wu, c.in_channels, dtype=dtype, device=device, seed=1),
                   encoder_hidden_states=_randn(b, t, c.joint_attention_dim, dtype=dtype, device=device, seed=2),
                   pooled_projections=_randn(b, c.pooled_projection_dim, dtype=dtype, device=device, seed=3),
                   timestep=torch.linspace(0.3, 0.9, b).to(device=device, dtype=dtype),
                   img_ids=img_ids.to(device=device, dtype=dtype),
                   txt_ids=torch.zeros(t, 3, device=device, dtype=dtype))
        if self.guidance:
            out["guidance"] = torch.full((b,), 3.5, device=device, dtype=dtype)
        return out

    def dynamic_shapes(self, batch, h, w, text, f=None):
        # Image tokens are one dimension (h/16 * w/16): its range is the product of the side ranges.
        tokens = _dim("image_tokens", _mul(h, w))
        ds = dict(hidden_states={0: batch, 1: tokens}, encoder_hidden_states={0: batch, 1: text},
                  pooled_projections={0: batch}, timestep={0: batch}, img_ids={0: tokens}, txt_ids={0: text})
        if self.guidance:
            ds["guidance"] = {0: batch}
        return ds


class _UNetWrapper(torch.nn.Module):
    def __init__(self, model, sdxl: bool):
        super().__init__()
        self.model, self.sdxl = model, sdxl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = dict(text_embeds=text_embeds, time_ids=time_ids) if self.sdxl else None
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class _UNet(_Arch):
    """UNet2DConditionModel (SD 1.5 / SD 2 / SDXL layouts): ``sample [B, C, height/8, width/8]``
    with sides a multiple of 2**(levels - 1) (each down block halves, each up block doubles back:
    other sizes would not meet their skip connections), ``timestep [B]`` in [0, 1000],
    ``encoder_hidden_states [B, T, D]``; SDXL adds ``text_embeds [B, E]`` and ``time_ids [B, 6]``."""

    name = "unet"

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        if c.class_embed_type is not None or c.addition_embed_type not in (None, "text_time") \
                or c.time_cond_proj_dim is not None or not isinstance(c.cross_attention_dim, int):
            raise ValueError("to_onnx supports UNet2DConditionModel in the SD 1.5 / SD 2 / SDXL layouts (no class "
                             "embedding, addition_embed_type None or 'text_time', no time_cond_proj_dim, one "
                             f"cross_attention_dim); this one has class_embed_type={c.class_embed_type!r}, "
                             f"addition_embed_type={c.addition_embed_type!r}, "
                             f"time_cond_proj_dim={c.time_cond_proj_dim!r}")
        self.sdxl = c.addition_embed_type == "text_time"
        # diffusers' Upsample2D branches on batch >= 64 (.contiguous() against a nearest-upsample
        # bug): torch.export cannot trace both sides into one graph, so batches stop at 63.
        self.max_batch = 63
        self.max_batch_limit = "what one graph can hold (diffusers' Upsample2D takes another code path from batch 64)"
        self.latent_step = 2 ** (len(c.block_out_channels) - 1)
        self.px_step = 8 * self.latent_step
        self.inputs = ("sample", "timestep", "encoder_hidden_states") + (("text_embeds", "time_ids") if self.sdxl
                                                                          else ())

    def wrapper(self, model):
        return _UNetWrapper(model, self.sdxl)

    def tensors(self, b, hu, wu, t, dtype, device, fu=1):
        c, s = self.config, self.latent_step
        out = dict(sample=_randn(b, c.in_channels, hu * s, wu * s, dtype=dtype, device=device, seed=1),
                   timestep=_scheduler_timesteps(b, device),
                   encoder_hidden_states=_randn(b, t, c.cross_attention_dim, dtype=dtype, device=device, seed=2))
        if self.sdxl:
            # SDXL's added conditioning: pooled text embedding, then 6 micro-conditioning numbers
            # (original size, crop top-left, target size) embedded at addition_time_embed_dim each.
            n_time = 6
            emb = c.projection_class_embeddings_input_dim - n_time * c.addition_time_embed_dim
            out["text_embeds"] = _randn(b, emb, dtype=dtype, device=device, seed=3)
            px = torch.tensor([hu * s * 8, wu * s * 8, 0, 0, hu * s * 8, wu * s * 8], dtype=dtype)
            out["time_ids"] = px.repeat(b, 1).to(device)
        return out

    def dynamic_shapes(self, batch, h, w, text, f=None):
        ds = dict(sample={0: batch, 2: _scaled(h, self.latent_step), 3: _scaled(w, self.latent_step)},
                  timestep={0: batch}, encoder_hidden_states={0: batch, 1: text})
        if self.sdxl:
            ds.update(text_embeds={0: batch}, time_ids={0: batch})
        return ds


class _SD3Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class _SD3(_Arch):
    """SD3Transformer2DModel (SD3, SD3.5): latents ``hidden_states [B, C, height/8, width/8]`` with
    sides a multiple of ``patch_size``, ``encoder_hidden_states [B, T, joint_attention_dim]``,
    ``pooled_projections [B, P]``, ``timestep [B]`` in [0, 1000]. The position table is cropped
    around its centre, so a side may not exceed ``pos_embed_max_size`` patches (the model raises
    beyond it): that bound is the range's default maximum, and what lets torch.export prove the crop."""

    name = "sd3"
    inputs = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.latent_step = c.patch_size
        self.px_step = 8 * c.patch_size
        self.max_units = c.pos_embed_max_size

    def wrapper(self, model):
        return _SD3Wrapper(model)

    @contextlib.contextmanager
    def traceable(self, model):
        # Upstream crops the table with slices whose bounds torch.export cannot prove from the
        # range of a symbolic side ((n - h) // 2 + h <= n). The same crop as a gather of rows and
        # columns has no such bounds; installed on this instance for the trace only.
        embed = model.pos_embed
        embed.cropped_pos_embed = functools.partial(_crop_by_gather, embed)
        try:
            yield
        finally:
            del embed.cropped_pos_embed

    def tensors(self, b, hu, wu, t, dtype, device, fu=1):
        c, s = self.config, self.latent_step
        return dict(hidden_states=_randn(b, c.in_channels, hu * s, wu * s, dtype=dtype, device=device, seed=1),
                    encoder_hidden_states=_randn(b, t, c.joint_attention_dim, dtype=dtype, device=device, seed=2),
                    pooled_projections=_randn(b, c.pooled_projection_dim, dtype=dtype, device=device, seed=3),
                    timestep=_scheduler_timesteps(b, device))

    def dynamic_shapes(self, batch, h, w, text, f=None):
        s = self.latent_step
        return dict(hidden_states={0: batch, 2: _scaled(h, s), 3: _scaled(w, s)},
                    encoder_hidden_states={0: batch, 1: text}, pooled_projections={0: batch}, timestep={0: batch})


def _crop_by_gather(embed, height: int, width: int) -> torch.Tensor:
    """diffusers' ``PatchEmbed.cropped_pos_embed`` (the centre ``height`` x ``width`` patches of the
    ``pos_embed_max_size``-square table, ``[1, h * w, D]``; sides in latent pixels) as index gathers."""
    n, p = embed.pos_embed_max_size, embed.patch_size
    h, w = height // p, width // p
    table = embed.pos_embed.reshape(n, n, -1)
    rows = torch.arange(h, device=table.device) + (n - h) // 2
    cols = torch.arange(w, device=table.device) + (n - w) // 2
    return table.index_select(0, rows).index_select(1, cols).reshape(1, h * w, table.shape[-1])


class _WanWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
        return self.model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          encoder_hidden_states_image=encoder_hidden_states_image, return_dict=False)[0]


_WAN_I2V_TEXT = 512  # text tokens an image-to-video Wan takes (WanAttnProcessor: image context = T - 512)


class _Wan(_Arch):
    """WanTransformer3DModel (Wan 2.1 text- and image-to-video): latents ``hidden_states
    [B, C, latent_frames, height/8, width/8]`` (sides a multiple of the patch), ``timestep [B]`` in
    [0, 1000], ``encoder_hidden_states [B, T, text_dim]``; image-to-video models (``image_dim`` set)
    add ``encoder_hidden_states_image [B, I, image_dim]`` (CLIP tokens, I dynamic) and take exactly
    512 text tokens (upstream splits image from text context at ``T - 512``). RoPE tables hold
    ``rope_max_seq_len`` positions per axis: the most patches per side and per frame axis."""

    name = "wan"
    video = True

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        pt, ph, pw = c.patch_size
        if ph != pw:
            raise ValueError(f"to_onnx exports Wan models with square patches, this one has {c.patch_size}")
        self.frame_step, self.latent_step, self.px_step = pt, ph, 8 * ph
        self.max_units = self.max_frame_units = c.rope_max_seq_len
        self.image = c.image_dim is not None
        self.inputs = ("hidden_states", "timestep", "encoder_hidden_states") + (
            ("encoder_hidden_states_image",) if self.image else ())

    def wrapper(self, model):
        return _WanWrapper(model)

    def tensors(self, b, hu, wu, t, dtype, device, fu=1):
        c, s = self.config, self.latent_step
        if self.image:
            t, n_image = _WAN_I2V_TEXT, t + 2
        out = dict(hidden_states=_randn(b, c.in_channels, fu * self.frame_step, hu * s, wu * s, dtype=dtype,
                                        device=device, seed=1),
                   timestep=_scheduler_timesteps(b, device),
                   encoder_hidden_states=_randn(b, t, c.text_dim, dtype=dtype, device=device, seed=2))
        if self.image:
            out["encoder_hidden_states_image"] = _randn(b, n_image, c.image_dim, dtype=dtype, device=device, seed=3)
        return out

    def dynamic_shapes(self, batch, h, w, text, f=None):
        s = self.latent_step
        ds = dict(hidden_states={0: batch, 2: _scaled(f, self.frame_step), 3: _scaled(h, s), 4: _scaled(w, s)},
                  timestep={0: batch}, encoder_hidden_states={0: batch, 1: torch.export.Dim.STATIC if self.image else text})
        if self.image:
            ds["encoder_hidden_states_image"] = {0: batch, 1: torch.export.Dim("image_tokens", min=1)}
        return ds


class _HunyuanWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                guidance=None):
        return self.model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=encoder_attention_mask, pooled_projections=pooled_projections,
                          guidance=guidance, return_dict=False)[0]


class _Hunyuan(_Arch):
    """HunyuanVideoTransformer3DModel: latents ``hidden_states [B, C, latent_frames, height/8,
    width/8]`` (sides a multiple of ``patch_size``, frames of ``patch_size_t``), ``timestep [B]`` in
    [0, 1000], ``encoder_hidden_states [B, T, text_embed_dim]`` with ``encoder_attention_mask [B, T]``
    (1 = a prompt token, 0 = padding), ``pooled_projections [B, P]``, and ``guidance [B]`` for
    guidance-distilled models (``guidance_embeds``)."""

    name = "hunyuan"
    video = True
    masked_attention = True

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.frame_step, self.latent_step, self.px_step = c.patch_size_t, c.patch_size, 8 * c.patch_size
        self.guidance = bool(c.guidance_embeds)
        self.inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                       "pooled_projections") + (("guidance",) if self.guidance else ())

    def wrapper(self, model):
        return _HunyuanWrapper(model)

    def tensors(self, b, hu, wu, t, dtype, device, fu=1):
        c, s = self.config, self.latent_step
        mask = torch.ones(b, t, dtype=torch.int64)
        mask[-1, max(1, t - 2):] = 0  # one prompt shorter than the padded length: the mask must matter
        out = dict(hidden_states=_randn(b, c.in_channels, fu * self.frame_step, hu * s, wu * s, dtype=dtype,
                                        device=device, seed=1),
                   timestep=torch.linspace(300.0, 900.0, b).to(device=device, dtype=dtype),
                   encoder_hidden_states=_randn(b, t, c.text_embed_dim, dtype=dtype, device=device, seed=2),
                   encoder_attention_mask=mask.to(device),
                   pooled_projections=_randn(b, c.pooled_projection_dim, dtype=dtype, device=device, seed=3))
        if self.guidance:
            out["guidance"] = torch.full((b,), 6000.0, device=device, dtype=dtype)  # the pipeline's 6.0 * 1000
        return out

    def dynamic_shapes(self, batch, h, w, text, f=None):
        s = self.latent_step
        ds = dict(hidden_states={0: batch, 2: _scaled(f, self.frame_step), 3: _scaled(h, s), 4: _scaled(w, s)},
                  timestep={0: batch}, encoder_hidden_states={0: batch, 1: text},
                  encoder_attention_mask={0: batch, 1: text}, pooled_projections={0: batch})
        if self.guidance:
            ds["guidance"] = {0: batch}
        return ds


_ARCHES = {"FluxTransformer2DModel": _Flux, "UNet2DConditionModel": _UNet, "SD3Transformer2DModel": _SD3,
           "WanTransformer3DModel": _Wan, "HunyuanVideoTransformer3DModel": _Hunyuan}
SUPPORTED = tuple(_ARCHES)
DEFAULT_OPSET = 20
NEWEST_OPSET = 23  # the newest opset whose operator forms fastgen exports and tests
# Fused ONNX operators torch.onnx emits from opset 23 on -> the aten op each comes from. A target
# without the fused operator gets that op traced as its decomposition (MatMul-Softmax-MatMul;
# Pow / ReduceMean / Sqrt) instead.
_FUSED = {"Attention": "scaled_dot_product_attention", "RMSNormalization": "rms_norm"}


def _initializers_as_inputs(graph) -> list:
    """Move every initializer of ``graph`` (an ``onnx_ir.Graph``) to the graph's inputs, without its
    value; returns ``[(value, tensor)]`` for ``_inputs_as_initializers``."""
    moved = []
    for name in list(graph.initializers):
        value = graph.initializers.pop(name)
        moved.append((value, value.const_value))
        value.const_value = None
        graph.inputs.append(value)
    return moved


def _inputs_as_initializers(graph, moved) -> None:
    """Undo ``_initializers_as_inputs``."""
    for value, tensor in moved:
        graph.inputs.remove(value)
        value.const_value = tensor
        graph.register_initializer(value)


def _optimize(model, opset: int, target_name: str | None) -> None:
    """torch.onnx's optimisation of ``model`` (an ``onnx_ir.Model``, in place): constant folding and
    clean-up, then at opset 23 onnxscript's fusions into ``RMSNormalization`` / ``RotaryEmbedding``
    (and onnxruntime's ``GroupQueryAttention``) from the primitive ops diffusers' own norms and
    rotations are written in, only for a target that runs every form they produce (unset: as
    torch.onnx does). A target without them keeps the primitive forms."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(model)
    if opset < 23:
        return  # the fusions target opset 23 only
    if target_name is not None:
        from fastgen.export.operators import target

        t = target(target_name)
        if not ({"RMSNormalization", "RotaryEmbedding"} <= t.operators and "com.microsoft" in t.domains):
            return
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _forms(opset, target_name, arch=None):
    """(opset, aten ops to decompose) for ``opset`` (None: the default), ``target_name`` and the
    architecture (``arch.masked_attention``: SDPA always decomposed at opset 23)."""
    t = None
    if target_name is not None:
        from fastgen.export.operators import target

        t = target(target_name)  # ValueError naming the known targets
    if opset is None:
        opset = DEFAULT_OPSET if t is None or t.max_opset is None else min(t.max_opset, NEWEST_OPSET)
    if not isinstance(opset, int) or isinstance(opset, bool) or not 18 <= opset <= NEWEST_OPSET:
        raise ValueError(f"opset must be an int from 18 (torch.onnx's dynamo exporter) to {NEWEST_OPSET}, got {opset!r}")
    if t is not None and t.max_opset is not None and not (t.min_opset or 0) <= opset <= t.max_opset:
        raise ValueError(f"{t.name} parses opsets {t.min_opset} to {t.max_opset}, got opset={opset}: leave opset "
                         "unset to get the newest it parses")
    if opset < 23:
        return opset, []
    # A padded-text mask [B, 1, 1, S] broadcast over the queries is valid ONNX Attention, but
    # onnxruntime's kernel requires the mask's query dimension to equal the query length (a
    # full [B, 1, S, S] mask would cost O(S^2) memory): masked models keep MatMul-Softmax-MatMul.
    masked = ["Attention"] if arch is not None and arch.masked_attention else []
    return opset, [getattr(torch.ops.aten, a).default for op, a in _FUSED.items()
                   if op in masked or (t is not None and op not in t.operators)]


_VAE_FRAMES = 4  # video frames per latent frame after the first (Wan's and HunyuanVideo's VAEs)
_OUTPUT = "noise_pred"  # not "sample": the UNet's input already has that name, and ONNX names are unique


# --------------------------------------------------------------------------------------------
# Ranges -> torch.export dimensions
# --------------------------------------------------------------------------------------------


class _Range:
    """A dimension's range in model units (batch items, spatial steps, tokens); ``hi`` None: no bound."""

    def __init__(self, name: str, lo: int, hi: int | None):
        self.name, self.lo, self.hi = name, lo, hi

    @property
    def static(self) -> bool:
        return self.hi == self.lo

    def clamp(self, v: int) -> int:
        return max(self.lo, v if self.hi is None else min(v, self.hi))


def _mul(a: _Range, b: _Range) -> _Range:
    hi = None if a.hi is None or b.hi is None else a.hi * b.hi
    return _Range("image_tokens", a.lo * b.lo, hi)


def _dim(name: str, r: _Range):
    if r.static:
        return torch.export.Dim.STATIC  # a fixed dimension: the example's size is baked in
    return torch.export.Dim(name, min=r.lo, max=r.hi) if r.hi is not None else torch.export.Dim(name, min=r.lo)


def _scaled(r: _Range, step: int):
    # A latent side that must stay a multiple of ``step``: step * Dim, so torch.export can prove
    # every down/upsampling divides evenly instead of guarding on (or specialising) the size.
    d = _dim(r.name, r)
    return d if r.static or step == 1 else step * d


def _parse(name: str, value, step: int, unit: str, max_units: int | None,
           limit: str = "what the model accepts") -> _Range:
    """``value``: None (all the model accepts), an int (fixed) or (min, max) with max None for
    unbounded, in ``unit``s that must be multiples of ``step``; returns the range in steps.
    ``limit`` names where ``max_units`` comes from, for the error."""
    if value is None:
        return _Range(name, 1, max_units)
    lo, hi = (value, value) if isinstance(value, int) and not isinstance(value, bool) else _pair(name, value)
    if lo < 1 or (hi is not None and lo > hi):
        raise ValueError(f"{name} must be positive with min <= max, got {value!r}")
    if lo % step or (hi is not None and hi % step):
        top = step if hi is None else hi // step * step or step
        raise ValueError(f"{name} must be multiples of {step} {unit} for this model, got {value!r}: round to "
                         f"({lo // step * step or step}, {top})")
    if max_units is not None and hi is not None and hi // step > max_units:
        raise ValueError(f"{name} max {hi} {unit} exceeds {limit} ({max_units * step} {unit})")
    return _Range(name, lo // step, max_units if hi is None else hi // step)


def _pair(name, value) -> tuple[int, int]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None, an int or a (min, max) pair, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi) if v is not None) or lo is None:
        raise ValueError(f"{name} must be whole numbers (max None: unbounded), got {value!r}")
    return lo, hi


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _denoiser(pipe_or_model) -> torch.nn.Module:
    if isinstance(pipe_or_model, torch.nn.Module):
        # torch.compile's wrapper: the module it compiles is what runs (and what torch.export traces)
        model = getattr(pipe_or_model, "_orig_mod", pipe_or_model)
    else:
        model = getattr(pipe_or_model, "transformer", None) or getattr(pipe_or_model, "unet", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"to_onnx takes a diffusers pipeline (with a transformer or unet) or a denoiser model, "
                             f"got {type(pipe_or_model).__name__}")
    if type(model).__name__ not in _ARCHES:
        raise ValueError(f"to_onnx exports {', '.join(SUPPORTED)}; got {type(model).__name__}")
    merging = sorted({f"tome={c.tome}, todo={c.todo}" for c in _patch_configs(model)
                      if c.tome is not None or c.todo is not None})
    if merging:
        # Merge maps are drawn on the host per forward (seeded, shape-dependent): a graph could only
        # bake one forward's map in as constants. Refusing beats exporting a different model.
        raise ValueError("to_onnx exports exact patches only; this model merges tokens (tome / todo), whose merge "
                         "maps are drawn on the host at every forward and cannot be one static graph: patch it "
                         f"without tome / todo to export. Patches found: {'; '.join(merging)}")
    return model


def _patch_configs(model):
    """The ``PatchConfig`` of every live fastgen patch on ``model``'s attention modules."""
    from fastgen.patching.processors.base import ATTN_STATE, FastgenProcessor  # lazy: patching imports much

    configs = []
    for module in model.modules():
        state = module.__dict__.get(ATTN_STATE)
        if isinstance(getattr(module, "processor", None), FastgenProcessor) and state is not None \
                and not state.removed and state.config not in configs:
            configs.append(state.config)
    return configs


def to_onnx(pipe_or_model, path, *, height=None, width=None, frames=None, batch=None, dtype=torch.float32,
            opset: int | None = None, target: str | None = None, validate: bool = True,
            progress: bool = False) -> ExportReport:
    """Export the denoiser of ``pipe_or_model`` to ONNX at ``path``, with dynamic dimensions.

    - ``pipe_or_model``: a diffusers pipeline (its ``transformer`` or ``unet``) or the model:
      ``FluxTransformer2DModel``, ``UNet2DConditionModel`` (SD 1.5 / SD 2 / SDXL layouts),
      ``SD3Transformer2DModel`` (SD3, SD3.5), ``WanTransformer3DModel`` (text- and image-to-video),
      ``HunyuanVideoTransformer3DModel``. Patched or not: a ``fastgen.patch``-ed model is traced
      with its ops' PyTorch references (``fastgen.ops.portable``), so the graph holds standard ONNX
      operators only and is validated against the patched model running its kernels. Token merging
      (``tome`` / ``todo``) is refused (see errors).
    - ``height`` / ``width``: image size in pixels, None (default: every size the model accepts),
      an int (fixed) or a ``(min, max)`` pair; multiples of the model's pixel step (Flux 16; UNet
      8 * 2**(levels - 1): 64 for SD 1.5, 32 for SDXL; SD3 / Wan / HunyuanVideo 8 * patch size).
      Flux's image-token dimension gets the product range: (hmin/16 * wmin/16, hmax/16 * wmax/16).
      SD3's sides stop at ``pos_embed_max_size`` patches, Wan's at ``rope_max_seq_len``.
    - ``frames``: video models only: video frames, None (every length), an int or ``(min, max)``,
      each 4k + 1 (the VAE keeps the first frame and packs 4 into one latent frame after it).
    - ``batch``: None (default: 1 and up; UNet 1 to 63), an int or ``(min, max)``. The text length is
      dynamic (1 and up), except Wan image-to-video's, which upstream fixes at 512.
    - ``dtype``: weights and inputs (default float32); a model in another dtype is converted on a
      copy, the caller's model is never changed. ``bfloat16`` exports but cannot be validated on
      onnxruntime's CPU provider: pass ``validate=False``.
    - ``opset``: ONNX opset, 18 to 23; default 20, or with a ``target`` the newest it parses.
    - ``target``: the runtime the graph is for (``fastgen.export.operators``: ``"onnxruntime"``,
      ``"onnxruntime:<Provider>"``, ``"tensorrt-10.1"``, ``"tensorrt-10.14"``, ``"tensorrt-10.15"``).
      Operator forms follow it: at opset 23, fused ``Attention`` / ``RMSNormalization`` only where
      the target runs them (TensorRT: ``Attention`` from 10.14, ``RMSNormalization`` from 10.15),
      else their decompositions; then every node is checked against the target's operator list.
    - A model on the ``meta`` device (built under ``torch.device("meta")``: no memory for weights)
      exports its graph with the weights as graph inputs and no optimisation (constant folding
      needs values): how released sizes are checked on a machine smaller than them.
    - ``validate``: run onnxruntime (CPUExecutionProvider) at 3 shapes inside the ranges (an odd
      batch, a non-square size, other text lengths and frame counts than the export's example) and
      compare with PyTorch; the differences are in the report, not judged here.
    - ``progress``: a tqdm bar over the phases (trace, ONNX, check, one step per validated shape).

    Inputs of the graph: the model's tensors by their diffusers names (see the ``_Flux``, ``_UNet``,
    ``_SD3``, ``_Wan``, ``_Hunyuan`` docstrings); one output, ``noise_pred``, shaped like the latent
    input. The file carries fastgen's metadata (``read_metadata``: model class and config, input
    names, dtype, ranges). Weights go to ``<path>.data`` (external data) when they exceed 2 GiB,
    else into the file. The file passes ``onnx.checker.check_model(path, full_check=True)`` before
    this returns.

    Raises ``ValueError`` for an unsupported pipeline / model, a model patched with token merging,
    ranges that are not positive, ordered multiples of the step or that exceed the model's limit,
    ``frames`` that are not 4k + 1 or given to an image model, bfloat16 with ``validate=True``, an
    opset outside 18-23 or the target's range, an unknown target, and (after writing the file) a
    graph with nodes the target refuses, naming each; ``ImportError`` when onnx / onnxscript (or
    onnxruntime, to validate) is missing.
    """
    model = _denoiser(pipe_or_model)
    arch = _ARCHES[type(model).__name__](model)
    if frames is not None and not arch.video:
        raise ValueError(f"frames applies to video models; {type(model).__name__} is an image model: pass frames=None")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if validate and dtype == torch.bfloat16:
        raise ValueError("onnxruntime's CPU provider cannot run bfloat16 graphs: pass validate=False (or export "
                         "float16 / float32)")
    opset, decompose = _forms(opset, target, arch)
    try:
        import onnx
    except ImportError as e:
        raise ImportError("to_onnx needs onnx and onnxscript: pip install onnx onnxscript") from e

    b = _parse("batch", batch, 1, "items", arch.max_batch, arch.max_batch_limit)
    h = _parse("height", height, arch.px_step, "pixels", arch.max_units)
    w = _parse("width", width, arch.px_step, "pixels", arch.max_units)
    f = _parse_frames(frames, arch) if arch.video else None
    text = _dim("text_tokens", _Range("text_tokens", 1, None))

    param = next(model.parameters())
    device = param.device
    meta = device.type == "meta"
    if meta and validate:
        raise ValueError("a model on the meta device has no weights to run: pass validate=False (its export is the "
                         "graph alone, weights as graph inputs)")
    if param.dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    was_training = model.training
    model.eval()  # dropout off while tracing; restored below
    wrapper = arch.wrapper(model).eval()
    # Example sizes of 2+ (of 0/1 torch.export would specialise) and unlike each other, inside the ranges.
    # Video: 9 frame steps, a size no other example dimension has (else torch.export may tie them).
    example = arch.tensors(b.clamp(2), h.clamp(3), w.clamp(5), 7, dtype, device, fu=f.clamp(9) if f else 1)
    dyn = arch.dynamic_shapes(_dim("batch", b), h, w, text, f)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > _PROTO_LIMIT and not meta
    from tqdm.auto import tqdm

    bar = tqdm(total=3 + (len(_SHAPES) if validate else 0), desc=f"to_onnx {arch.name}", unit="step",
               disable=not progress)
    start = time.perf_counter()
    try:
        # torch.export first, on its own: given a module, torch.onnx.export retries strategies when
        # the dynamic shapes fail and can hand back a graph that runs only at the example's size
        # (seen with SD3's position crop). An ExportedProgram's dims are proven, or this raises.
        with torch.no_grad(), portable(), arch.traceable(model), warnings.catch_warnings():
            # portable(): fastgen's ops (a patched model) trace as their PyTorch references, so the
            # graph holds standard operators only, and no step cache serves a traced forward.
            # torch's exporter warns about its own internals (a pytree deprecation; Dim names it
            # keeps anyway): nothing a caller can act on, and errors under -W error.
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            warnings.filterwarnings("ignore", r"# The axis name: .* will not be used", UserWarning)
            bar.set_postfix_str("torch.export")
            program = torch.export.export(wrapper, (), kwargs=example, dynamic_shapes=dyn, strict=False)
            if decompose:  # fused ONNX forms the target lacks: trace those ops as their decompositions
                table = torch.export.default_decompositions()
                program = program.run_decompositions({op: table[op] for op in decompose})
            bar.update()
            bar.set_postfix_str("torch.onnx")
            # dynamic_shapes again only names the ONNX dims after the Dims (else "s2", "s29").
            exported = torch.onnx.export(program, (), kwargs=example, dynamo=True, dynamic_shapes=dyn,
                                         opset_version=opset, output_names=[_OUTPUT], optimize=False,
                                         verbose=False)
            # The module's weights and buffers sit out the optimisation as graph inputs: constant
            # folding would otherwise fold them into new tensors (a Linear weight into its
            # transpose, a norm's weight into a reshape) and merge equal ones, and the file would
            # no longer hold each parameter under its name (what a TensorRT refit sets; the
            # runtimes fold such transposes themselves when they load the graph). On meta they stay
            # inputs: a complete graph to check (onnx.checker, operators, dims) for a model larger
            # than this machine's memory.
            graph = exported.model.graph
            weights = _initializers_as_inputs(graph)
            _optimize(exported.model, opset, target)
            if not meta:
                _inputs_as_initializers(graph, weights)
            data = path.with_name(path.name + ".data")
            if data.exists():  # a previous export's weights at this path: never leave them beside new ones
                data.unlink()
            exported.save(str(path), external_data=external)
            bar.update()
    finally:
        model.train(was_training)
    export_s = time.perf_counter() - start
    bar.set_postfix_str("onnx.checker")
    # Given a path, the checker also reads external data and runs shape inference (full_check).
    ranges = _ranges(arch, b, h, w, f)
    _finish(path, model, arch, dtype, ranges, _symbols(dyn), meta)
    onnx.checker.check_model(str(path), full_check=True)
    if target is not None:
        from fastgen.export.operators import require_supported

        require_supported(str(path), target)  # ValueError naming every node the target would refuse
    bar.update()

    proto = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    report = ExportReport(
        path=path, architecture=arch.name, opset=opset, target=target, dtype=dtype, weights=not meta, inputs=_dims(proto.graph.input),
        outputs=_dims(proto.graph.output),
        ranges=ranges,
        external_data=external, file_bytes=path.stat().st_size + (data.stat().st_size if external else 0),
        export_seconds=export_s)
    if validate:
        start = time.perf_counter()
        report.checks = _validate(path, arch, wrapper, model, b, h, w, f, dtype, device, bar)
        report.validate_seconds = time.perf_counter() - start
    bar.close()
    return report


# Keys of the ONNX model's ``metadata_props`` that ``to_onnx`` writes, so a runtime module can stand in
# for the model (``config``, input names) without the PyTorch model at hand.
METADATA = ("fastgen.version", "fastgen.class", "fastgen.architecture", "fastgen.config", "fastgen.inputs",
            "fastgen.output", "fastgen.dtype", "fastgen.ranges", "fastgen.symbols")


def _frames(units: int | None, arch) -> int | None:
    # frame steps -> video frames: the VAE makes (frames - 1) / 4 + 1 latent frames
    return None if units is None else (units * arch.frame_step - 1) * _VAE_FRAMES + 1


def _ranges(arch, b, h, w, f) -> dict[str, tuple[int, int | None]]:
    out = {"batch": (b.lo, b.hi), "height": (h.lo * arch.px_step, _px(h.hi, arch.px_step)),
           "width": (w.lo * arch.px_step, _px(w.hi, arch.px_step))}
    if f is not None:
        out["frames"] = (_frames(f.lo, arch), _frames(f.hi, arch))
    return out


def _parse_frames(value, arch) -> _Range:
    """Video frames (None: all the model accepts; an int; (min, max)), each 4k + 1 with (k + 1)
    latent frames a multiple of the model's frame step -> the range in frame steps."""
    if value is None:
        return _Range("latent_frames", 1, arch.max_frame_units)
    lo, hi = (value, value) if isinstance(value, int) and not isinstance(value, bool) else _pair("frames", value)
    if lo < 1 or (hi is not None and lo > hi):
        raise ValueError(f"frames must be positive with min <= max, got {value!r}")
    if hi is None:  # unbounded: up to what the model accepts
        hi = _frames(arch.max_frame_units, arch) if arch.max_frame_units is not None else None
    for v in (lo,) if hi is None else (lo, hi):
        latent = (v - 1) // _VAE_FRAMES + 1
        if (v - 1) % _VAE_FRAMES or latent % arch.frame_step:
            raise ValueError(f"frames must be 4k + 1 (the VAE keeps the first frame and compresses 4 to 1 after it)"
                             + (f" with k + 1 a multiple of {arch.frame_step}" if arch.frame_step > 1 else "")
                             + f", got {value!r}")
    units = (((lo - 1) // _VAE_FRAMES + 1) // arch.frame_step,
             None if hi is None else ((hi - 1) // _VAE_FRAMES + 1) // arch.frame_step)
    if arch.max_frame_units is not None and units[1] > arch.max_frame_units:
        raise ValueError(f"frames max {hi} exceeds what the model accepts ({_frames(arch.max_frame_units, arch)})")
    return _Range("latent_frames", *units)


def _symbols(dynamic_shapes: dict) -> dict[str, list]:
    """Each symbolic dimension of the graph by name -> [min, max or None], in the graph's own units
    (batch items, tokens, latent frame / side steps; a dimension ``2*height`` is twice its symbol)."""
    out = {}
    for dims in dynamic_shapes.values():
        for d in dims.values():
            d = getattr(d, "root", d)  # a derived dimension (step * Dim): its root symbol
            if isinstance(d, torch.export.Dim):
                hi = d.max if isinstance(d.max, int) and d.max < 2**62 else None  # int_oo: unbounded
                out[d.__name__] = [int(d.min), hi]
    return out


def _finish(path: Path, model, arch, dtype, ranges, symbols, weights_as_inputs: bool) -> None:
    """Rewrite the exported graph file in place: boolean ``Where`` as logic ops, fastgen's metadata.
    The weights stay where the exporter put them (inline or in <path>.data)."""
    import json

    import onnx

    from fastgen import __version__

    proto = onnx.load(str(path), load_external_data=False)
    _bool_where_as_logic(proto.graph)
    values = {"fastgen.version": __version__, "fastgen.class": type(model).__name__,
              "fastgen.architecture": arch.name, "fastgen.config": model.to_json_string(),
              "fastgen.inputs": json.dumps(list(arch.inputs)), "fastgen.output": _OUTPUT,
              "fastgen.dtype": str(dtype).removeprefix("torch."), "fastgen.ranges": json.dumps(ranges),
              "fastgen.symbols": json.dumps(symbols),
              "fastgen.weights": "false" if weights_as_inputs else "true"}
    del proto.metadata_props[:]
    for k, v in values.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))


def _bool_where_as_logic(graph) -> int:
    """Replace each ``Where(c, x, y)`` on booleans (``masked_fill`` of a bool mask: HunyuanVideo's
    attention mask) with ``Or(And(c, x), And(Not(c), y))``: the same values, and onnxruntime's CPU
    provider has no boolean ``Where`` kernel while every runtime has the logic ops. Needs the value
    types the exporter records; returns how many nodes were replaced."""
    import onnx
    from onnx import helper

    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update((t.name, t.data_type) for t in graph.initializer)
    nodes, replaced = [], 0
    for node in graph.node:
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") \
                or types.get(node.output[0]) != onnx.TensorProto.BOOL:
            nodes.append(node)
            continue
        c, x, y = node.input
        base = node.name or f"where{replaced}"
        nodes += [helper.make_node("Not", [c], [f"{base}_not"], name=f"{base}_not"),
                  helper.make_node("And", [c, x], [f"{base}_then"], name=f"{base}_then"),
                  helper.make_node("And", [f"{base}_not", y], [f"{base}_else"], name=f"{base}_else"),
                  helper.make_node("Or", [f"{base}_then", f"{base}_else"], [node.output[0]], name=base)]
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
    return replaced


def read_metadata(path) -> dict[str, object]:
    """The ``fastgen.*`` metadata ``to_onnx`` wrote into the ONNX file at ``path`` (``parse_metadata``).
    Raises ``ValueError`` for a file ``to_onnx`` did not write."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return parse_metadata(props, str(path))


def parse_metadata(props: dict[str, str], where: str = "the graph") -> dict[str, object]:
    """``to_onnx``'s metadata from a graph's ``metadata_props`` as a dict of strings (onnx's, or
    onnxruntime's ``session.get_modelmeta().custom_metadata_map``): ``class``, ``architecture``,
    ``config`` (the model's diffusers config, a dict), ``inputs`` (graph input names in order),
    ``output``, ``dtype`` (a ``torch.dtype``), ``ranges`` (as in ``ExportReport.ranges``, pixels and
    video frames), ``symbols`` (each symbolic graph dimension -> (min, max or None) in the graph's
    units), ``weights`` (False for a graph exported from the meta device: its weights are graph
    inputs, nothing can run it as it is), ``version``. Raises ``ValueError`` naming ``where`` when fastgen's keys are missing."""
    import json

    missing = [k for k in METADATA if k not in props]
    if missing:
        raise ValueError(f"{where} has no fastgen metadata ({', '.join(missing)}): export it with "
                         "fastgen.export.to_onnx")
    return {"version": props["fastgen.version"], "class": props["fastgen.class"],
            "architecture": props["fastgen.architecture"], "config": json.loads(props["fastgen.config"]),
            "inputs": json.loads(props["fastgen.inputs"]), "output": props["fastgen.output"],
            "dtype": getattr(torch, props["fastgen.dtype"]),
            "ranges": {k: tuple(v) for k, v in json.loads(props["fastgen.ranges"]).items()},
            "symbols": {k: tuple(v) for k, v in json.loads(props["fastgen.symbols"]).items()},
            # False: exported from the meta device, every weight a graph input (absent: before the key)
            "weights": props.get("fastgen.weights", "true") == "true"}


def _px(units: int | None, step: int) -> int | None:
    return None if units is None else units * step


def _dims(values) -> dict[str, tuple[int | str, ...]]:
    return {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim) for v in values}


# Validated shapes in model units (batch, height steps, width steps, text tokens): odd batches, a
# non-square and a square size, text lengths other than the example's 7.
_SHAPES = ((3, 2, 5, 5, 2), (1, 4, 4, 11, 1), (5, 3, 1, 3, 3))


def _validate(path, arch, wrapper, model, b, h, w, f, dtype, device, bar) -> list[ShapeCheck]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("validating an export needs onnxruntime: pip install onnxruntime (or validate=False)") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks, seen = [], set()
    was_training = model.training
    model.eval()
    try:
        for bs, hu, wu, t, fu in _SHAPES:
            bar.set_postfix_str("onnxruntime")
            bar.update()
            bs, hu, wu, fu = b.clamp(bs), h.clamp(hu), w.clamp(wu), (f.clamp(fu) if f else 1)
            if (bs, hu, wu, t, fu) in seen:
                continue
            seen.add((bs, hu, wu, t, fu))
            x = arch.tensors(bs, hu, wu, t, dtype, device, fu=fu)
            with torch.no_grad():
                ref = wrapper(**x).float().cpu()
            feed = {k: v.cpu().numpy() for k, v in x.items()}
            got = torch.from_numpy(session.run([_OUTPUT], feed)[0]).float()
            if got.shape != ref.shape:
                raise RuntimeError(f"onnxruntime returned {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
            diff = (got - ref).abs().max().item()
            scale = ref.abs().max().item()
            text = x["encoder_hidden_states"].shape[1]  # every denoiser's text input; Wan I2V's is fixed at 512
            checks.append(ShapeCheck(bs, hu * arch.px_step, wu * arch.px_step, text, diff,
                                     diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf),
                                     _frames(fu, arch) if f else None))
    finally:
        model.train(was_training)
    return checks


__all__ = ["ExportReport", "METADATA", "SUPPORTED", "ShapeCheck", "parse_metadata", "read_metadata", "to_onnx"]
