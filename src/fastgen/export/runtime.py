"""Exported denoisers as drop-in modules: a graph written by ``to_onnx`` stands in for the diffusers
model inside its pipeline (``pipe.transformer = OnnxRuntimeDenoiser.load(path)``), issue #13. Every
family ``to_onnx`` exports: Flux, UNet2DConditionModel (SD 1.5, SDXL), SD3 / SD3.5, Wan 2.1 (text-
and image-to-video) and HunyuanVideo.

Two layers, kept apart so other runtimes plug in (a TensorRT engine module subclasses the base):

- ``ExportedDenoiser`` holds what a pipeline reads from its denoiser (``config``, ``dtype``,
  ``device``, ``cache_context``) and maps the diffusers call signature onto the graph's named
  inputs: per-architecture call mapping in one table (``_CALLS``), then one generic step that moves
  and casts the tensors, checks them against the graph's dimensions and the exported ranges of its
  symbols (``metadata["symbols"]``), and hands a ``{input name: tensor}`` dict to ``_run``.
- ``_run(feed) -> tensor`` is the runtime alone, torch tensors in and out (contiguous, on
  ``device``, in each input's graph dtype) so a GPU runtime can bind device pointers.
  ``OnnxRuntimeDenoiser`` implements it with an onnxruntime ``InferenceSession`` and IOBinding.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from fastgen.export.onnx import parse_metadata

_INSTALL = "pip install fastgen[onnx] (onnxruntime-gpu for the CUDA execution provider)"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` as the graph declares it, each dimension an ``int``
    (static), a ``str`` (symbolic: ``"batch"``, or ``"2*height"``: twice the symbol ``height``) or
    None (dynamic and unnamed); ``dtype`` the tensor's element type."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: torch.dtype

    def text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


# A symbolic dimension that is a multiple of a symbol, as torch.onnx names step * Dim ("2*height").
_MULTIPLE = re.compile(r"^(\d+)\*(\w+)$")


def _symbol(dim: str) -> tuple[str, int]:
    m = _MULTIPLE.match(dim)
    return (m[2], int(m[1])) if m else (dim, 1)


# Integer arithmetic on symbols: how torch.onnx writes a dimension it derived from others ("2*height";
# HunyuanVideo's output channels come out as "((4*batch)//batch)").
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}


def _arithmetic(dim: str) -> ast.expr | None:
    """``dim`` parsed as integer arithmetic on symbols, or None where it is anything else."""
    try:
        tree = ast.parse(dim, mode="eval").body
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if not (isinstance(node, (ast.BinOp, ast.Name, ast.Load, *_OPS))
                or (isinstance(node, ast.Constant) and type(node.value) is int)):
            return None
    return tree


def _evaluate(tree: ast.expr, values: Mapping[str, int]) -> int:
    if isinstance(tree, ast.Name):
        return values[tree.id]
    if isinstance(tree, ast.Constant):
        return tree.value
    return _OPS[type(tree.op)](_evaluate(tree.left, values), _evaluate(tree.right, values))


@dataclass(frozen=True)
class _Found:
    """A symbol's value in a call, and where it was first read: ``step * value`` is dimension
    ``axis`` of input ``input``, declared ``dim`` (``"2*height"``)."""

    value: int
    input: str
    axis: int
    step: int
    dim: str

    @property
    def where(self) -> str:
        return f"{self.input} dimension {self.axis}"


class ExportedDenoiser(torch.nn.Module):
    """Base of the modules that run an exported denoiser graph in place of the diffusers model.

    A subclass (one per runtime) builds it with the graph's ``metadata`` (``read_metadata`` /
    ``parse_metadata``: ``class``, ``architecture``, ``config``, ``inputs``, ``dtype``, ``ranges`` in
    pixels and video frames, ``symbols``: each symbolic dimension's range in graph units), its
    ``inputs`` and ``output`` (``TensorSpec``; input names must be those of ``metadata["inputs"]``)
    and the ``device`` its inputs and output live on, and implements ``_run``. They stay as the
    attributes ``metadata``, ``inputs`` (name -> ``TensorSpec``) and ``output``.

    What pipelines read from their denoiser is here: ``config`` (the exported model's diffusers
    config, a ``FrozenDict`` with attribute access: ``config.in_channels``), ``dtype`` (the
    export's), ``device``, ``cache_context(name)`` (a no-op: a graph has no cache hooks), and for
    SDXL UNets ``add_embedding.linear_1.in_features``, which ``StableDiffusionXLPipeline`` checks.
    ``forward`` takes the real model's arguments (see ``_FluxCall``, ``_UNetCall``, ``_SD3Call``,
    ``_WanCall``, ``_HunyuanCall``).
    Any other attribute raises ``AttributeError`` saying what an exported graph lacks.

    The module has no parameters: ``to`` accepts its own device and dtype only (the runtime fixed
    one, the export the other) and raises ``ValueError`` for any other.

    Raises ``ValueError`` when the metadata's architecture has no call mapping here, when the input
    names differ from the metadata's, or when an output dimension does not follow from the inputs'
    (a symbol of theirs, or integer arithmetic on them).
    """

    def __init__(self, metadata: Mapping, inputs: Sequence[TensorSpec], output: TensorSpec,
                 device: torch.device | str):
        super().__init__()
        _check_supported(metadata)
        if sorted(s.name for s in inputs) != sorted(metadata["inputs"]):
            raise ValueError(f"the graph's inputs {[s.name for s in inputs]} are not those its fastgen metadata "
                             f"names ({metadata['inputs']}): the file was changed after to_onnx")
        names = {_symbol(d)[0] for s in inputs for d in s.shape if isinstance(d, str)}
        self._output_dims = [d if isinstance(d, int) or d is None else _arithmetic(d) for d in output.shape]
        loose = [d for d, tree in zip(output.shape, self._output_dims, strict=True) if tree is None or (
            not isinstance(tree, int) and any(isinstance(n, ast.Name) and n.id not in names for n in ast.walk(tree)))]
        if loose:
            # The output is allocated before the run (a GPU runtime binds its pointer): every
            # output dimension must follow from the inputs' shapes.
            raise ValueError(f"output {output.name} {output.text()} has dimensions {loose} that no input "
                             "determines")
        from diffusers.configuration_utils import FrozenDict

        self.metadata = dict(metadata)
        self._internal_dict = FrozenDict(metadata["config"])  # where diffusers' ConfigMixin keeps it
        self.inputs = {s.name: s for s in inputs}
        self.output = output
        self._device = torch.device(device)
        self._dtype = metadata["dtype"]
        self._mapping = _CALLS[metadata["architecture"]](metadata)
        for name, value in self._mapping.attributes().items():
            setattr(self, name, value)

    # -- what pipelines read ------------------------------------------------------------------

    @property
    def config(self):
        """The exported model's diffusers config (``FrozenDict``; keys and attributes alike)."""
        return self._internal_dict

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @contextmanager
    def cache_context(self, name: str, **kwargs) -> Iterator[None]:
        # FluxPipeline wraps each call in transformer.cache_context("cond"/"uncond") for diffusers'
        # cache hooks; a graph runs no hooks, so there is nothing to tell.
        yield

    def to(self, *args, **kwargs):
        """``self`` if the requested device / dtype are this module's; ``ValueError`` otherwise
        (``DiffusionPipeline.to`` calls this on every component)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and not (device.type == self.device.type
                                       and device.index in (None, self.device.index)):
            raise ValueError(f"{type(self).__name__} runs on {self.device}, fixed when it was loaded: load it again "
                             f"for {device} (e.g. providers=['CUDAExecutionProvider'] for cuda)")
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"this graph was exported in {self.dtype}; it cannot be converted to {dtype}: export "
                             f"again with to_onnx(..., dtype={dtype})")
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def float(self):
        return self.to(torch.float32)

    def double(self):
        return self.to(torch.float64)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # self.__dict__, not self.metadata: during __init__ that lookup would land here again
            model = self.__dict__.get("metadata", {}).get("class", "denoiser")
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: it runs an exported "
                f"{model} graph and has config, dtype, device, cache_context and forward only "
                "(adapters, IP-Adapters, attention processors and LoRA loading need the PyTorch model)") from None

    # -- the call -----------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The diffusers model's ``forward`` for the exported class, same arguments and return
        value: ``FluxTransformer2DModel`` (``_FluxCall.forward``), ``UNet2DConditionModel``
        (``_UNetCall.forward``), ``SD3Transformer2DModel`` (``_SD3Call.forward``),
        ``WanTransformer3DModel`` (``_WanCall.forward``) or ``HunyuanVideoTransformer3DModel``
        (``_HunyuanCall.forward``)."""
        return self._mapping.forward(self, *args, **kwargs)

    def _denoise(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Move and cast ``feed`` (graph input name -> tensor) to the graph's device and each
        input's graph dtype (the timestep's may differ from the export's: float32 for UNet / SD3 /
        Wan), check shapes and ranges, run. Raises ``ValueError`` naming the input at fault."""
        feed = {name: feed[name].to(device=self.device, dtype=spec.dtype).contiguous()
                for name, spec in self.inputs.items()}
        for symbol, found in self._symbols(feed).items():
            bounds = self.metadata["symbols"].get(symbol)
            if bounds is not None and not _within(found.value, bounds):
                self._mapping.out_of_range(symbol, found, bounds, self.metadata["ranges"])
        return self._run(feed)

    def _dims(self, feed: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """The value of every symbolic dimension, after checking ranks, static dimensions, multiples
        and that a symbol has one value across inputs."""
        return {k: v.value for k, v in self._symbols(feed).items()}

    def _symbols(self, feed: Mapping[str, torch.Tensor]) -> dict[str, _Found]:
        dims: dict[str, _Found] = {}
        for name, spec in self.inputs.items():
            shape = tuple(feed[name].shape)
            if len(shape) != len(spec.shape):
                raise ValueError(f"{name} has shape {shape}; the graph takes {spec.text()}")
            for i, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
                if isinstance(want, int):
                    if want != got:
                        raise ValueError(f"{name} has shape {shape}; the graph takes {spec.text()} "
                                         f"(dimension {i} must be {want})")
                    continue
                if want is None:
                    continue
                sym, step = _symbol(want)
                if got % step:
                    raise ValueError(f"{name} has shape {shape}; dimension {i} ({want!r}) must be a multiple of "
                                     f"{step}")
                seen = dims.setdefault(sym, _Found(got // step, name, i, step, want))
                if seen.value != got // step:
                    raise ValueError(f"{sym!r} is {seen.value} in {seen.where} ({seen.dim!r}) but "
                                     f"{got // step} in {name} dimension {i} ({want!r}) (shape {shape}): the inputs "
                                     "disagree")
        return dims

    def output_shape(self, feed: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """The output's shape for inputs ``feed`` (what ``_run`` allocates)."""
        dims = self._dims(feed)
        return tuple(d if isinstance(d, int) else _evaluate(d, dims) for d in self._output_dims)

    def _run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the graph on ``feed`` (every input by name: contiguous, on ``device``, in its graph
        dtype, shapes checked) and return the output tensor (on ``device``, shape
        ``output_shape(feed)``). Implemented by each runtime."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _run")


def _check_supported(metadata: Mapping) -> None:
    if metadata["architecture"] not in _CALLS:
        raise ValueError(f"exported denoisers run {', '.join(_CALLS)} graphs; this one is "
                         f"{metadata['architecture']!r} ({metadata['class']})")


def _within(value: int, bounds) -> bool:
    lo, hi = bounds
    return lo <= value and (hi is None or value <= hi)


def _check_range(what: str, value: int, bounds, argument: str, unit: str = "", detail: str = "",
                 hint: str = "") -> None:
    """ValueError unless ``lo <= value <= hi`` (``bounds``; ``hi`` None: no bound), naming the
    ``to_onnx`` ``argument`` whose range it is."""
    if not _within(value, bounds):
        raise ValueError(f"{what} is {value}{unit}{detail}; this graph was exported for {_span(*bounds)}{unit}{hint}: "
                         f"export again with a wider range (to_onnx {argument}=)")


def _span(lo, hi) -> str:
    return f"{lo} and up" if hi is None else f"{lo} to {hi}"


def _is_set(value) -> bool:
    # an empty dict / list changes nothing (pipelines pass joint_attention_kwargs={} and the like)
    return value is not None and not (isinstance(value, (Mapping, list, tuple)) and not value)


def _refuse(why: str, **values) -> None:
    """NotImplementedError naming the first argument in ``values`` that is set: a graph cannot
    honour it, and ignoring it would change the result silently."""
    for name, value in values.items():
        if _is_set(value):
            given = f"{name}={dict(value)!r}" if isinstance(value, Mapping) else name
            raise NotImplementedError(f"{given} is not supported by an exported graph: {why}")


def _require(**values) -> None:
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required")


def _per_item(value, batch: int, name: str) -> torch.Tensor:
    """``value`` (a number, a 0-d tensor, [1] or [batch]) as a [batch] tensor, as the diffusers
    models broadcast a timestep. Its dtype stays: ``_denoise`` casts to the graph input's."""
    if value is None:
        raise ValueError(f"{name} is required")
    t = torch.as_tensor(value)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be a number or a tensor of shape [] / [1] / [{batch}] (the batch), got shape "
                         f"{tuple(t.shape)}")
    return t.reshape(-1).expand(batch)


class _Call:
    """How one architecture's diffusers call maps onto its graph's inputs. ``output``: the model's
    return type (``return_dict=True``)."""

    # Groups of inputs the PyTorch model broadcasts along the batch: given with one item each
    # (all of a group together) while the latents have B, it computes as if each were repeated B
    # times. Pipelines rely on it: num_images_per_prompt > 1 with precomputed prompt_embeds passes
    # B latents with one prompt's embeddings. Checked against each family's diffusers forward.
    broadcast: tuple[tuple[str, ...], ...] = ()
    latents = "hidden_states"

    def __init__(self, metadata: Mapping):
        from diffusers.configuration_utils import FrozenDict
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        self.config = FrozenDict(metadata["config"])
        self.inputs = tuple(metadata["inputs"])
        self.guidance = "guidance" in self.inputs
        self.output = Transformer2DModelOutput

    def attributes(self) -> dict[str, object]:
        """Attributes a pipeline reads from this model beyond ``config``."""
        return {}

    def forward(self, module: ExportedDenoiser, *args, **kwargs):
        raise NotImplementedError

    def run(self, module: ExportedDenoiser, feed: dict, return_dict: bool):
        noise = module._denoise(self.expand(feed))
        return self.output(sample=noise) if return_dict else (noise,)

    def expand(self, feed: dict) -> dict:
        """``feed`` with each ``broadcast`` group whose inputs all have batch 1 expanded to the
        latents' batch, as the PyTorch model broadcasts them; any other batch is left for the shape
        check to refuse (2 vs 3: the inputs disagree)."""
        latents = feed[self.latents]
        b = latents.shape[0] if torch.is_tensor(latents) and latents.ndim else 1
        if b <= 1:
            return feed
        feed = dict(feed)
        for group in self.broadcast:
            given = [feed[k] for k in group if k in feed]
            if given and all(torch.is_tensor(t) and t.ndim >= 1 and t.shape[0] == 1 for t in given):
                feed.update({k: feed[k].expand(b, *feed[k].shape[1:]) for k in group if k in feed})
        return feed

    def guidance_feed(self, guidance, batch: int) -> dict[str, torch.Tensor]:
        """``{"guidance": [batch]}`` for a guidance-distilled model's graph, ``{}`` for others;
        ValueError where ``guidance`` is missing or given in vain."""
        if self.guidance and guidance is None:
            raise ValueError("guidance is required: this graph was exported from a guidance-distilled model "
                             "(config.guidance_embeds)")
        if not self.guidance and guidance is not None:
            raise ValueError("guidance given, but this graph's model has no guidance embedding "
                             "(config.guidance_embeds is False): pass guidance=None")
        return {"guidance": _per_item(guidance, batch, "guidance")} if self.guidance else {}

    def out_of_range(self, symbol: str, found: _Found, bounds, ranges: Mapping) -> None:
        """Raise ValueError for ``symbol`` = ``found.value``, outside its export range ``bounds``
        (graph units), in a user's units where the symbol counts one of the export's ``ranges``:
        ``to_onnx`` names its dimensions ``batch``, ``height`` / ``width`` (spatial steps),
        ``latent_frames`` (frame steps), ``text_tokens`` and ``image_tokens``. Each branch
        raises (the same bound in other units); any other symbol gets the graph's units."""
        if symbol in ("height", "width"):
            # The pixel range is the step range times the pixels per step (to_onnx writes both).
            px = ranges[symbol][0] // bounds[0]
            _check_range(symbol, found.value * px, ranges[symbol], symbol, " px",
                         detail=f" ({found.where}: {found.value * found.step} latent pixels)")
        if symbol == "latent_frames":
            _check_range("the number of latent frames", found.value * found.step,
                         [None if b is None else b * found.step for b in bounds], "frames", detail=f" ({found.where})",
                         hint=f" ({_span(*ranges['frames'])} video frames)")
        if symbol == "batch":
            if found.value < 1:
                raise ValueError(f"batch is {found.value} ({found.where}): the batch must be positive")
            _check_range("batch", found.value, bounds, "batch", detail=f" ({found.where})")
        raise ValueError(f"{symbol} is {found.value} ({found.where}); this graph takes {_span(*bounds)}")


_LORA = ("its weights and attention were fixed at export (fuse a LoRA into the model before to_onnx; IP-Adapter "
         "embeddings are not graph inputs)")
_CONTROLNET = "ControlNet residuals are not graph inputs (export the denoiser with its ControlNet)"
_MASKS = "the exported graph has no attention-mask input"


class _FluxCall(_Call):
    """``FluxTransformer2DModel``: ``hidden_states [B, S, C]`` packed latents (S = height/16 *
    width/16), ``encoder_hidden_states [B, T, D]``, ``pooled_projections [B, P]``, ``timestep``
    (the pipeline's t / 1000; a number or [B]; in the export's dtype), ``img_ids [S, 3]``,
    ``txt_ids [T, 3]`` (3-D ids [B, S, 3] of older diffusers: the first item, as diffusers does),
    ``guidance`` (a number or [B]; required by guidance-distilled models, refused by others).
    ``encoder_hidden_states`` and ``pooled_projections`` may have batch 1 for B latents (broadcast,
    as the model does)."""

    broadcast = (("encoder_hidden_states",), ("pooled_projections",))

    def forward(self, module, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict=True, controlnet_blocks_repeat=False):
        _refuse(_LORA, joint_attention_kwargs=joint_attention_kwargs)
        _refuse(_CONTROLNET, controlnet_block_samples=controlnet_block_samples,
                controlnet_single_block_samples=controlnet_single_block_samples)
        _require(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                 img_ids=img_ids, txt_ids=txt_ids)
        b = hidden_states.shape[0]
        feed = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=pooled_projections, timestep=_per_item(timestep, b, "timestep"),
                    img_ids=img_ids[0] if img_ids.ndim == 3 else img_ids,
                    txt_ids=txt_ids[0] if txt_ids.ndim == 3 else txt_ids, **self.guidance_feed(guidance, b))
        return self.run(module, feed, return_dict)

    def out_of_range(self, symbol, found, bounds, ranges):
        if symbol == "image_tokens":
            # One image-token dimension, declared over the product of the side ranges: that product
            # is what a call must stay in (the sides themselves are in img_ids only).
            (hlo, hhi), (wlo, whi) = ranges["height"], ranges["width"]
            _check_range("the number of image tokens", found.value, bounds, "height=, width",
                         detail=" (height/16 * width/16)",
                         hint=f" (height {_span(hlo, hhi)} px, width {_span(wlo, whi)} px)")
        super().out_of_range(symbol, found, bounds, ranges)


class _UNetCall(_Call):
    """``UNet2DConditionModel`` (SD 1.5 / SD 2 / SDXL): ``sample [B, C, height/8, width/8]``,
    ``timestep`` (a number, 0-d, [1] or [B], in [0, 1000]; float32 in the graph),
    ``encoder_hidden_states [B, T, D]``; SDXL: ``added_cond_kwargs`` with ``text_embeds [B, E]``
    and ``time_ids [B, 6]``, required."""

    latents = "sample"  # nothing broadcasts: UNet2DConditionModel needs one of each per item

    def __init__(self, metadata):
        super().__init__(metadata)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        self.output = UNet2DConditionOutput
        self.sdxl = "time_ids" in self.inputs

    def attributes(self):
        if not self.sdxl:
            return {}
        # StableDiffusionXLPipeline._get_add_time_ids compares its conditioning width with
        # unet.add_embedding.linear_1.in_features before the first step.
        width = self.config.projection_class_embeddings_input_dim
        return {"add_embedding": SimpleNamespace(linear_1=SimpleNamespace(in_features=width))}

    def forward(self, module, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        _refuse(_LORA, cross_attention_kwargs=cross_attention_kwargs)
        _refuse(_CONTROLNET, down_block_additional_residuals=down_block_additional_residuals,
                mid_block_additional_residual=mid_block_additional_residual,
                down_intrablock_additional_residuals=down_intrablock_additional_residuals)
        _refuse(_MASKS, attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask)
        _refuse("the exported model has no class or timestep-condition embedding", class_labels=class_labels,
                timestep_cond=timestep_cond)
        added = dict(added_cond_kwargs or {})
        feed = dict(sample=sample, timestep=_per_item(timestep, sample.shape[0], "timestep"),
                    encoder_hidden_states=encoder_hidden_states)
        if self.sdxl:
            missing = [k for k in ("text_embeds", "time_ids") if added.get(k) is None]
            if missing:
                raise ValueError(f"added_cond_kwargs must hold text_embeds and time_ids for an SDXL UNet; missing "
                                 f"{', '.join(missing)}")
            feed.update(text_embeds=added.pop("text_embeds"), time_ids=added.pop("time_ids"))
        if added:
            raise NotImplementedError(f"added_cond_kwargs {sorted(added)} are not supported by an exported graph: "
                                      "its inputs are " + ", ".join(self.inputs))
        return self.run(module, feed, return_dict)


class _SD3Call(_Call):
    """``SD3Transformer2DModel`` (SD3, SD3.5): ``hidden_states [B, C, height/8, width/8]``,
    ``encoder_hidden_states [B, T, D]``, ``pooled_projections [B, P]``, ``timestep`` (a number or
    [B], in [0, 1000]; float32 in the graph). ControlNet residuals, skip-layer guidance
    (``skip_layers``) and ``joint_attention_kwargs`` (LoRA scale, IP-Adapter) are refused.
    ``encoder_hidden_states`` and ``pooled_projections`` may have batch 1 for B latents."""

    broadcast = (("encoder_hidden_states",), ("pooled_projections",))

    def forward(self, module, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True, skip_layers=None):
        _refuse(_LORA, joint_attention_kwargs=joint_attention_kwargs)
        _refuse(_CONTROLNET, block_controlnet_hidden_states=block_controlnet_hidden_states)
        _refuse("the graph runs every layer it was exported with (call the pipeline without skip_guidance_layers)",
                skip_layers=skip_layers)
        _require(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections)
        feed = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=pooled_projections,
                    timestep=_per_item(timestep, hidden_states.shape[0], "timestep"))
        return self.run(module, feed, return_dict)


class _WanCall(_Call):
    """``WanTransformer3DModel`` (Wan 2.1): ``hidden_states [B, C, latent_frames, height/8,
    width/8]``, ``timestep`` (a number or [B], in [0, 1000]; float32 in the graph; Wan 2.2's
    per-token [B, S] timesteps are refused), ``encoder_hidden_states [B, T, D]``; image-to-video
    graphs (``config.image_dim`` set) take ``encoder_hidden_states_image [B, I, image_dim]``,
    required, and exactly 512 text tokens (upstream splits its context at ``T - 512``;
    ``WanImageToVideoPipeline`` pads prompts to 512); text-to-video graphs refuse it. The text and
    image context may have batch 1 (both: upstream concatenates them) for B latents."""

    broadcast = (("encoder_hidden_states", "encoder_hidden_states_image"),)

    def __init__(self, metadata):
        super().__init__(metadata)
        self.image = "encoder_hidden_states_image" in self.inputs

    def forward(self, module, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict=True, attention_kwargs=None):
        _refuse(_LORA, attention_kwargs=attention_kwargs)
        feed = dict(hidden_states=hidden_states, timestep=_per_item(timestep, hidden_states.shape[0], "timestep"),
                    encoder_hidden_states=encoder_hidden_states)
        if self.image:
            if encoder_hidden_states_image is None:
                raise ValueError("encoder_hidden_states_image is required: this graph was exported from an "
                                 "image-to-video Wan (config.image_dim is set)")
            text = encoder_hidden_states.shape[1] if encoder_hidden_states.ndim == 3 else None
            if text != _WAN_I2V_TEXT:
                raise ValueError(f"an image-to-video Wan takes exactly {_WAN_I2V_TEXT} text tokens (it splits image "
                                 f"from text context at T - {_WAN_I2V_TEXT}); encoder_hidden_states has shape "
                                 f"{tuple(encoder_hidden_states.shape)}: pad the prompt embeddings to "
                                 f"{_WAN_I2V_TEXT} tokens as WanImageToVideoPipeline does")
            feed["encoder_hidden_states_image"] = encoder_hidden_states_image
        elif encoder_hidden_states_image is not None:
            raise ValueError("encoder_hidden_states_image given, but this graph's model is text-to-video "
                             "(config.image_dim is None): pass encoder_hidden_states_image=None")
        return self.run(module, feed, return_dict)


_WAN_I2V_TEXT = 512  # upstream's WanAttnProcessor: image context = the first T - 512 tokens


class _HunyuanCall(_Call):
    """``HunyuanVideoTransformer3DModel``: ``hidden_states [B, C, latent_frames, height/8,
    width/8]``, ``timestep`` (a number or [B], in [0, 1000]; in the export's dtype),
    ``encoder_hidden_states [B, T, D]`` with ``encoder_attention_mask [B, T]`` (1: a prompt token,
    0: padding; required, as upstream), ``pooled_projections [B, P]``, ``guidance`` (the pipeline's
    scale * 1000; required by guidance-distilled models, refused by others). ``attention_kwargs``
    (LoRA scale) is refused. ``encoder_hidden_states`` with its mask (both) and
    ``pooled_projections`` may have batch 1 for B latents."""

    broadcast = (("encoder_hidden_states", "encoder_attention_mask"), ("pooled_projections",))

    def forward(self, module, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
                pooled_projections=None, guidance=None, attention_kwargs=None, return_dict=True):
        _refuse(_LORA, attention_kwargs=attention_kwargs)
        _require(encoder_attention_mask=encoder_attention_mask, pooled_projections=pooled_projections)
        b = hidden_states.shape[0]
        feed = dict(hidden_states=hidden_states, timestep=_per_item(timestep, b, "timestep"),
                    encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                    pooled_projections=pooled_projections, **self.guidance_feed(guidance, b))
        return self.run(module, feed, return_dict)


# Per-architecture call mappings, keyed by the metadata's "architecture".
_CALLS: dict[str, type[_Call]] = {"flux": _FluxCall, "unet": _UNetCall, "sd3": _SD3Call, "wan": _WanCall,
                                  "hunyuan": _HunyuanCall}


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------

# onnxruntime's type strings -> torch; torch -> ONNX TensorProto.DataType (IOBinding's element type,
# which also covers bfloat16, where numpy has no dtype).
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
              "tensor(double)": torch.float64, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
_ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.float64: 11, torch.int64: 7,
               torch.int32: 6}
# Execution providers that take their inputs in CUDA memory; every other provider takes CPU memory.
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"OnnxRuntimeDenoiser needs onnxruntime: {_INSTALL}") from e
    return onnxruntime


def _spec(arg) -> TensorSpec:
    if arg.type not in _ORT_TYPES:
        raise ValueError(f"graph tensor {arg.name} has type {arg.type}, which OnnxRuntimeDenoiser does not bind")
    shape = tuple(d if isinstance(d, (int, str)) else None for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_TYPES[arg.type])


def _check_loadable(session, metadata: Mapping, providers: Sequence[str]) -> None:
    """ValueError for a graph the session cannot run: exported from the meta device (metadata
    ``weights`` False; files written before that key: every metadata input present, the rest
    of the graph's inputs the module's weights), or bfloat16 on the CPU provider alone."""
    names = [i.name for i in session.get_inputs()]
    extra = [n for n in names if n not in metadata["inputs"]]
    meta = metadata.get("weights", True) is False or (
        extra and set(metadata["inputs"]) <= set(names) and all("." in n for n in extra))
    if meta:
        raise ValueError(f"this graph was exported from the meta device: its weights are graph inputs "
                         f"({len(extra)} of them, e.g. {extra[0] if extra else '?'}); export the model with its "
                         "weights (to_onnx of the model loaded on the CPU or a GPU)")
    bf16 = metadata.get("dtype") == torch.bfloat16 or any(
        a.type == "tensor(bfloat16)" for a in (*session.get_inputs(), *session.get_outputs()))
    if bf16 and _cpu_only(providers):
        raise ValueError(_BF16_ON_CPU)


_BF16_ON_CPU = ("this graph is bfloat16, and onnxruntime's CPUExecutionProvider has no bfloat16 kernels (MatMul): "
                "load it with providers=['CUDAExecutionProvider'], or export again with to_onnx(..., "
                "dtype=torch.float32) to run on the CPU")


def _cpu_only(providers) -> bool:
    return all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers)


class OnnxRuntimeDenoiser(ExportedDenoiser):
    """A graph written by ``to_onnx``, run by onnxruntime, standing in for the diffusers denoiser:
    ``pipe.transformer = OnnxRuntimeDenoiser.load(path)`` (``pipe.unet`` for UNets).

    Inputs and the output are bound by name with IOBinding to the torch tensors' memory (no copy;
    any batch, resolution and text length the graph's dimensions and exported ranges allow). The
    output is a new tensor each call. ``device`` is CUDA when the session's first provider is
    ``CUDAExecutionProvider`` / ``TensorrtExecutionProvider`` (inputs on another device are
    moved there), else the CPU. Build one with ``load``, or from a ``session`` of such a graph
    and its ``metadata`` (``parse_metadata(session.get_modelmeta().custom_metadata_map)``):
    ``OnnxRuntimeDenoiser(session, metadata, run_options=None)``
    (``run_options``: an ``onnxruntime.RunOptions`` for every call).
    """

    def __init__(self, session, metadata: Mapping, run_options=None):
        providers = session.get_providers()
        _check_loadable(session, metadata, providers)
        device = torch.device("cpu")
        if providers[0] in _CUDA_PROVIDERS:
            device_id = int(session.get_provider_options()[providers[0]].get("device_id", 0))
            device = torch.device("cuda", device_id)
        outputs = {o.name: o for o in session.get_outputs()}
        if metadata["output"] not in outputs:
            raise ValueError(f"the graph has no output {metadata['output']!r} (its outputs: {list(outputs)})")
        super().__init__(metadata, [_spec(i) for i in session.get_inputs()], _spec(outputs[metadata["output"]]),
                         device)
        self.session = session
        self.run_options = run_options

    @classmethod
    def load(cls, path, providers: Sequence | None = None, session_options=None) -> OnnxRuntimeDenoiser:
        """Load the graph ``to_onnx`` wrote at ``path`` into an onnxruntime ``InferenceSession``.

        - ``providers``: execution providers in order of preference, names or ``(name, options)``
          pairs as onnxruntime takes them, or one name; default ``["CPUExecutionProvider"]``.
        - ``session_options``: an ``onnxruntime.SessionOptions``, or None (onnxruntime's defaults).

        Raises ``FileNotFoundError`` (no file at ``path``), ``ValueError`` (not an ONNX file; no
        fastgen metadata; a provider this onnxruntime lacks, listing the available ones; an
        architecture without a call mapping here; a graph exported from the meta device, its
        weights graph inputs; a bfloat16 graph on the CPU provider alone, which has no bfloat16
        kernels for its MatMuls), ``ImportError`` (onnxruntime missing).
        The file is read once, by onnxruntime: fastgen's metadata comes from the session.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}: export a denoiser with fastgen.export.to_onnx first")
        ort = _import_onnxruntime()
        if isinstance(providers, str):
            providers = [providers]
        providers = ["CPUExecutionProvider"] if providers is None else list(providers)
        available = ort.get_available_providers()
        unknown = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if not providers or unknown:
            raise ValueError(f"providers {unknown or providers} are not available in this onnxruntime; it has "
                             f"{available} ({_INSTALL})")
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        except ort.capi.onnxruntime_pybind11_state.InvalidProtobuf as e:
            raise ValueError(f"{path} is not an ONNX model ({e})") from None
        except ort.capi.onnxruntime_pybind11_state.NotImplemented:
            # onnxruntime assigns kernels when it builds the session: a bfloat16 graph on the CPU
            # provider alone fails here (or, with fewer optimisations, on the first call).
            from fastgen.export.onnx import read_metadata

            if _cpu_only(providers) and read_metadata(path).get("dtype") == torch.bfloat16:
                raise ValueError(_BF16_ON_CPU) from None
            raise
        return cls(session, parse_metadata(session.get_modelmeta().custom_metadata_map, str(path)))

    def _run(self, feed):
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, t in feed.items():
            binding.bind_input(name, kind, index, _ONNX_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        out = torch.empty(self.output_shape(feed), dtype=self.output.dtype, device=self.device)
        binding.bind_output(self.output.name, kind, index, _ONNX_TYPES[out.dtype], tuple(out.shape),
                            out.data_ptr())
        if kind == "cuda":
            # onnxruntime's CUDA provider computes on its own stream: the inputs torch wrote on the
            # current stream must be complete. Run synchronises its stream before returning.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding, self.run_options)
        return out


__all__ = ["ExportedDenoiser", "OnnxRuntimeDenoiser", "TensorSpec"]
