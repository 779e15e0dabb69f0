"""``fastgen.export.runtime``: an exported denoiser run by onnxruntime inside its diffusers pipeline
(tiny Flux, SD 1.5, SDXL) gives PyTorch's image; the call mapping alone (a pure-PyTorch stand-in
runtime) gives it bit for bit; deliberate mapping errors are caught; bad input raises clearly.

Tolerance: fp32 onnxruntime and PyTorch differ only in the order of their sums, ~1e-6 of a
forward's scale; 4 Euler steps carry that forward (each step adds its own and moves the earlier
ones by about the step's Jacobian, O(1) here) and the VAE decode is the same PyTorch in both runs.
Measured: <= 3e-6 on the [0, 1] images. ``IMAGE_TOL`` = 1e-4 leaves 30x margin, while the mapping
errors in ``test_mapping_errors_change_the_image`` (a timestep off by 1000x, CFG halves swapped,
image positions transposed) move the images by 1.5e-2 or more (measured), 150x above it.
Forward-level comparisons use 1e-4 of the largest |output|, as tests/test_export_onnx.py does.
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

from fastgen.export import ExportedDenoiser, OnnxRuntimeDenoiser, read_metadata, to_onnx  # noqa: E402
from fastgen.export.onnx import _ARCHES  # noqa: E402
from fastgen.models import build_pipeline  # noqa: E402

IMAGE_TOL = 1e-4
REL_TOL = 1e-4
STEPS = 4
# Export ranges: batch 2 is SD's CFG batch; the tiny pipelines run at 64 px.
RANGES = {"flux": dict(batch=(1, 2), height=(32, 96), width=(32, 96)),
          "sd15": dict(batch=(1, 2), height=(32, 96), width=(32, 96)),
          "sdxl": dict(batch=(1, 2))}


@pytest.fixture(autouse=True, scope="module")
def _quiet_exporter():
    # torch.onnx logs a warning per missing torchvision op: noise in a test run
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


class Case:
    """A tiny pipeline, its PyTorch denoiser, the exported graph, and PyTorch's image."""

    def __init__(self, family, tmp):
        self.family = family
        self.pipe, self.call = build_pipeline(family, "tiny")
        self.pipe.set_progress_bar_config(disable=True)
        self.attr = "transformer" if family == "flux" else "unet"
        self.model = getattr(self.pipe, self.attr)
        self.path = tmp / f"{family}.onnx"
        to_onnx(self.model, self.path, validate=False, **RANGES[family])
        self.reference = self.image(self.model)

    def image(self, denoiser) -> torch.Tensor:
        setattr(self.pipe, self.attr, denoiser)
        try:
            return self.pipe(**self.call, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                             output_type="pt").images
        finally:
            setattr(self.pipe, self.attr, self.model)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, _quiet_exporter):
    tmp = tmp_path_factory.mktemp("runtime")
    return {family: Case(family, tmp) for family in RANGES}


@pytest.fixture(scope="module")
def flux(cases):
    return cases["flux"]


@pytest.fixture(scope="module")
def sd15(cases):
    return cases["sd15"]


@pytest.fixture(scope="module")
def sdxl(cases):
    return cases["sdxl"]


# --------------------------------------------------------------------------------------------
# Whole pipelines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(RANGES))
def test_pipeline_on_onnxruntime_matches_pytorch(cases, family):
    case = cases[family]
    got = case.image(OnnxRuntimeDenoiser.load(case.path))
    assert got.shape == case.reference.shape == (1, 3, 64, 64)
    assert (got - case.reference).abs().max().item() < IMAGE_TOL


class _TorchRuntime(ExportedDenoiser):
    """A stand-in runtime: the graph's inputs by name into the PyTorch model, through the same
    wrapper the export traced. Its images must equal PyTorch's exactly: the mapping adds no error."""

    def __init__(self, case):
        graph = OnnxRuntimeDenoiser.load(case.path)
        super().__init__(graph.metadata, list(graph.inputs.values()), graph.output, "cpu")
        self.wrapper = _ARCHES[type(case.model).__name__](case.model).wrapper(case.model)

    def _run(self, feed):
        out = self.wrapper(**feed)
        assert out.shape == self.output_shape(feed)
        return out


@pytest.mark.parametrize("family", list(RANGES))
def test_call_mapping_is_exact(cases, family):
    case = cases[family]
    assert torch.equal(case.image(_TorchRuntime(case)), case.reference)


def _flip(t):  # the CFG batch's halves swapped
    return torch.cat(t.chunk(2)[::-1])


@pytest.mark.parametrize("family, mistake", [
    ("flux", lambda f: {**f, "timestep": f["timestep"] * 1000}),  # t, not t / 1000
    ("flux", lambda f: {**f, "img_ids": f["img_ids"][:, [0, 2, 1]]}),  # rows and columns transposed
    ("sd15", lambda f: {**f, "encoder_hidden_states": _flip(f["encoder_hidden_states"])}),
    ("sd15", lambda f: {**f, "timestep": f["timestep"] / 1000}),
    ("sdxl", lambda f: {**f, "text_embeds": _flip(f["text_embeds"])}),
], ids=["flux-timestep", "flux-ids", "sd15-cfg", "sd15-timestep", "sdxl-pooled-cfg"])
def test_mapping_errors_change_the_image(cases, family, mistake):
    # The tolerance above has to catch a wrong mapping, or the pipeline tests prove nothing.
    class Mistaken(OnnxRuntimeDenoiser):
        def _run(self, feed):
            return super()._run({k: v.contiguous() for k, v in mistake(feed).items()})

    case = cases[family]
    assert (case.image(Mistaken.load(case.path)) - case.reference).abs().max().item() > 100 * IMAGE_TOL


# --------------------------------------------------------------------------------------------
# One forward: the diffusers call forms
# --------------------------------------------------------------------------------------------


def _rel(got, ref) -> float:
    assert got.shape == ref.shape
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _flux_inputs(batch=2, rows=6, cols=4, text=5):
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(rows * cols, 3)
    ids[:, 1], ids[:, 2] = torch.arange(rows * cols) // cols, torch.arange(rows * cols) % cols
    return dict(hidden_states=torch.randn(batch, rows * cols, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 128, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.linspace(0.7, 0.2, batch),
                img_ids=ids, txt_ids=torch.zeros(text, 3))


def _unet_inputs(case, batch=2, h=6, w=4, text=5, timestep=381.5):
    g = torch.Generator().manual_seed(4)
    x = dict(sample=torch.randn(batch, 4, h, w, generator=g), timestep=timestep,
             encoder_hidden_states=torch.randn(batch, text, 128, generator=g))
    if case.family == "sdxl":
        x["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 64, generator=g),
                                      time_ids=torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]] * batch))
    return x


def test_flux_forward_call_forms(flux):
    ort = OnnxRuntimeDenoiser.load(flux.path)
    x = _flux_inputs()  # 2 items, a 96 x 64 px grid (24 tokens), 5 text tokens
    with torch.no_grad():
        ref = flux.model(**x).sample
    out = ort(**x)
    assert type(out).__name__ == "Transformer2DModelOutput" and _rel(out.sample, ref) < REL_TOL
    # positional, return_dict=False, a shared scalar timestep, 3-D ids (older diffusers)
    same_t = {**x, "timestep": torch.tensor([0.7, 0.7])}
    with torch.no_grad():
        ref_t = flux.model(**same_t, return_dict=False)[0]
    args = [x[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections")]
    out = ort(*args, timestep=0.7, img_ids=x["img_ids"][None].expand(2, -1, -1),
              txt_ids=x["txt_ids"][None].expand(2, -1, -1), joint_attention_kwargs={}, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and _rel(out[0], ref_t) < REL_TOL
    # inputs in another dtype are cast to the graph's; a view at an offset binds at its own address
    padded = torch.cat([torch.full((1, 24, 16), float("nan")), x["hidden_states"]])
    out = ort(**{**x, "hidden_states": padded[1:], "pooled_projections": x["pooled_projections"].double(),
                 "timestep": x["timestep"].double()})
    assert out.sample.dtype == torch.float32 and _rel(out.sample, ref) < REL_TOL


@pytest.mark.parametrize("timestep, value", [
    (381.5, 381.5), (381, 381.0), (torch.tensor(381.5), 381.5), (torch.tensor([381.5]), 381.5),
    (torch.tensor([381.5, 381.5]), 381.5), (torch.tensor(381), 381.0)],
    ids=["float", "int", "0-d", "[1]", "[B]", "int64"])
def test_unet_timestep_forms(sd15, timestep, value):
    ort = OnnxRuntimeDenoiser.load(sd15.path)
    with torch.no_grad():
        ref = sd15.model(**_unet_inputs(sd15, timestep=torch.tensor([value, value])), return_dict=False)[0]
    out = ort(**_unet_inputs(sd15, timestep=timestep))  # latent 6 x 4: 48 x 32 px
    assert type(out).__name__ == "UNet2DConditionOutput" and _rel(out.sample, ref) < REL_TOL


def test_sdxl_forward(sdxl):
    ort = OnnxRuntimeDenoiser.load(sdxl.path)
    x = _unet_inputs(sdxl, h=10, w=4, timestep=torch.tensor([700.0, 20.0]))  # 80 x 32 px
    with torch.no_grad():
        ref = sdxl.model(**x).sample
    assert _rel(ort(**x).sample, ref) < REL_TOL
    # exported with no size ranges: any size the model takes, here 320 x 320 px
    x = _unet_inputs(sdxl, batch=1, h=40, w=40)
    with torch.no_grad():
        ref = sdxl.model(**x).sample
    assert _rel(ort(**x).sample, ref) < REL_TOL


# --------------------------------------------------------------------------------------------
# What pipelines read from the module
# --------------------------------------------------------------------------------------------


def test_module_stands_in_for_the_model(flux, sdxl):
    ort = OnnxRuntimeDenoiser.load(flux.path)
    assert ort.config.in_channels == flux.model.config.in_channels == ort.config["in_channels"]
    assert ort.config.guidance_embeds is False and ort.config._class_name == "FluxTransformer2DModel"
    assert type(ort.config).__name__ == "FrozenDict"
    assert ort.dtype == torch.float32 and ort.device == torch.device("cpu")
    assert ort.metadata == read_metadata(flux.path)
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
    xl = OnnxRuntimeDenoiser.load(sdxl.path)
    assert xl.add_embedding.linear_1.in_features == sdxl.model.add_embedding.linear_1.in_features
    assert not hasattr(OnnxRuntimeDenoiser.load(flux.path), "add_embedding")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_load_errors(flux, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no ONNX file at .*to_onnx"):
        OnnxRuntimeDenoiser.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01not a model")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        OnnxRuntimeDenoiser.load(tmp_path / "junk.onnx")
    bare = onnx.load(str(flux.path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="no fastgen metadata"):
        OnnxRuntimeDenoiser.load(tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match=r"providers \['NoSuchExecutionProvider'\] are not available.*CPUExecution"):
        OnnxRuntimeDenoiser.load(flux.path, providers=["CPUExecutionProvider", "NoSuchExecutionProvider"])
    shutil.copy(flux.path, tmp_path / "copy.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install fastgen\[onnx\]"):
        OnnxRuntimeDenoiser.load(tmp_path / "copy.onnx")


def test_architecture_without_a_mapping(flux):
    graph = OnnxRuntimeDenoiser.load(flux.path)
    meta = {**graph.metadata, "architecture": "sd3", "class": "SD3Transformer2DModel"}
    with pytest.raises(ValueError, match="exported denoisers run flux, unet graphs; this one is 'sd3'"):
        ExportedDenoiser(meta, list(graph.inputs.values()), graph.output, "cpu")


@pytest.mark.parametrize("change, error, match", [
    (dict(encoder_hidden_states=torch.zeros(3, 5, 128)), ValueError,
     r"'batch' is 2 in hidden_states dimension 0 \('batch'\) but 3 in encoder_hidden_states dimension 0"),
    (dict(batch=3), ValueError, r"batch is 3; this graph was exported for 1 to 2"),
    (dict(rows=7, cols=6), ValueError, r"number of image tokens is 42 \(height/16 \* width/16\); this graph was "
                                       r"exported for 4 to 36 \(height 32 to 96 px, width 32 to 96 px\)"),
    (dict(encoder_hidden_states=torch.zeros(2, 5, 64)), ValueError, r"dimension 2 must be 128"),
    (dict(hidden_states=torch.zeros(2, 24)), ValueError, r"hidden_states has shape \(2, 24\); the graph takes"),
    (dict(timestep=torch.zeros(3)), ValueError, r"timestep must be .* shape \[\] / \[1\] / \[2\]"),
    (dict(txt_ids=None), ValueError, "txt_ids required"),
    (dict(guidance=torch.ones(2)), ValueError, "no guidance embedding"),
    (dict(joint_attention_kwargs={"scale": 0.5}), NotImplementedError,
     r"joint_attention_kwargs=\{'scale': 0.5\} is not supported.*fuse a LoRA"),
    (dict(controlnet_block_samples=[torch.zeros(2, 24, 32)]), NotImplementedError, "controlnet_block_samples"),
], ids=["batch-mismatch", "batch-range", "tokens-range", "static-dim", "rank", "timestep-shape", "missing",
        "guidance", "lora", "controlnet"])
def test_flux_bad_calls(flux, change, error, match):
    ort = OnnxRuntimeDenoiser.load(flux.path)
    change = dict(change)
    sizes = {k: change.pop(k) for k in ("batch", "rows", "cols") if k in change}
    with pytest.raises(error, match=match):
        ort(**{**_flux_inputs(**sizes), **change})


@pytest.mark.parametrize("family, change, error, match", [
    ("sd15", dict(h=14), ValueError, r"height is 112 px \(sample dimension 2: 14 latent pixels x 8\); this graph "
                                     r"was exported for 32 to 96 px"),
    ("sd15", dict(w=5), ValueError, r"dimension 3 \('2\*width'\) must be a multiple of 2"),
    ("sd15", dict(cross_attention_kwargs={"scale": 0.7}), NotImplementedError, "cross_attention_kwargs"),
    ("sd15", dict(timestep_cond=torch.zeros(2, 8)), NotImplementedError, "timestep_cond"),
    ("sd15", dict(down_block_additional_residuals=(torch.zeros(1),)), NotImplementedError,
     "down_block_additional_residuals .* ControlNet"),
    ("sd15", dict(encoder_attention_mask=torch.ones(2, 5)), NotImplementedError, "encoder_attention_mask"),
    ("sd15", dict(added_cond_kwargs={"image_embeds": torch.zeros(2, 4)}), NotImplementedError,
     r"added_cond_kwargs \['image_embeds'\]"),
    ("sdxl", dict(added_cond_kwargs=None), ValueError, "must hold text_embeds and time_ids .* missing text_embeds"),
], ids=["height-range", "multiple", "lora", "timestep-cond", "controlnet", "mask", "ip-adapter", "sdxl-added"])
def test_unet_bad_calls(cases, family, change, error, match):
    case = cases[family]
    ort = OnnxRuntimeDenoiser.load(case.path)
    change = dict(change)
    sizes = {k: change.pop(k) for k in ("h", "w", "batch") if k in change}
    with pytest.raises(error, match=match):
        ort(**{**_unet_inputs(case, **sizes), **change})
