"""``fastgen.export.runtime``: an exported denoiser run by onnxruntime inside its diffusers pipeline
(tiny Flux, SDXL, SD3, Wan 2.1 text-to-video, HunyuanVideo) gives PyTorch's image / video; the call
mapping alone (a pure-PyTorch stand-in runtime) gives it bit for bit; deliberate mapping errors are
caught; bad input raises clearly.

Tolerance: fp32 onnxruntime and PyTorch differ only in the order of their sums, ~1e-6 of a
forward's scale; 4 Euler steps carry that forward (each step adds its own and moves the earlier
ones by about the step's Jacobian, O(1) here) and the VAE decode is the same PyTorch in both runs.
Measured: <= 3e-6 on the [0, 1] images and video frames of every family. ``IMAGE_TOL`` = 1e-4
leaves 30x margin, while the mapping errors in ``test_mapping_errors_change_the_image`` (a timestep
off by 1000x, CFG halves swapped, image positions transposed, HunyuanVideo's prompt mask dropped)
move the images by 5e-3 (the mask: 3 of 8 prompt tokens are padding) to 5e-1 (measured); the test
asks for 10x ``IMAGE_TOL``. Forward-level comparisons use 1e-4 of the largest |output|, as
tests/test_export_onnx.py does.

SD 1.5 has no pipeline case of its own: its UNet mapping is SDXL's without the added conditioning,
and every export costs ~10 s of this file's budget.
"""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastgen.export import ExportedDenoiser, OnnxRuntimeDenoiser, TensorSpec, read_metadata, to_onnx  # noqa: E402
from fastgen.export.onnx import _ARCHES  # noqa: E402
from fastgen.models import build_pipeline, tiny_denoiser  # noqa: E402

IMAGE_TOL = 1e-4
REL_TOL = 1e-4
STEPS = 4
# Export ranges: batch 2 is the CFG batch of SDXL and SD3 (Wan and HunyuanVideo call once per
# branch); the tiny pipelines run at 64 px (HunyuanVideo 32 px) and 5 frames. SDXL is exported without
# size ranges: every size the model takes (unbounded exports take longer: one is enough).
RANGES = {"flux": dict(batch=(1, 2), height=(32, 96), width=(32, 96)),
          "sdxl": dict(batch=(1, 2)),
          "sd3": dict(batch=(1, 2), height=(32, 96), width=(32, 96)),
          "wan": dict(batch=(1, 2), height=(32, 96), width=(32, 96), frames=(1, 9)),
          "hunyuan": dict(batch=(1, 2), height=(16, 48), width=(16, 48), frames=(1, 13))}
VIDEO = ("wan", "hunyuan")


@pytest.fixture(autouse=True, scope="module")
def _quiet_exporter():
    # torch.onnx logs a warning per missing torchvision op: noise in a test run
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


class Case:
    """A tiny pipeline, its PyTorch denoiser, the exported graph loaded in onnxruntime (``ort``),
    and PyTorch's image (video frames for video families)."""

    def __init__(self, family, tmp):
        self.family = family
        self.pipe, self.call = build_pipeline(family, "tiny")
        self.pipe.set_progress_bar_config(disable=True)
        self.attr = "unet" if family == "sdxl" else "transformer"
        self.model = getattr(self.pipe, self.attr)
        self.path = tmp / f"{family}.onnx"
        to_onnx(self.model, self.path, validate=False, **RANGES[family])
        self.ort = OnnxRuntimeDenoiser.load(self.path)
        self.reference = self.image(self.model)

    def image(self, denoiser, **kwargs) -> torch.Tensor:
        setattr(self.pipe, self.attr, denoiser)
        try:
            out = self.pipe(**self.call, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                            output_type="pt", **kwargs)
        finally:
            setattr(self.pipe, self.attr, self.model)
        return out.frames if self.family in VIDEO else out.images


@pytest.fixture(scope="module")
def cases(tmp_path_factory, _quiet_exporter):
    """``cases(family)``: that family's ``Case``, exported on first use and kept for the module."""
    tmp, built = tmp_path_factory.mktemp("runtime"), {}

    def get(family: str) -> Case:
        if family not in built:
            built[family] = Case(family, tmp)
        return built[family]

    return get


# --------------------------------------------------------------------------------------------
# Whole pipelines
# --------------------------------------------------------------------------------------------

SHAPES = {"flux": (1, 3, 64, 64), "sdxl": (1, 3, 64, 64), "sd3": (1, 3, 64, 64), "wan": (1, 5, 3, 64, 64),
          "hunyuan": (1, 5, 3, 32, 32)}


@pytest.mark.parametrize("family", list(RANGES))
def test_pipeline_on_onnxruntime_matches_pytorch(cases, family):
    case = cases(family)
    got = case.image(case.ort)
    assert got.shape == case.reference.shape == SHAPES[family]
    assert (got - case.reference).abs().max().item() < IMAGE_TOL


def test_images_per_prompt_with_prompt_embeds(cases):
    # num_images_per_prompt=2 with precomputed prompt_embeds: FluxPipeline passes 2 latents with one
    # prompt's embeddings and pooled projection, which the model broadcasts (batch 2 is the export's top).
    flux = cases("flux")
    ref = flux.image(flux.model, num_images_per_prompt=2)
    got = flux.image(flux.ort, num_images_per_prompt=2)
    assert got.shape == ref.shape == (2, 3, 64, 64) and (got - ref).abs().max().item() < IMAGE_TOL


@pytest.mark.parametrize("family, one", [
    ("flux", ("encoder_hidden_states", "pooled_projections")), ("sd3", ("encoder_hidden_states",)),
    ("wan", ("encoder_hidden_states",)), ("hunyuan", ("encoder_hidden_states", "encoder_attention_mask")),
    ("hunyuan", ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"))],
    ids=["flux", "sd3-text", "wan", "hunyuan-text", "hunyuan-all"])
def test_batch_one_conditioning_broadcasts(cases, family, one):
    # Inputs the PyTorch model broadcasts along the batch may have one item for 2 latents.
    case = cases(family)
    x = INPUTS[family](batch=2)
    x.update({k: x[k][:1] for k in one})
    assert _rel(case.ort(**x).sample, _reference(case, **x)) < REL_TOL


def test_batch_one_conditioning_that_does_not_broadcast(cases):
    # Where the PyTorch model does not broadcast (HunyuanVideo's text without its mask; a UNet), the
    # inputs still disagree.
    x = _hunyuan_inputs(batch=2)
    with pytest.raises(ValueError, match=r"'batch' is 2 in hidden_states .* but 1 in encoder_hidden_states"):
        cases("hunyuan").ort(**{**x, "encoder_hidden_states": x["encoder_hidden_states"][:1]})
    x = _sdxl_inputs(batch=2)
    with pytest.raises(ValueError, match=r"'batch' is 2 in sample .* but 1 in encoder_hidden_states"):
        cases("sdxl").ort(**{**x, "encoder_hidden_states": x["encoder_hidden_states"][:1]})


class _TorchRuntime(ExportedDenoiser):
    """A stand-in runtime: the graph's inputs by name into the PyTorch model, through the same
    wrapper the export traced. Its images must equal PyTorch's exactly: the mapping adds no error."""

    def __init__(self, metadata, inputs, output, model):
        super().__init__(metadata, inputs, output, "cpu")
        self.wrapper = _ARCHES[type(model).__name__](model).wrapper(model)

    @classmethod
    def of(cls, case):
        return cls(case.ort.metadata, list(case.ort.inputs.values()), case.ort.output, case.model)

    def _run(self, feed):
        out = self.wrapper(**feed)
        assert out.shape == self.output_shape(feed)
        return out


@pytest.mark.parametrize("family", list(RANGES))
def test_call_mapping_is_exact(cases, family):
    case = cases(family)
    assert torch.equal(case.image(_TorchRuntime.of(case)), case.reference)


def _flip(t):  # the CFG batch's halves swapped
    return torch.cat(t.chunk(2)[::-1])


@pytest.mark.parametrize("family, mistake", [
    ("flux", lambda f: {**f, "timestep": f["timestep"] * 1000}),  # t, not t / 1000
    ("flux", lambda f: {**f, "img_ids": f["img_ids"][:, [0, 2, 1]]}),  # rows and columns transposed
    ("sdxl", lambda f: {**f, "encoder_hidden_states": _flip(f["encoder_hidden_states"])}),
    ("sdxl", lambda f: {**f, "timestep": f["timestep"] / 1000}),
    ("sdxl", lambda f: {**f, "text_embeds": _flip(f["text_embeds"])}),
    ("sd3", lambda f: {**f, "timestep": f["timestep"] / 1000}),  # sigma, not t
    ("wan", lambda f: {**f, "timestep": f["timestep"] / 1000}),
    ("hunyuan", lambda f: {**f, "encoder_attention_mask": torch.ones_like(f["encoder_attention_mask"])}),
], ids=["flux-timestep", "flux-ids", "sdxl-cfg", "sdxl-timestep", "sdxl-pooled-cfg", "sd3-timestep", "wan-timestep",
        "hunyuan-mask-dropped"])
def test_mapping_errors_change_the_image(cases, family, mistake):
    # The tolerance above has to catch a wrong mapping, or the pipeline tests prove nothing.
    class Mistaken(OnnxRuntimeDenoiser):
        def _run(self, feed):
            return super()._run({k: v.contiguous() for k, v in mistake(feed).items()})

    case = cases(family)
    assert (case.image(Mistaken(case.ort.session, case.ort.metadata)) - case.reference).abs().max().item() \
        > 10 * IMAGE_TOL


# --------------------------------------------------------------------------------------------
# One forward: the diffusers call forms
# --------------------------------------------------------------------------------------------


def _rel(got, ref) -> float:
    assert got.shape == ref.shape
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux_inputs(batch=2, rows=6, cols=4, text=5):
    ids = torch.zeros(rows * cols, 3)
    ids[:, 1], ids[:, 2] = torch.arange(rows * cols) // cols, torch.arange(rows * cols) % cols
    return dict(hidden_states=_randn(batch, rows * cols, 16, seed=1),
                encoder_hidden_states=_randn(batch, text, 128, seed=2),
                pooled_projections=_randn(batch, 64, seed=3), timestep=torch.linspace(0.7, 0.2, batch), img_ids=ids,
                txt_ids=torch.zeros(text, 3))


def _sdxl_inputs(batch=2, h=6, w=4, text=5, timestep=381.5):
    return dict(sample=_randn(batch, 4, h, w, seed=1), timestep=timestep,
                encoder_hidden_states=_randn(batch, text, 128, seed=2),
                added_cond_kwargs=dict(text_embeds=_randn(batch, 64, seed=3),
                                       time_ids=torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]] * batch)))


def _sd3_inputs(batch=2, h=10, w=6, text=5):
    return dict(hidden_states=_randn(batch, 4, h, w, seed=1), encoder_hidden_states=_randn(batch, text, 128, seed=2),
                pooled_projections=_randn(batch, 64, seed=3), timestep=torch.linspace(700.0, 20.5, batch))


def _wan_inputs(batch=2, f=3, h=6, w=4, text=5):
    return dict(hidden_states=_randn(batch, 4, f, h, w, seed=1), timestep=torch.linspace(999.3, 20.5, batch),
                encoder_hidden_states=_randn(batch, text, 128, seed=2))


def _hunyuan_inputs(batch=2, f=4, h=6, w=4, text=6):
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[-1, text - 2:] = 0  # the last prompt is shorter: padded, masked
    return dict(hidden_states=_randn(batch, 4, f, h, w, seed=1), timestep=torch.linspace(700.0, 20.5, batch),
                encoder_hidden_states=_randn(batch, text, 128, seed=2), encoder_attention_mask=mask,
                pooled_projections=_randn(batch, 64, seed=3), guidance=torch.full((batch,), 6000.0))


INPUTS = {"flux": _flux_inputs, "sdxl": _sdxl_inputs, "sd3": _sd3_inputs, "wan": _wan_inputs,
          "hunyuan": _hunyuan_inputs}


def _reference(case, **x):
    with torch.no_grad():
        return case.model(**x, return_dict=False)[0]


def test_flux_forward_call_forms(cases):
    flux = cases("flux")
    x = _flux_inputs()  # 2 items, a 96 x 64 px grid (24 tokens), 5 text tokens
    out = flux.ort(**x)
    assert type(out).__name__ == "Transformer2DModelOutput" and _rel(out.sample, _reference(flux, **x)) < REL_TOL
    # positional, return_dict=False, a shared scalar timestep, 3-D ids (older diffusers)
    ref_t = _reference(flux, **{**x, "timestep": torch.tensor([0.7, 0.7])})
    args = [x[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections")]
    out = flux.ort(*args, timestep=0.7, img_ids=x["img_ids"][None].expand(2, -1, -1),
                   txt_ids=x["txt_ids"][None].expand(2, -1, -1), joint_attention_kwargs={}, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and _rel(out[0], ref_t) < REL_TOL
    # inputs in another dtype are cast to the graph's; a view at an offset binds at its own address
    padded = torch.cat([torch.full((1, 24, 16), float("nan")), x["hidden_states"]])
    out = flux.ort(**{**x, "hidden_states": padded[1:], "pooled_projections": x["pooled_projections"].double(),
                      "timestep": x["timestep"].double()})
    assert out.sample.dtype == torch.float32 and _rel(out.sample, _reference(flux, **x)) < REL_TOL


@pytest.mark.parametrize("timestep, value", [
    (381.5, 381.5), (381, 381.0), (torch.tensor(381.5), 381.5), (torch.tensor([381.5]), 381.5),
    (torch.tensor([381.5, 381.5]), 381.5), (torch.tensor(381), 381.0)],
    ids=["float", "int", "0-d", "[1]", "[B]", "int64"])
def test_unet_timestep_forms(cases, timestep, value):
    sdxl = cases("sdxl")
    ref = _reference(sdxl, **_sdxl_inputs(timestep=torch.tensor([value, value])))
    out = sdxl.ort(**_sdxl_inputs(timestep=timestep))  # latent 6 x 4: 48 x 32 px
    assert type(out).__name__ == "UNet2DConditionOutput" and _rel(out.sample, ref) < REL_TOL


def test_sdxl_forward(cases):
    sdxl = cases("sdxl")
    x = _sdxl_inputs(h=10, w=4, timestep=torch.tensor([700.0, 20.0]))  # 80 x 32 px
    assert _rel(sdxl.ort(**x).sample, _reference(sdxl, **x)) < REL_TOL
    # exported with no size ranges: any size the model takes, here 320 x 320 px
    x = _sdxl_inputs(batch=1, h=40, w=40)
    assert _rel(sdxl.ort(**x).sample, _reference(sdxl, **x)) < REL_TOL


def test_sd3_forward(cases):
    sd3 = cases("sd3")
    x = _sd3_inputs()  # 80 x 48 px, fractional timesteps (float32 in the graph, as the pipeline passes them)
    out = sd3.ort(**x)
    assert type(out).__name__ == "Transformer2DModelOutput" and _rel(out.sample, _reference(sd3, **x)) < REL_TOL
    # positional, a number for the timestep, return_dict=False; empty kwargs / skip_layers change nothing
    ref = _reference(sd3, **{**x, "timestep": torch.tensor([381.5, 381.5])})
    out = sd3.ort(x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], 381.5,
                  joint_attention_kwargs={}, skip_layers=[], return_dict=False)
    assert isinstance(out, tuple) and _rel(out[0], ref) < REL_TOL


def test_wan_forward(cases):
    wan = cases("wan")
    x = _wan_inputs()  # 9 frames (3 latent), 48 x 32 px
    out = wan.ort(**x)
    assert type(out).__name__ == "Transformer2DModelOutput" and _rel(out.sample, _reference(wan, **x)) < REL_TOL
    x = _wan_inputs(batch=1, f=1, h=12, w=4)  # 1 frame, 96 x 32 px: the ranges' edges
    assert _rel(wan.ort(**x, attention_kwargs={}).sample, _reference(wan, **x)) < REL_TOL


def test_hunyuan_forward(cases):
    hunyuan = cases("hunyuan")
    x = _hunyuan_inputs()  # 13 frames (4 latent), 48 x 32 px
    ref = _reference(hunyuan, **x)
    out = hunyuan.ort(**x)
    assert type(out).__name__ == "Transformer2DModelOutput" and _rel(out.sample, ref) < REL_TOL
    # a boolean mask and a number for the guidance: cast and broadcast as the model does
    out = hunyuan.ort(**{**x, "encoder_attention_mask": x["encoder_attention_mask"].bool(), "guidance": 6000.0},
                      return_dict=False)
    assert _rel(out[0], ref) < REL_TOL


class _Recorder(ExportedDenoiser):
    """Records what reaches the runtime; returns zeros."""

    def _run(self, feed):
        self.feed = feed
        return torch.zeros(self.output_shape(feed), dtype=self.output.dtype)


@pytest.mark.parametrize("family, timestep_dtype", [("wan", torch.float32), ("hunyuan", torch.float16)])
def test_each_input_takes_its_graph_dtype(cases, family, timestep_dtype):
    # A float16 export: to_onnx keeps UNet / SD3 / Wan timesteps in float32 (scheduler timesteps as
    # the pipelines pass them; 999.3 is not a float16), Flux / HunyuanVideo timesteps in the export's dtype.
    graph = cases(family).ort
    half = {n: TensorSpec(n, s.shape, torch.float16 if s.dtype == torch.float32 and n != "timestep" else s.dtype)
            for n, s in graph.inputs.items()}
    half["timestep"] = TensorSpec("timestep", half["timestep"].shape, timestep_dtype)
    out = TensorSpec(graph.output.name, graph.output.shape, torch.float16)
    module = _Recorder({**graph.metadata, "dtype": torch.float16}, list(half.values()), out, "cpu")
    x = INPUTS[family](batch=1)
    noise = module(**{**x, "timestep": torch.tensor([999.3])}).sample
    assert module.dtype == noise.dtype == torch.float16
    assert {n: t.dtype for n, t in module.feed.items()} == {n: s.dtype for n, s in half.items()}
    assert module.feed["timestep"].item() == torch.tensor(999.3, dtype=timestep_dtype).item()


def test_wan_image_to_video_mapping():
    # An image-to-video graph's inputs as to_onnx declares them (tests/test_export_onnx.py runs such
    # a graph on onnxruntime), its mapping checked against the model with a stand-in runtime.
    model, x = tiny_denoiser("wan_i2v")  # 2 items, 2 latent frames, 32 x 32 px, 512 text and 5 image tokens
    latent = ("batch", 4, "latent_frames", "2*height", "2*width")
    specs = [TensorSpec("hidden_states", latent, torch.float32), TensorSpec("timestep", ("batch",), torch.float32),
             TensorSpec("encoder_hidden_states", ("batch", 512, 16), torch.float32),
             TensorSpec("encoder_hidden_states_image", ("batch", "image_tokens", 8), torch.float32)]
    meta = {"version": "0", "class": "WanTransformer3DModel", "architecture": "wan", "config": dict(model.config),
            "inputs": [s.name for s in specs], "output": "noise_pred", "dtype": torch.float32,
            "ranges": {"batch": (1, 2), "height": (16, 64), "width": (16, 64), "frames": (1, 9)},
            "symbols": {"batch": (1, 2), "latent_frames": (1, 3), "height": (1, 4), "width": (1, 4),
                        "image_tokens": (1, None)}}
    runtime = _TorchRuntime(meta, specs, TensorSpec("noise_pred", latent, torch.float32), model)
    with torch.no_grad():
        ref = model(**x, return_dict=False)[0]
        assert torch.equal(runtime(**x).sample, ref)
    one = {**x, "encoder_hidden_states": x["encoder_hidden_states"][:1],
           "encoder_hidden_states_image": x["encoder_hidden_states_image"][:1]}  # one prompt and image, 2 latents
    with torch.no_grad():  # broadcast by the model, expanded by the mapping: the same up to the order of sums
        assert _rel(runtime(**one).sample, model(**one, return_dict=False)[0]) < REL_TOL
    with pytest.raises(ValueError, match=r"'batch' is 2 .* but 1 in encoder_hidden_states_image"):
        runtime(**{**x, "encoder_hidden_states_image": x["encoder_hidden_states_image"][:1]})
    with pytest.raises(ValueError, match=r"exactly 512 text tokens .* shape \(2, 77, 16\): pad the prompt"):
        runtime(**{**x, "encoder_hidden_states": x["encoder_hidden_states"][:, :77]})
    with pytest.raises(ValueError, match=r"encoder_hidden_states_image is required: .*image-to-video"):
        runtime(**{**x, "encoder_hidden_states_image": None})
    with pytest.raises(ValueError, match=r"image_tokens is 0 \(encoder_hidden_states_image dimension 1\); this graph "
                                         r"takes 1 and up"):
        runtime(**{**x, "encoder_hidden_states_image": x["encoder_hidden_states_image"][:, :0]})


# --------------------------------------------------------------------------------------------
# What pipelines read from the module
# --------------------------------------------------------------------------------------------


def test_module_stands_in_for_the_model(cases):
    flux, sdxl = cases("flux"), cases("sdxl")
    ort = flux.ort
    assert ort.config.in_channels == flux.model.config.in_channels == ort.config["in_channels"]
    assert ort.config.guidance_embeds is False and ort.config._class_name == "FluxTransformer2DModel"
    assert type(ort.config).__name__ == "FrozenDict"
    assert ort.dtype == torch.float32 and ort.device == torch.device("cpu")
    assert ort.metadata == read_metadata(flux.path)  # parsed from the session: the same as from the file
    assert list(ort.parameters()) == [] and ort.session.get_providers() == ["CPUExecutionProvider"]
    with ort.cache_context("cond"):
        pass
    assert ort.to("cpu") is ort and ort.to(torch.float32) is ort and ort.cpu() is ort and ort.float() is ort
    with pytest.raises(ValueError, match="runs on cpu, fixed when it was loaded"):
        ort.to("meta")
    with pytest.raises(ValueError, match=r"exported in torch.float32.*dtype=torch.float16"):
        ort.half()
    assert not hasattr(ort, "_hf_hook")
    with pytest.raises(AttributeError, match="'encoder_hid_proj'.*exported FluxTransformer2DModel graph"):
        ort.encoder_hid_proj  # noqa: B018
    assert sdxl.ort.add_embedding.linear_1.in_features == sdxl.model.add_embedding.linear_1.in_features
    assert not hasattr(ort, "add_embedding")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_load_errors(cases, tmp_path, monkeypatch):
    flux = cases("flux")
    with pytest.raises(FileNotFoundError, match="no ONNX file at .*to_onnx"):
        OnnxRuntimeDenoiser.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01not a model")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        OnnxRuntimeDenoiser.load(tmp_path / "junk.onnx")
    bare = onnx.load(str(flux.path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="bare.onnx has no fastgen metadata"):
        OnnxRuntimeDenoiser.load(tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match=r"providers \['NoSuchExecutionProvider'\] are not available.*CPUExecution"):
        OnnxRuntimeDenoiser.load(flux.path, providers=["CPUExecutionProvider", "NoSuchExecutionProvider"])
    assert OnnxRuntimeDenoiser.load(flux.path, providers="CPUExecutionProvider").device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"providers \['NoSuchExecutionProvider'\] are not available"):
        OnnxRuntimeDenoiser.load(flux.path, providers="NoSuchExecutionProvider")
    shutil.copy(flux.path, tmp_path / "copy.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install fastgen\[onnx\]"):
        OnnxRuntimeDenoiser.load(tmp_path / "copy.onnx")


def _rewritten(source, path, props=None, weights_as_inputs=False, graph=None):
    model = onnx.load(str(source))
    if weights_as_inputs:  # what to_onnx writes for a model on the meta device: the module's weights as inputs
        weights = [t for t in model.graph.initializer if t.name.startswith("model.")]
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights)
        kept = [t for t in model.graph.initializer if not t.name.startswith("model.")]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    if graph is not None:
        model.graph.CopyFrom(graph)
        del model.opset_import[:]
        model.opset_import.append(onnx.helper.make_opsetid("", 17))
    for p in model.metadata_props:
        p.value = (props or {}).pop(p.key, p.value)
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in (props or {}).items())
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("key", [{"fastgen.weights": "false"}, {}], ids=["weights-false", "before-the-key"])
def test_meta_device_export_is_refused(cases, tmp_path, key):
    path = _rewritten(cases("flux").path, tmp_path / "meta.onnx", dict(key), weights_as_inputs=True)
    with pytest.raises(ValueError, match="exported from the meta device: its weights are graph inputs .* export the "
                                         "model with its weights"):
        OnnxRuntimeDenoiser.load(path)


def test_bfloat16_on_the_cpu_provider_is_refused(cases, tmp_path):
    # onnxruntime's CPU provider has no bfloat16 MatMul: it fails building the session (a bfloat16
    # MatMul graph with fastgen's metadata), or on the first call; refused at load either way.
    h = onnx.helper
    bf16 = onnx.TensorProto.BFLOAT16
    graph = h.make_graph([h.make_node("MatMul", ["a", "b"], ["noise_pred"])], "g",
                         [h.make_tensor_value_info(n, bf16, [2, 2]) for n in ("a", "b")],
                         [h.make_tensor_value_info("noise_pred", bf16, [2, 2])])
    match = "this graph is bfloat16, and onnxruntime's CPUExecutionProvider has no bfloat16 kernels"
    path = _rewritten(cases("flux").path, tmp_path / "matmul.onnx", {"fastgen.dtype": "bfloat16"}, graph=graph)
    with pytest.raises(ValueError, match=match):
        OnnxRuntimeDenoiser.load(path)
    path = _rewritten(cases("flux").path, tmp_path / "bf16.onnx", {"fastgen.dtype": "bfloat16"})
    with pytest.raises(ValueError, match=match):
        OnnxRuntimeDenoiser.load(path, providers=["CPUExecutionProvider"])


def test_output_dimensions(cases):
    # torch.onnx writes derived dimensions as arithmetic on symbols (HunyuanVideo's output channels
    # come out as "((4*batch)//batch)"): evaluated for each call. Anything else is refused.
    graph = cases("flux").ort
    specs = list(graph.inputs.values())
    out = TensorSpec("noise_pred", ("batch", "image_tokens", "((16*batch)//batch)"), torch.float32)
    assert ExportedDenoiser(graph.metadata, specs, out, "cpu").output_shape(_flux_inputs(batch=2)) == (2, 24, 16)
    for dim in ("Max(1, batch)", "2*frames", None):  # a function, a symbol no input has, an unnamed dimension
        out = TensorSpec("noise_pred", ("batch", dim, 16), torch.float32)
        with pytest.raises(ValueError, match=r"output noise_pred .* has dimensions .* that no input determines"):
            ExportedDenoiser(graph.metadata, specs, out, "cpu")


def test_architecture_without_a_mapping(cases):
    graph = cases("flux").ort
    specs = list(graph.inputs.values())
    meta = {**graph.metadata, "architecture": "lumina", "class": "Lumina2Transformer2DModel"}
    with pytest.raises(ValueError, match="exported denoisers run flux, unet, sd3, wan, hunyuan graphs; this one is "
                                         "'lumina'"):
        ExportedDenoiser(meta, specs, graph.output, "cpu")


@pytest.mark.parametrize("family, change, error, match", [
    ("flux", dict(encoder_hidden_states=torch.zeros(3, 5, 128)), ValueError,
     r"'batch' is 2 in hidden_states dimension 0 \('batch'\) but 3 in encoder_hidden_states dimension 0"),
    ("flux", dict(batch=3), ValueError,
     r"batch is 3 \(hidden_states dimension 0\); this graph was exported for 1 to 2: export again with a wider range "
     r"\(to_onnx batch=\)"),
    ("flux", dict(batch=0), ValueError, r"batch is 0 \(hidden_states dimension 0\): the batch must be positive"),
    ("flux", dict(rows=7, cols=6), ValueError, r"number of image tokens is 42 \(height/16 \* width/16\); this graph "
                                               r"was exported for 4 to 36 \(height 32 to 96 px, width 32 to 96 px\)"),
    ("flux", dict(encoder_hidden_states=torch.zeros(2, 5, 64)), ValueError, r"dimension 2 must be 128"),
    ("flux", dict(hidden_states=torch.zeros(2, 24)), ValueError, r"hidden_states has shape \(2, 24\); the graph takes"),
    ("flux", dict(timestep=torch.zeros(3)), ValueError, r"timestep must be .* shape \[\] / \[1\] / \[2\]"),
    ("flux", dict(txt_ids=None), ValueError, "txt_ids required"),
    ("flux", dict(guidance=torch.ones(2)), ValueError, "no guidance embedding"),
    ("flux", dict(joint_attention_kwargs={"scale": 0.5}), NotImplementedError,
     r"joint_attention_kwargs=\{'scale': 0.5\} is not supported.*fuse a LoRA"),
    ("flux", dict(controlnet_block_samples=[torch.zeros(2, 24, 32)]), NotImplementedError, "controlnet_block_samples"),
    ("sdxl", dict(w=5), ValueError, r"dimension 3 \('2\*width'\) must be a multiple of 2"),
    ("sdxl", dict(cross_attention_kwargs={"scale": 0.7}), NotImplementedError, "cross_attention_kwargs"),
    ("sdxl", dict(timestep_cond=torch.zeros(2, 8)), NotImplementedError, "timestep_cond"),
    ("sdxl", dict(down_block_additional_residuals=(torch.zeros(1),)), NotImplementedError,
     "down_block_additional_residuals .* ControlNet"),
    ("sdxl", dict(encoder_attention_mask=torch.ones(2, 5)), NotImplementedError, "encoder_attention_mask"),
    ("sdxl", dict(added_cond_kwargs=None), ValueError, "must hold text_embeds and time_ids .* missing text_embeds"),
    ("sdxl", dict(added_cond_kwargs={"text_embeds": torch.zeros(2, 64), "time_ids": torch.zeros(2, 6),
                                     "image_embeds": torch.zeros(2, 4)}), NotImplementedError,
     r"added_cond_kwargs \['image_embeds'\]"),
    ("sd3", dict(h=14), ValueError, r"height is 112 px \(hidden_states dimension 2: 14 latent pixels\); this graph was "
                                    r"exported for 32 to 96 px: export again with a wider range \(to_onnx height=\)"),
    ("sd3", dict(w=1), ValueError, r"dimension 3 \('2\*width'\) must be a multiple of 2"),
    ("sd3", dict(skip_layers=[0]), NotImplementedError, r"skip_layers is not supported .* skip_guidance_layers"),
    ("sd3", dict(block_controlnet_hidden_states=[torch.zeros(2, 15, 32)]), NotImplementedError,
     "block_controlnet_hidden_states .* ControlNet"),
    ("sd3", dict(joint_attention_kwargs={"ip_adapter_image_embeds": torch.zeros(1)}), NotImplementedError,
     r"joint_attention_kwargs=\{'ip_adapter_image_embeds'.* IP-Adapter"),
    ("sd3", dict(pooled_projections=None), ValueError, "pooled_projections required"),
    ("wan", dict(f=4), ValueError,
     r"number of latent frames is 4 \(hidden_states dimension 2\); this graph was exported for 1 to 3 \(1 to 9 video "
     r"frames\): export again .*to_onnx frames="),
    ("wan", dict(w=14), ValueError, r"width is 112 px \(hidden_states dimension 4: 14 latent pixels\)"),
    ("wan", dict(attention_kwargs={"scale": 0.5}), NotImplementedError, r"attention_kwargs=\{'scale': 0.5\}"),
    ("wan", dict(encoder_hidden_states_image=torch.zeros(2, 5, 8)), ValueError,
     "encoder_hidden_states_image given, but .* text-to-video"),
    # Wan 2.2's per-token timesteps [B, S]: the graph takes one per item
    ("wan", dict(timestep=torch.zeros(2, 24)), ValueError, r"timestep must be .* got shape \(2, 24\)"),
    ("wan", dict(text=0), ValueError, r"text_tokens is 0 \(encoder_hidden_states dimension 1\); this graph takes 1 and "
                                      r"up"),
    ("hunyuan", dict(encoder_attention_mask=None), ValueError, "encoder_attention_mask required"),
    ("hunyuan", dict(encoder_attention_mask=torch.ones(2, 7)), ValueError,
     r"'text_tokens' is 6 in encoder_hidden_states dimension 1 .* but 7 in encoder_attention_mask dimension 1"),
    ("hunyuan", dict(guidance=None), ValueError, r"guidance is required: .*guidance-distilled"),
    ("hunyuan", dict(attention_kwargs={"scale": 0.5}), NotImplementedError, "attention_kwargs"),
    ("hunyuan", dict(batch=3), ValueError, r"batch is 3 .* exported for 1 to 2"),
], ids=["flux-batch-mismatch", "flux-batch-range", "flux-batch-0", "flux-tokens-range", "flux-static-dim", "flux-rank",
        "flux-timestep-shape", "flux-missing", "flux-guidance", "flux-lora", "flux-controlnet", "sdxl-multiple",
        "sdxl-lora", "sdxl-timestep-cond", "sdxl-controlnet", "sdxl-mask", "sdxl-added-missing", "sdxl-ip-adapter",
        "sd3-height-range", "sd3-multiple", "sd3-skip-layers", "sd3-controlnet", "sd3-ip-adapter", "sd3-missing",
        "wan-frames-range", "wan-width-range", "wan-lora", "wan-image-to-t2v", "wan-2.2-timesteps", "wan-no-text",
        "hunyuan-missing-mask", "hunyuan-mask-length", "hunyuan-guidance", "hunyuan-lora", "hunyuan-batch-range"])
def test_bad_calls(cases, family, change, error, match):
    module = cases(family).ort
    change = dict(change)
    sizes = {k: change.pop(k) for k in ("batch", "rows", "cols", "f", "h", "w", "text") if k in change}
    with pytest.raises(error, match=match):
        module(**{**INPUTS[family](**sizes), **change})
