"""Low-VRAM planning (issue #13): for a denoiser, a precision and a card, how many bytes its weights
take, how much working memory one forward needs at each shape, and the TensorRT weight-streaming
budget (``engine.weight_streaming_budget_v2``: bytes of weights kept on the card) that fits beside it.

Everything is counted on the meta device: the model is built from its config with no weights
allocated, so Flux-dev (12B) plans on any machine in seconds.

Weights: every parameter of the model, at the precision's bytes (``PRECISIONS``): fp32 4, bf16 / fp16 2
(modules the class keeps in float32, ``_keep_in_fp32_modules``, 4), fp8 1 byte for the weights of
Linear and Conv layers (what FP8 quantization converts) and 2 for the rest (biases, norms, embeddings).

Activations, per shape: the peak of live tensors during one forward in PyTorch eager, measured by
running diffusers' own forward on meta tensors of that shape, in the precision's activation dtype (so
what diffusers keeps in float32, RoPE tables, rotated queries, is counted in float32). Every tensor an
op allocates counts from the op that makes it until Python drops its last reference (views count
nothing); the inputs count from the start. Attention is counted as a fused kernel (flash /
memory-efficient attention, TensorRT's fused MHA): its output and a float32 log-sum-exp per query row,
O(N * d), never the O(N^2) score matrix of the math path (which is what meta tensors would otherwise
run). No per-architecture formula: what is live when is what diffusers' code keeps live (a UNet's skip
connections, a single-stream Flux block's ``[attention, 4x MLP]`` concatenation, the inputs the caller
still holds), so the estimate follows diffusers releases. ``tests/test_export_plan.py`` checks it
against the CPU allocator's measured peak of real forwards (torch's profiler memory events): within 10 %
(0-6 % measured) for the tiny and small Flux and UNet configs at latents of 24 x 32 and up. (At the tiny
UNet's own 8 x 8 latents the measurement is 1.8x the estimate: oneDNN copies a convolution's weights per
call on a CPU, scratch as large as those activations that no estimate of a GPU engine should count.)

For an engine this is an upper estimate: TensorRT fuses the elementwise tails (GELU into its matmul,
gated residuals) and so keeps fewer tensors live, and reports its exact need after a build
(``engine.device_memory_size_v2``, ``weight_streaming_scratch_memory_size``).

Budget, per card: ``card - activations - workspace - reserve``, where workspace is TensorRT's tactic
scratch (``IBuilderConfig.set_memory_pool_limit(WORKSPACE, ...)``, default 1 GiB) and reserve what the
process holds besides (CUDA context, the runtime's libraries, allocator slack; default 1 GiB). Weights
that fit there are all kept on the card (budget = the weights, no streaming); otherwise that many bytes
stay and the rest stream from host memory each forward. Below the largest weight tensor nothing can be
streamed (a layer's weights must be on the card while it runs): the plan says it does not fit, as it
does when the activations alone exceed the card. One engine with several profiles allocates for its
largest: ``Plan.budget_bytes`` is computed with the largest activation estimate.

``fastgen.export.plan`` is this module's ``plan`` function (the package exports it); the module's other
names import as ``from fastgen.export.plan import FAMILIES``. ``fastgen export plan`` prints ``Plan.table``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
MIB = 2**20
DEFAULT_WORKSPACE = GIB
DEFAULT_RESERVE = GIB


@dataclass(frozen=True)
class Precision:
    """Bytes per element: ``weight`` (parameters), ``quantized`` (Linear / Conv weights: 1 for fp8),
    ``fp32_kept`` (modules the class keeps in float32), ``activation`` (the dtype the forward runs in)."""

    name: str
    weight: int
    quantized: int
    fp32_kept: int
    activation: torch.dtype


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 4, torch.float32),
    "bf16": Precision("bf16", 2, 2, 4, torch.bfloat16),
    "fp16": Precision("fp16", 2, 2, 4, torch.float16),
    # FP8 quantizes the GEMM weights (per-tensor scale); activations, biases and norms stay 16-bit.
    "fp8": Precision("fp8", 2, 1, 4, torch.bfloat16),
}


@dataclass(frozen=True)
class Shape:
    """One forward's shape: ``batch`` (items per forward: 2 for a CFG batch), ``height`` / ``width``
    in pixels, ``frames`` (video models: frames of the video, 4k + 1; None for image models),
    ``text_tokens`` (prompt tokens the denoiser attends to)."""

    batch: int
    height: int
    width: int
    text_tokens: int
    frames: int | None = None

    def __str__(self) -> str:
        video = f", {self.frames} frames" if self.frames is not None else ""
        return f"batch {self.batch}, {self.height}x{self.width}{video}, {self.text_tokens} text"


@dataclass(frozen=True)
class LiveTensor:
    """A tensor live at the activation peak: its shape, dtype name and bytes."""

    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True)
class Profile:
    """The estimate at one shape: ``tokens`` (image / video tokens the transformer sees, or latent
    pixels at a UNet's first level), ``activation_bytes`` (module doc), where the peak is (``peak_at``:
    module path, ``peak_op``: the allocating op) and the largest tensors then. ``Plan.budget_for`` gives
    the budget of an engine with this shape alone."""

    shape: Shape
    tokens: int
    activation_bytes: int
    peak_at: str
    peak_op: str
    largest_live: tuple[LiveTensor, ...]


@dataclass(frozen=True)
class Plan:
    """What ``plan`` found (byte counts are ints; GiB = 2**30 bytes in ``table``).

    - ``params``, ``weight_bytes``, ``largest_weight_bytes``: every parameter at the precision.
    - ``profiles``: one ``Profile`` per shape.
    - ``activation_bytes``: the largest profile's (one engine allocates for its largest profile).
    - ``budget_bytes``: weights to keep on the card with every profile in one engine: all of them
      (``streaming`` False) when they fit, fewer (``streaming`` True) when not, None when nothing fits
      (``verdict`` says why).
    """

    name: str
    cls: str
    precision: str
    params: int
    weight_bytes: int
    largest_weight_bytes: int
    vram_bytes: int
    workspace_bytes: int
    reserve_bytes: int
    profiles: tuple[Profile, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def activation_bytes(self) -> int:
        return max(p.activation_bytes for p in self.profiles)

    @property
    def available_bytes(self) -> int:
        """Card bytes left for weights beside the largest activations, workspace and reserve (may be <= 0)."""
        return self.vram_bytes - self.activation_bytes - self.workspace_bytes - self.reserve_bytes

    def budget_for(self, profile: Profile) -> tuple[int | None, str]:
        """(weight bytes kept on the card or None, the verdict in words) of an engine with ``profile`` alone."""
        available = self.vram_bytes - profile.activation_bytes - self.workspace_bytes - self.reserve_bytes
        return _budget(available, self.weight_bytes, self.largest_weight_bytes)

    @property
    def budget_bytes(self) -> int | None:
        return _budget(self.available_bytes, self.weight_bytes, self.largest_weight_bytes)[0]

    @property
    def fits(self) -> bool:
        return self.budget_bytes is not None

    @property
    def streaming(self) -> bool:
        return self.fits and self.budget_bytes < self.weight_bytes

    @property
    def streamed_bytes(self) -> int:
        """Weight bytes read from host memory every forward (0 without streaming)."""
        return self.weight_bytes - self.budget_bytes if self.fits else self.weight_bytes

    @property
    def verdict(self) -> str:
        return _budget(self.available_bytes, self.weight_bytes, self.largest_weight_bytes)[1]

    def table(self) -> str:
        """The plan for humans: a header, one markdown row per profile, the verdict."""
        lines = [f"Plan: {self.name} ({self.cls}), {self.precision}, card {_gib(self.vram_bytes)}",
                 f"weights: {self.params / 1e9:.3f} B parameters, {_gib(self.weight_bytes)} at {self.precision} "
                 f"(largest tensor {_mib(self.largest_weight_bytes)})",
                 f"workspace {_gib(self.workspace_bytes)} (TensorRT tactic scratch), reserve "
                 f"{_gib(self.reserve_bytes)} (CUDA context, runtime, slack)", "",
                 "| shape | tokens | activations | peak in | weights kept on the card | streamed per forward "
                 "| verdict |", "| --- | ---: | ---: | --- | ---: | ---: | --- |"]
        for p in self.profiles:
            budget = self.budget_for(p)[0]
            kept = "" if budget is None else _gib(budget)
            streamed = _gib(self.weight_bytes - (budget or 0))
            if budget is None:
                short = "does not fit"
            elif budget < self.weight_bytes:
                short = f"streams {1 - budget / self.weight_bytes:.0%} of the weights"
            else:
                short = "fits, no streaming"
            lines.append(f"| {p.shape} | {p.tokens} | {_gib(p.activation_bytes)} | {p.peak_at} | {kept} | "
                         f"{streamed} | {short} |")
        lines += ["", f"One engine with {'these profiles' if len(self.profiles) > 1 else 'this profile'}: "
                  + self.verdict]
        if self.fits and self.streaming:
            lines.append(f"  engine.weight_streaming_budget_v2 = {self.budget_bytes}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _budget(available: int, weights: int, largest: int) -> tuple[int | None, str]:
    """(bytes of weights kept on the card or None, the verdict in words)."""
    if available <= 0:
        return None, (f"does not fit: the activations, workspace and reserve alone exceed the card by "
                      f"{_gib(-available)}; lower the batch or resolution, or use a larger card")
    if weights <= available:
        return weights, f"fits: every weight on the card, {_gib(available - weights)} to spare; no streaming"
    if available < largest:
        return None, (f"does not fit: {_gib(available)} left for weights, below the largest weight tensor "
                      f"({_mib(largest)}); lower the batch or resolution, or use a larger card")
    return available, (f"fits with weight streaming: {_gib(available)} of {_gib(weights)} weights kept "
                       f"({available / weights:.0%}), {_gib(weights - available)} streamed per forward")


# --------------------------------------------------------------------------------------------
# Per-architecture facts: pixel step, default shape, the forward's inputs as meta tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """How to call one denoiser class at a ``Shape``. ``step(config)``: pixels per step of its
    latent grid (sizes must be multiples); ``default``: the diffusers pipeline's default call;
    ``inputs(config, shape, dtype)``: the forward's kwargs on the meta device; ``tokens``: image /
    video tokens at a shape."""

    video: bool
    step: Callable[[dict], int]
    default: Callable[[dict], Shape]
    inputs: Callable[[dict, Shape, torch.dtype], dict]
    tokens: Callable[[dict, Shape], int]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _latent_frames(shape: Shape) -> int:
    return (shape.frames - 1) // 4 + 1  # the video VAEs keep the first frame and compress each 4 after it


def _flux_inputs(c, s: Shape, dtype):
    tokens = (s.height // 16) * (s.width // 16)  # VAE /8, then 2x2 packing
    kw = dict(hidden_states=_meta(s.batch, tokens, c["in_channels"], dtype=dtype),
              encoder_hidden_states=_meta(s.batch, s.text_tokens, c["joint_attention_dim"], dtype=dtype),
              pooled_projections=_meta(s.batch, c["pooled_projection_dim"], dtype=dtype),
              timestep=_meta(s.batch, dtype=dtype), img_ids=_meta(tokens, 3), txt_ids=_meta(s.text_tokens, 3))
    if c.get("guidance_embeds"):
        kw["guidance"] = _meta(s.batch, dtype=dtype)
    return kw


def _unet_inputs(c, s: Shape, dtype):
    kw = dict(sample=_meta(s.batch, c["in_channels"], s.height // 8, s.width // 8, dtype=dtype),
              timestep=_meta(s.batch), encoder_hidden_states=_meta(s.batch, s.text_tokens, c["cross_attention_dim"],
                                                                    dtype=dtype))
    if c.get("addition_embed_type") == "text_time":  # SDXL: pooled text, then 6 micro-conditioning numbers
        n = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        kw["added_cond_kwargs"] = dict(text_embeds=_meta(s.batch, n, dtype=dtype), time_ids=_meta(s.batch, 6,
                                                                                                  dtype=dtype))
    return kw


def _sd3_inputs(c, s: Shape, dtype):
    return dict(hidden_states=_meta(s.batch, c["in_channels"], s.height // 8, s.width // 8, dtype=dtype),
                encoder_hidden_states=_meta(s.batch, s.text_tokens, c["joint_attention_dim"], dtype=dtype),
                pooled_projections=_meta(s.batch, c["pooled_projection_dim"], dtype=dtype), timestep=_meta(s.batch))


def _wan_inputs(c, s: Shape, dtype):
    kw = dict(hidden_states=_meta(s.batch, c["in_channels"], _latent_frames(s), s.height // 8, s.width // 8,
                                  dtype=dtype),
              encoder_hidden_states=_meta(s.batch, s.text_tokens, c["text_dim"], dtype=dtype), timestep=_meta(s.batch))
    if c.get("image_dim"):  # image-to-video: CLIP's 257 image tokens
        kw["encoder_hidden_states_image"] = _meta(s.batch, 257, c["image_dim"], dtype=dtype)
    return kw


def _hunyuan_inputs(c, s: Shape, dtype):
    return dict(hidden_states=_meta(s.batch, c["in_channels"], _latent_frames(s), s.height // 8, s.width // 8,
                                    dtype=dtype),
                timestep=_meta(s.batch), encoder_hidden_states=_meta(s.batch, s.text_tokens, c["text_embed_dim"],
                                                                     dtype=dtype),
                encoder_attention_mask=_meta(s.batch, s.text_tokens, dtype=torch.long),
                pooled_projections=_meta(s.batch, c["pooled_projection_dim"], dtype=dtype),
                guidance=_meta(s.batch, dtype=dtype))


def meta_inputs(cls: str, config: Mapping, shape: Shape, dtype: torch.dtype = torch.float32) -> dict:
    """One forward's kwargs of a ``cls`` model (``config``: its full ``model.config``) at ``shape``, as
    meta tensors (floating ones in ``dtype``; ids, timesteps and masks as the pipelines pass them).
    Raises ``ValueError`` for a class not in ``SUPPORTED``."""
    if cls not in _ARCHES:
        raise ValueError(f"plan supports {', '.join(SUPPORTED)}; got {cls}")
    return _ARCHES[cls].inputs(dict(config), shape, dtype)


def _patch(c) -> int:
    p = c.get("patch_size", 1)
    return p[-1] if isinstance(p, (tuple, list)) else p


_ARCHES = {
    # Pipeline defaults: FluxPipeline 1024^2 with 512 T5 tokens; SD / SDXL at the UNet's sample size
    # with a CFG batch of 2 and 77 CLIP tokens; SD3 1024^2, CFG, 77 CLIP + 256 T5 tokens; Wan 480x832,
    # 81 frames, 512 tokens (CFG as two calls of batch 1); HunyuanVideo 720x1280, 129 frames, 256 tokens.
    "FluxTransformer2DModel": _Arch(
        False, lambda c: 16, lambda c: Shape(1, 1024, 1024, 512), _flux_inputs,
        lambda c, s: (s.height // 16) * (s.width // 16)),
    "UNet2DConditionModel": _Arch(
        False, lambda c: 8,  # diffusers' UNet pads odd latent sides itself (forward_upsample_size)
        lambda c: Shape(2, 8 * c["sample_size"], 8 * c["sample_size"], 77), _unet_inputs,
        lambda c, s: (s.height // 8) * (s.width // 8)),
    "SD3Transformer2DModel": _Arch(
        False, lambda c: 8 * _patch(c), lambda c: Shape(2, 8 * c["sample_size"], 8 * c["sample_size"], 333),
        _sd3_inputs, lambda c, s: (s.height // (8 * _patch(c))) * (s.width // (8 * _patch(c)))),
    "WanTransformer3DModel": _Arch(
        True, lambda c: 8 * _patch(c), lambda c: Shape(1, 480, 832, 512, frames=81), _wan_inputs,
        lambda c, s: _latent_frames(s) * (s.height // (8 * _patch(c))) * (s.width // (8 * _patch(c)))),
    "HunyuanVideoTransformer3DModel": _Arch(
        True, lambda c: 8 * _patch(c), lambda c: Shape(1, 720, 1280, 256, frames=129), _hunyuan_inputs,
        lambda c, s: _latent_frames(s) * (s.height // (8 * _patch(c))) * (s.width // (8 * _patch(c)))),
}
SUPPORTED = tuple(_ARCHES)


# --------------------------------------------------------------------------------------------
# Families: named configs (the released ones, fastgen's tiny and small stand-ins)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A named denoiser config: its diffusers ``cls``, ``config()`` (built lazily: the tiny ones are
    read off a built ``fastgen.models.tiny_denoiser``) and the shape it plans at by default (None: the
    class's pipeline default)."""

    cls: str
    config: Callable[[], dict]
    shape: Shape | None

    def build(self, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
        """The model with random weights (``seed``) on ``device`` in ``dtype``, eval mode."""
        return build(self.cls, self.config(), device, dtype, seed)


def _released(cls: str, name: str) -> Family:
    from fastgen import models

    return Family(cls, lambda: dict(getattr(models, name)), None)


def _small(cls: str, shape: Shape) -> Family:
    def config():
        from fastgen import models

        return dict(next(s for s in models.small_denoisers() if s.cls == cls).config)

    return Family(cls, config, shape)


def _tiny(name: str, cls: str, shape: Shape) -> Family:
    def config():
        from fastgen import models

        return _plain_config(models.tiny_denoiser(name)[0].config)

    return Family(cls, config, shape)


def _plain_config(config: Mapping) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# The released configs (fastgen.models), the CPU stand-ins of models.small_denoisers() and the test
# models of models.tiny_denoiser().
FAMILIES: dict[str, Family] = {
    "flux-dev": _released("FluxTransformer2DModel", "FLUX_DEV"),
    "sd15": _released("UNet2DConditionModel", "SD15_UNET"),
    "sdxl": _released("UNet2DConditionModel", "SDXL_UNET"),
    "sd3.5-medium": _released("SD3Transformer2DModel", "SD35_MEDIUM"),
    "wan2.1-1.3b": _released("WanTransformer3DModel", "WAN21_1_3B"),
    "hunyuanvideo": _released("HunyuanVideoTransformer3DModel", "HUNYUAN_VIDEO"),
    # the shapes of fastgen.models' benchmark inputs for the small ones, of tiny_denoiser's for the tiny
    "flux:small": _small("FluxTransformer2DModel", Shape(1, 256, 256, 32)),
    "sd15:small": _small("UNet2DConditionModel", Shape(2, 256, 256, 77)),
    "wan:small": _small("WanTransformer3DModel", Shape(1, 128, 128, 32, frames=9)),
    "hunyuan:small": _small("HunyuanVideoTransformer3DModel", Shape(1, 128, 128, 32, frames=9)),
    "flux:tiny": _tiny("flux", "FluxTransformer2DModel", Shape(2, 64, 64, 7)),
    "sd15:tiny": _tiny("unet", "UNet2DConditionModel", Shape(2, 64, 64, 7)),
    "sd3:tiny": _tiny("sd3", "SD3Transformer2DModel", Shape(2, 48, 48, 9)),
    "sd35:tiny": _tiny("sd35", "SD3Transformer2DModel", Shape(2, 48, 48, 9)),
    "wan:tiny": _tiny("wan", "WanTransformer3DModel", Shape(2, 32, 32, 9, frames=5)),
    "hunyuan:tiny": _tiny("hunyuan", "HunyuanVideoTransformer3DModel", Shape(2, 32, 32, 7, frames=5)),
}


def build(cls: str, config: Mapping, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """``diffusers.<cls>`` from ``config`` (a diffusers config; keys starting with "_" ignored) on
    ``device`` in ``dtype``, random weights drawn after ``torch.manual_seed(seed)``, eval mode. On
    ``"meta"`` nothing is allocated."""
    import diffusers

    model_cls = getattr(diffusers, cls)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    # Built in the target dtype on the target device: no float32 copy of a 12B model first.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls.from_config(_plain_config(config))
    finally:
        torch.set_default_dtype(previous)
    # torch's Module.to: diffusers' ModelMixin.to warns about modules to keep in float32 even for a
    # model built in code (fastgen.models.DenoiserSpec.build does the same).
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()


def load_config(source: str) -> tuple[str, dict, str | None]:
    """(class name, config, subfolder) of the denoiser at ``source``: a diffusers model folder (its
    ``config.json``), a pipeline folder (its ``transformer`` or ``unet``), or a Hugging Face Hub id of
    either (only the config files are read). Raises ``ValueError`` where there is none, naming the
    families for a name that is neither a path nor a Hub id."""
    import diffusers
    from diffusers.configuration_utils import ConfigMixin

    if not Path(source).exists() and (":" in source or source.count("/") != 1):  # Hub ids are "org/name"
        raise ValueError(f"unknown family {source!r}: one of {', '.join(FAMILIES)}, a diffusers model or pipeline "
                         "folder, or a Hub id")

    class ModelConfig(ConfigMixin):  # diffusers' reader of a model's config.json, local or on the Hub
        config_name = "config.json"

    try:
        index = diffusers.DiffusionPipeline.load_config(source)
    except (OSError, ValueError):
        index = None
    subfolder = None
    if index is not None:
        subfolder = next((k for k in ("transformer", "unet") if isinstance(index.get(k), (list, tuple))
                          and index[k][1] is not None), None)
        if subfolder is None:
            raise ValueError(f"{source} is a {index.get('_class_name', 'pipeline')} with no transformer or unet")
    try:
        config = ModelConfig.load_config(source, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise ValueError(f"no diffusers model config at {source!r} ({str(e).splitlines()[0]}): give a model or "
                         f"pipeline folder, a Hub id, or a family ({', '.join(FAMILIES)})") from None
    cls = config.get("_class_name")
    if not isinstance(cls, str):
        raise ValueError(f"{source}'s config.json names no _class_name")
    return cls, _plain_config(config), subfolder


def _resolve(source) -> tuple[str, str, dict, Shape | None, torch.nn.Module | None]:
    """(name, class name, config, default shape or None, the module if one was given)."""
    from fastgen.models import DenoiserSpec

    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise ValueError(f"plan needs a diffusers model (with a .config), got {type(source).__name__}")
        return type(source).__name__, type(source).__name__, _plain_config(config), None, source
    if isinstance(source, DenoiserSpec):
        return source.name, source.cls, dict(source.config), None, None
    if isinstance(source, Family):
        return source.cls, source.cls, source.config(), source.shape, None
    if isinstance(source, Mapping):
        cls = source.get("_class_name")
        if not isinstance(cls, str):
            raise ValueError("a config given to plan needs its _class_name (as in a diffusers config.json)")
        return cls, cls, _plain_config(source), None, None
    if isinstance(source, (str, Path)):
        name = str(source)
        if name in FAMILIES:
            f = FAMILIES[name]
            return name, f.cls, f.config(), f.shape, None
        cls, config, _ = load_config(name)
        return name, cls, config, None, None
    raise ValueError(f"plan takes a diffusers model, a config, a DenoiserSpec or a family name, got "
                     f"{type(source).__name__}")


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def weight_bytes(model: torch.nn.Module, precision: str | Precision) -> tuple[int, int, int]:
    """(parameter count, bytes at ``precision``, bytes of the largest parameter) of ``model``, each
    shared parameter once (module doc: which parameters each precision stores in how many bytes)."""
    p = PRECISIONS[precision] if isinstance(precision, str) else precision
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    quantized = {id(m.weight) for m in model.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))}
    count = total = largest = 0
    for name, param in model.named_parameters():
        if keep and any(k in name.split(".") for k in keep):  # diffusers' own rule (from_pretrained)
            per = p.fp32_kept
        else:
            per = p.quantized if id(param) in quantized else p.weight
        count += param.numel()
        total += param.numel() * per
        largest = max(largest, param.numel() * per)
    return count, total, largest


class _LiveTensors(TorchDispatchMode):
    """Live bytes of the tensors ops allocate, by storage: a storage counts from the op that makes it
    until it is freed (a weakref callback on its Python object, which torch keeps for the storage's
    lifetime). An op's output is new unless its storage is one of the op's inputs' (a view, an in-place
    op). ``peak``: the highest total, ``where`` / ``op`` / ``largest``: the module path, op and biggest
    live tensors then."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.live: dict[int, tuple[int, tuple[int, ...], str]] = {}
        self.total = self.peak = 0
        self.where, self.op, self.largest = "", "", ()

    def add(self, t: torch.Tensor, op: str) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        n = storage.nbytes()
        self.live[key] = (n, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        self.total += n
        weakref.finalize(storage, self._free, key)
        if self.total > self.peak:
            self.peak, self.op = self.total, op
            self.where = self.stack[-1] if self.stack else "<inputs>"
            top = sorted(self.live.values(), reverse=True)[:6]
            self.largest = tuple(LiveTensor(shape, dtype, n) for n, shape, dtype in top)

    def _free(self, key: int) -> None:
        n = self.live.pop(key, (0,))[0]
        self.total -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = tree_leaves((args, kwargs))
        inputs = {id(a.untyped_storage()) for a in flat_in if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self.add(t, func.__name__)
        return out


class _FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a fused kernel allocates: the output and a float32
    log-sum-exp per query row (on meta tensors torch would run the math path, with its N^2 scores)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # noqa: F841 - allocated, then dropped
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Peak:
    """``activation_peak``'s answer: peak bytes, module path and op at the peak, the largest live tensors."""

    bytes: int
    where: str
    op: str
    largest: tuple[LiveTensor, ...]


def activation_peak(model: torch.nn.Module, inputs: dict, *, fused_attention: bool = True) -> Peak:
    """The peak of live tensor bytes during ``model(**inputs)`` (no grad), inputs included (module doc).
    ``model`` and ``inputs`` on the meta device give the estimate without memory; on a real device the
    same count runs the real forward. ``fused_attention`` (default True) counts attention as a fused
    kernel, whose output it leaves unwritten (right for counting, never for values); False runs the ops
    as they are (on meta the math path with its scores; on a CPU or GPU torch's own fused kernels)."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        # the path of the module running, for where the peak is
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name or "<root>")))
        handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    tracker = _LiveTensors(stack)
    for t in tree_leaves(inputs):
        if isinstance(t, torch.Tensor):
            tracker.add(t, "<input>")
    try:
        with torch.no_grad(), (_FusedAttention() if fused_attention else contextlib.nullcontext()), tracker:
            out = model(**inputs, return_dict=False)
            del out
    finally:
        for h in handles:
            h.remove()
    return Peak(tracker.peak, tracker.where, tracker.op, tracker.largest)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def _check_shape(cls: str, config: dict, s: Shape) -> None:
    arch = _ARCHES[cls]
    for name in ("batch", "height", "width", "text_tokens"):
        v = getattr(s, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    step = arch.step(config)
    for name in ("height", "width"):
        v = getattr(s, name)
        if v % step:
            raise ValueError(f"{name} must be a multiple of {step} pixels for {cls}, got {v}: round to "
                             f"{max(step, v // step * step)}")
    if not arch.video and s.frames is not None:
        raise ValueError(f"frames applies to video models; {cls} makes images: leave frames out")
    if arch.video:
        if not isinstance(s.frames, int) or isinstance(s.frames, bool) or s.frames < 1 or (s.frames - 1) % 4:
            raise ValueError(f"frames must be 4k + 1 (1, 5, 9, ... 81) for {cls}, got {s.frames!r}")


def _corners(default: Shape, overrides: dict) -> list[Shape]:
    """The default shape with ``overrides`` (each an int or a (min, max) pair): one shape, or with any
    pair the two corners of the ranges, all minima and all maxima."""
    lo, hi = {}, {}
    for k, v in overrides.items():
        if isinstance(v, (tuple, list)):
            if len(v) != 2:
                raise ValueError(f"{k} must be an int or a (min, max) pair, got {v!r}")
            lo[k], hi[k] = v
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in v) or lo[k] > hi[k]:
                raise ValueError(f"{k} must be whole numbers with min <= max, got {v!r}")
        else:
            lo[k] = hi[k] = v
    first, last = replace(default, **lo), replace(default, **hi)
    return [first] if first == last else [first, last]


def plan(model_or_config_or_family, *, precision: str = "bf16", vram_bytes: int | None = None,
         vram_gib: float | None = None, shapes: Sequence[Shape] | None = None, batch=None, height=None,
         width=None, frames=None, text_tokens=None, workspace_bytes: int = DEFAULT_WORKSPACE,
         reserve_bytes: int = DEFAULT_RESERVE) -> Plan:
    """Weights, activations per shape and the weight-streaming budget of a denoiser on a card (module doc).

    - ``model_or_config_or_family``: a diffusers model (its parameters are counted as they are; the
      activations are traced on a meta copy built from its config), a diffusers config dict with its
      ``_class_name``, a ``fastgen.models.DenoiserSpec``, a name of ``FAMILIES`` ("flux-dev", "sdxl",
      "flux:tiny", ...), a model or pipeline folder, or a Hub id (its config only). Classes: ``SUPPORTED``.
    - ``precision``: "bf16" (default), "fp16", "fp8" or "fp32" (``PRECISIONS``).
    - ``vram_bytes`` or ``vram_gib``: the card's memory; exactly one.
    - ``shapes``: the profiles (``Shape`` s); or ``batch`` / ``height`` / ``width`` (pixels) /
      ``frames`` / ``text_tokens`` to change the default shape (the family's, else the class's pipeline
      default: Flux 1024^2 and 512 text tokens, SDXL 1024^2 with a CFG batch of 2, ...), not both.
      Each of those may be a ``(min, max)`` pair: then the profiles are the two corners (every
      minimum, every maximum), as an engine's optimization profile is bounded.
    - ``workspace_bytes`` (default 1 GiB), ``reserve_bytes`` (default 1 GiB): module doc.

    Raises ``ValueError`` for an unknown family, class or precision, a card size given twice, never or
    not positive, shapes that are not positive or not multiples of the model's pixel step, frames that
    are not 4k + 1 for video models (or given for image models), negative workspace or reserve.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if (vram_bytes is None) == (vram_gib is None):
        raise ValueError("give the card's memory as exactly one of vram_bytes and vram_gib")
    vram = vram_bytes if vram_bytes is not None else vram_gib * GIB
    if isinstance(vram, bool) or not isinstance(vram, (int, float)) or not vram > 0:
        raise ValueError(f"the card's memory must be positive, got {vram_bytes if vram_gib is None else vram_gib!r}")
    for what, v in (("workspace_bytes", workspace_bytes), ("reserve_bytes", reserve_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what} must be an int >= 0, got {v!r}")
    name, cls, config, family_shape, module = _resolve(model_or_config_or_family)
    if cls not in _ARCHES:
        raise ValueError(f"plan supports {', '.join(SUPPORTED)}; got {cls}")
    arch = _ARCHES[cls]
    p = PRECISIONS[precision]
    meta = build(cls, config, "meta", p.activation)
    config = dict(meta.config)  # every key, defaults included
    overrides = {k: v for k, v in dict(batch=batch, height=height, width=width, frames=frames,
                                       text_tokens=text_tokens).items() if v is not None}
    if shapes is not None and overrides:
        raise ValueError(f"give shapes or {', '.join(overrides)}, not both")
    if shapes is None:
        shapes = _corners(family_shape or arch.default(config), overrides)
    shapes = list(shapes)
    if not shapes or not all(isinstance(s, Shape) for s in shapes):
        raise ValueError(f"shapes must be a non-empty sequence of Shape, got {shapes!r}")
    for s in shapes:
        _check_shape(cls, config, s)
    params, weights, largest = weight_bytes(module if module is not None else meta, p)
    profiles = []
    for s in shapes:
        peak = activation_peak(meta, meta_inputs(cls, config, s, p.activation))
        profiles.append(Profile(s, arch.tokens(config, s), peak.bytes, peak.where, peak.op, peak.largest))
    notes = ()
    if precision == "fp8":
        notes = ("fp8: Linear / Conv weights in 1 byte, activations in bf16 (what FP8 quantization keeps)",)
    return Plan(name, cls, precision, params, weights, largest, int(vram), workspace_bytes, reserve_bytes,
                tuple(profiles), notes)


def parse_bytes(text: str, *, allow_zero: bool = False) -> int:
    """Bytes from a size: "8GiB", "8G" and a plain "8" (all 2**30: card sizes are said in GiB), "8GB"
    (10**9), "512MiB", "512M", "1.5TiB", "4096B". Raises ``ValueError`` for anything else or a size that
    is not positive (zero is allowed with ``allow_zero``)."""
    units = {"": GIB, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": MIB, "mib": MIB, "mb": 10**6, "g": GIB,
             "gib": GIB, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
    s = str(text).strip().lower()
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    number, unit = s[:i].strip(), s[i:].strip()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"not a size: {text!r} (e.g. 8GiB, 8G, 8GB, 512MiB)") from None
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"a size must be {'at least 0' if allow_zero else 'positive'}, got {text!r}")
    return int(value)


__all__ = ["DEFAULT_RESERVE", "DEFAULT_WORKSPACE", "FAMILIES", "Family", "GIB", "LiveTensor", "PRECISIONS", "Peak",
           "Plan", "Precision", "Profile", "SUPPORTED", "Shape", "activation_peak", "build", "load_config",
           "meta_inputs", "parse_bytes", "plan", "weight_bytes"]
