"""``to_onnx``: a diffusers denoiser exported to ONNX with dynamic batch / resolution / text length,
checked by ``onnx.checker`` and validated against PyTorch with onnxruntime (issue #13, first
increment: Flux and UNet2DConditionModel (SD 1.5, SDXL), unpatched models).

The export goes through ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`` with
``torch.export.Dim``: ``dynamic_axes`` with dynamo mislabels inputs, and the legacy TorchScript
exporter fails on ``aten::rms_norm`` (docs: ENGINEERING.md). Per-architecture facts (inputs, which
of their dimensions are batch / spatial / token dimensions, pixels per step) live in one table,
``_ARCHES``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


@dataclass
class ExportReport:
    """What ``to_onnx`` wrote and how it was checked.

    - ``inputs`` / ``outputs``: ONNX name -> dimensions as the graph declares them (``int`` for
      a static dimension, ``str`` for a symbolic one, e.g. ``"batch"`` or ``"2*latent_height"``).
    - ``ranges``: ``batch`` / ``height`` / ``width`` in pixels -> (min, max) declared at export;
      ``max`` None means unbounded.
    - ``file_bytes``: the ``.onnx`` file plus its external data file, if any.
    - ``checks``: one ``ShapeCheck`` per validated shape (empty with ``validate=False``).
    """

    path: Path
    architecture: str
    opset: int
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

    def wrapper(self, model) -> torch.nn.Module:
        raise NotImplementedError

    def tensors(self, b, hu, wu, t, dtype, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dynamic_shapes(self, batch, h, w, text) -> dict:
        raise NotImplementedError


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

    def tensors(self, b, hu, wu, t, dtype, device):
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

    def dynamic_shapes(self, batch, h, w, text):
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
        self.latent_step = 2 ** (len(c.block_out_channels) - 1)
        self.px_step = 8 * self.latent_step
        self.inputs = ("sample", "timestep", "encoder_hidden_states") + (("text_embeds", "time_ids") if self.sdxl
                                                                          else ())

    def wrapper(self, model):
        return _UNetWrapper(model, self.sdxl)

    def tensors(self, b, hu, wu, t, dtype, device):
        c, s = self.config, self.latent_step
        out = dict(sample=_randn(b, c.in_channels, hu * s, wu * s, dtype=dtype, device=device, seed=1),
                   timestep=torch.linspace(300.0, 900.0, b).to(device=device, dtype=dtype),
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

    def dynamic_shapes(self, batch, h, w, text):
        ds = dict(sample={0: batch, 2: _scaled(h, self.latent_step), 3: _scaled(w, self.latent_step)},
                  timestep={0: batch}, encoder_hidden_states={0: batch, 1: text})
        if self.sdxl:
            ds.update(text_embeds={0: batch}, time_ids={0: batch})
        return ds


# SD3Transformer2DModel is not here yet: torch.export cannot prove its position-table crop
# ((pos_embed_max_size - h) // 2 : ... + h) in range for a dynamic h (a constraint violation), and
# torch.onnx.export given the module falls back to a graph that fails at other sizes.
_ARCHES = {"FluxTransformer2DModel": _Flux, "UNet2DConditionModel": _UNet}
SUPPORTED = tuple(_ARCHES)
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
        return None  # a fixed dimension: no Dim, the example's size is baked in
    return torch.export.Dim(name, min=r.lo, max=r.hi) if r.hi is not None else torch.export.Dim(name, min=r.lo)


def _scaled(r: _Range, step: int):
    # A latent side that must stay a multiple of ``step``: step * Dim, so torch.export can prove
    # every down/upsampling divides evenly instead of guarding on (or specialising) the size.
    d = _dim(r.name, r)
    return d if d is None or step == 1 else step * d


def _parse(name: str, value, step: int, unit: str, max_units: int | None) -> _Range:
    """``value``: None (all the model accepts), an int (fixed) or (min, max), in ``unit``s that
    must be multiples of ``step``; returns the range in steps."""
    if value is None:
        return _Range(name, 1, max_units)
    lo, hi = (value, value) if isinstance(value, int) and not isinstance(value, bool) else _pair(name, value)
    if lo < 1 or lo > hi:
        raise ValueError(f"{name} must be positive with min <= max, got {value!r}")
    if lo % step or hi % step:
        raise ValueError(f"{name} must be multiples of {step} {unit} for this model, got {value!r}: round to "
                         f"({lo // step * step or step}, {hi // step * step or step})")
    if max_units is not None and hi // step > max_units:
        raise ValueError(f"{name} max {hi} {unit} exceeds what the model accepts ({max_units * step} {unit})")
    return _Range(name, lo // step, hi // step)


def _pair(name, value) -> tuple[int, int]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None, an int or a (min, max) pair, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
        raise ValueError(f"{name} must be whole numbers, got {value!r}")
    return lo, hi


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _denoiser(pipe_or_model) -> torch.nn.Module:
    if isinstance(pipe_or_model, torch.nn.Module):
        model = pipe_or_model
    else:
        model = getattr(pipe_or_model, "transformer", None) or getattr(pipe_or_model, "unet", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"to_onnx takes a diffusers pipeline (with a transformer or unet) or a denoiser model, "
                             f"got {type(pipe_or_model).__name__}")
    if type(model).__name__ not in _ARCHES:
        raise ValueError(f"to_onnx exports {', '.join(SUPPORTED)}; got {type(model).__name__}")
    from fastgen.patching import is_patched  # lazy: the patching package imports much of fastgen

    if is_patched(model):
        # This increment exports upstream attention only: fastgen's processors call custom ops with
        # no ONNX lowering yet. Refusing beats silently exporting something other than what runs.
        raise ValueError("to_onnx exports unpatched models only for now: call fastgen.unpatch(model) (or export "
                         "before fastgen.patch); patched-model export comes with the custom-op lowering")
    return model


def to_onnx(pipe_or_model, path, *, height=None, width=None, frames=None, batch=None, dtype=torch.float32,
            opset: int = 20, validate: bool = True, progress: bool = False) -> ExportReport:
    """Export the denoiser of ``pipe_or_model`` to ONNX at ``path``, with dynamic dimensions.

    - ``pipe_or_model``: a diffusers pipeline (its ``transformer`` or ``unet``) or the model;
      supported: ``FluxTransformer2DModel``, ``UNet2DConditionModel`` (SD 1.5 / SD 2 / SDXL
      layouts). Unpatched only (see errors).
    - ``height`` / ``width``: image size in pixels, None (default: every size the model accepts),
      an int (fixed) or a ``(min, max)`` pair; multiples of the model's pixel step (Flux 16; UNet
      8 * 2**(levels - 1): 64 for SD 1.5, 32 for SDXL).
      Flux's image-token dimension gets the product range: (hmin/16 * wmin/16, hmax/16 * wmax/16).
    - ``batch``: None (default: 1 and up; UNet 1 to 63), an int or ``(min, max)``. The text length is dynamic
      (1 and up) always.
    - ``frames``: for video models, not in this increment: must be None.
    - ``dtype``: weights and inputs (default float32); a model in another dtype is converted on a
      copy, the caller's model is never changed. ``bfloat16`` exports but cannot be validated on
      onnxruntime's CPU provider: pass ``validate=False``.
    - ``opset``: ONNX opset (default 20).
    - ``validate``: run onnxruntime (CPUExecutionProvider) at 3 shapes inside the ranges (an odd
      batch, a non-square size, other text lengths than the export's example) and compare with
      PyTorch; the differences are in the report, not judged here.
    - ``progress``: a tqdm bar over the phases (trace, ONNX, check, one step per validated shape).

    Inputs of the graph: the model's tensors by their diffusers names (see the ``_Flux`` and ``_UNet``
    docstrings); one output, ``noise_pred``, shaped like the image input.
    Weights go to ``<path>.data`` (external data) when they exceed 2 GiB, else into the file.
    The file passes ``onnx.checker.check_model(path, full_check=True)`` before this returns.

    Raises ``ValueError`` for an unsupported pipeline / model, a patched model, ranges that are not
    positive, ordered multiples of the step or that exceed the model's limit, ``frames`` with an
    image model, bfloat16 with ``validate=True``; ``ImportError`` when onnx / onnxscript (or
    onnxruntime, to validate) is missing.
    """
    model = _denoiser(pipe_or_model)
    arch = _ARCHES[type(model).__name__](model)
    if frames is not None:
        raise ValueError(f"frames applies to video models; {type(model).__name__} is an image model: pass frames=None")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if validate and dtype == torch.bfloat16:
        raise ValueError("onnxruntime's CPU provider cannot run bfloat16 graphs: pass validate=False (or export "
                         "float16 / float32)")
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset must be an int >= 18 (torch.onnx's dynamo exporter), got {opset!r}")
    try:
        import onnx
    except ImportError as e:
        raise ImportError("to_onnx needs onnx and onnxscript: pip install onnx onnxscript") from e

    b = _parse("batch", batch, 1, "items", arch.max_batch)
    h = _parse("height", height, arch.px_step, "pixels", arch.max_units)
    w = _parse("width", width, arch.px_step, "pixels", arch.max_units)
    text = _dim("text_tokens", _Range("text_tokens", 1, None))

    param = next(model.parameters())
    device = param.device
    if param.dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    was_training = model.training
    model.eval()  # dropout off while tracing; restored below
    wrapper = arch.wrapper(model).eval()
    # Example sizes of 2+ (of 0/1 torch.export would specialise) and unlike each other, inside the ranges.
    example = arch.tensors(b.clamp(2), h.clamp(3), w.clamp(5), 7, dtype, device)
    dyn = arch.dynamic_shapes(_dim("batch", b), h, w, text)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > _PROTO_LIMIT
    from tqdm.auto import tqdm

    bar = tqdm(total=3 + (len(_SHAPES) if validate else 0), desc=f"to_onnx {arch.name}", unit="step",
               disable=not progress)
    start = time.perf_counter()
    try:
        # torch.export first, on its own: given a module, torch.onnx.export retries strategies when
        # the dynamic shapes fail and can hand back a graph that runs only at the example's size
        # (seen with SD3's position crop). An ExportedProgram's dims are proven, or this raises.
        with torch.no_grad(), warnings.catch_warnings():
            # torch's exporter warns about its own internals (a pytree deprecation; Dim names it
            # keeps anyway): nothing a caller can act on, and errors under -W error.
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            warnings.filterwarnings("ignore", r"# The axis name: .* will not be used", UserWarning)
            bar.set_postfix_str("torch.export")
            program = torch.export.export(wrapper, (), kwargs=example, dynamic_shapes=dyn, strict=False)
            bar.update()
            bar.set_postfix_str("torch.onnx")
            # dynamic_shapes again only names the ONNX dims after the Dims (else "s2", "s29").
            torch.onnx.export(program, (), str(path), kwargs=example, dynamo=True, dynamic_shapes=dyn,
                              opset_version=opset, output_names=[_OUTPUT],
                              external_data=external, verbose=False)
            bar.update()
    finally:
        model.train(was_training)
    export_s = time.perf_counter() - start
    bar.set_postfix_str("onnx.checker")
    # Given a path, the checker also reads external data and runs shape inference (full_check).
    _write_metadata(path, model, arch, dtype, b, h, w, external)
    onnx.checker.check_model(str(path), full_check=True)
    bar.update()

    proto = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    report = ExportReport(
        path=path, architecture=arch.name, opset=opset, dtype=dtype, inputs=_dims(proto.graph.input),
        outputs=_dims(proto.graph.output),
        ranges={"batch": (b.lo, b.hi), "height": (h.lo * arch.px_step, _px(h.hi, arch.px_step)),
                "width": (w.lo * arch.px_step, _px(w.hi, arch.px_step))},
        external_data=external, file_bytes=path.stat().st_size + (data.stat().st_size if external else 0),
        export_seconds=export_s)
    if validate:
        start = time.perf_counter()
        report.checks = _validate(path, arch, wrapper, model, b, h, w, dtype, device, bar)
        report.validate_seconds = time.perf_counter() - start
    bar.close()
    return report


# Keys of the ONNX model's ``metadata_props`` that ``to_onnx`` writes, so a runtime module can stand in
# for the model (``config``, input names) without the PyTorch model at hand.
METADATA = ("fastgen.version", "fastgen.class", "fastgen.architecture", "fastgen.config", "fastgen.inputs",
            "fastgen.output", "fastgen.dtype", "fastgen.ranges")


def _write_metadata(path: Path, model, arch, dtype, b, h, w, external: bool) -> None:
    import json

    import onnx

    from fastgen import __version__

    proto = onnx.load(str(path), load_external_data=False)
    ranges = {"batch": [b.lo, b.hi], "height": [h.lo * arch.px_step, _px(h.hi, arch.px_step)],
              "width": [w.lo * arch.px_step, _px(w.hi, arch.px_step)]}
    values = {"fastgen.version": __version__, "fastgen.class": type(model).__name__,
              "fastgen.architecture": arch.name, "fastgen.config": model.to_json_string(),
              "fastgen.inputs": json.dumps(list(arch.inputs)), "fastgen.output": _OUTPUT,
              "fastgen.dtype": str(dtype).removeprefix("torch."), "fastgen.ranges": json.dumps(ranges)}
    del proto.metadata_props[:]
    for k, v in values.items():
        proto.metadata_props.add(key=k, value=v)
    # The weights stay where the exporter put them (inline or in <path>.data): only the graph file
    # is rewritten.
    onnx.save(proto, str(path))


def read_metadata(path) -> dict[str, object]:
    """The ``fastgen.*`` metadata ``to_onnx`` wrote into ``path``: ``class``, ``architecture``,
    ``config`` (the model's diffusers config, a dict), ``inputs`` (graph input names in order),
    ``output``, ``dtype`` (a ``torch.dtype``), ``ranges`` (as in ``ExportReport.ranges``), ``version``.
    Raises ``ValueError`` for a file ``to_onnx`` did not write."""
    import json

    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    missing = [k for k in METADATA if k not in props]
    if missing:
        raise ValueError(f"{path} has no fastgen metadata ({', '.join(missing)}): export it with "
                         "fastgen.export.to_onnx")
    return {"version": props["fastgen.version"], "class": props["fastgen.class"],
            "architecture": props["fastgen.architecture"], "config": json.loads(props["fastgen.config"]),
            "inputs": json.loads(props["fastgen.inputs"]), "output": props["fastgen.output"],
            "dtype": getattr(torch, props["fastgen.dtype"]),
            "ranges": {k: tuple(v) for k, v in json.loads(props["fastgen.ranges"]).items()}}


def _px(units: int | None, step: int) -> int | None:
    return None if units is None else units * step


def _dims(values) -> dict[str, tuple[int | str, ...]]:
    return {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim) for v in values}


# Validated shapes in model units (batch, height steps, width steps, text tokens): odd batches, a
# non-square and a square size, text lengths other than the example's 7.
_SHAPES = ((3, 2, 5, 5), (1, 4, 4, 11), (5, 3, 1, 3))


def _validate(path, arch, wrapper, model, b, h, w, dtype, device, bar) -> list[ShapeCheck]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("validating an export needs onnxruntime: pip install onnxruntime (or validate=False)") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    checks, seen = [], set()
    was_training = model.training
    model.eval()
    try:
        for bs, hu, wu, t in _SHAPES:
            bar.set_postfix_str("onnxruntime")
            bar.update()
            bs, hu, wu = b.clamp(bs), h.clamp(hu), w.clamp(wu)
            if (bs, hu, wu, t) in seen:
                continue
            seen.add((bs, hu, wu, t))
            x = arch.tensors(bs, hu, wu, t, dtype, device)
            with torch.no_grad():
                ref = wrapper(**x).float().cpu()
            feed = {k: v.cpu().numpy() for k, v in x.items()}
            got = torch.from_numpy(session.run([_OUTPUT], feed)[0]).float()
            if got.shape != ref.shape:
                raise RuntimeError(f"onnxruntime returned {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
            diff = (got - ref).abs().max().item()
            scale = ref.abs().max().item()
            checks.append(ShapeCheck(bs, hu * arch.px_step, wu * arch.px_step, t, diff,
                                     diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)))
    finally:
        model.train(was_training)
    return checks


__all__ = ["ExportReport", "METADATA", "SUPPORTED", "ShapeCheck", "read_metadata", "to_onnx"]
