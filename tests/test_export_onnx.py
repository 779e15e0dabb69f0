"""``fastgen.export.onnx.to_onnx`` on tiny Flux and tiny UNet: the graph passes the full checker, its
batch / spatial / token inputs are symbolic, onnxruntime matches PyTorch at shapes other than the
export's example (odd batches, non-square sizes, other text lengths), bad input is a ValueError.

Tolerance: fp32 onnxruntime and PyTorch differ only in the order of their sums (matmul / conv
kernels, fused softmax), ~1e-6 of the output's scale here; 1e-4 of the largest |output| leaves
100x margin while a graph that mis-handles a dynamic dimension (wrong positions, a baked-in size)
is off by O(1) or fails to run.
"""

from __future__ import annotations

import logging

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastgen.export import onnx as fx  # noqa: E402
from fastgen.models import tiny_denoiser  # noqa: E402

REL_TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _quiet_exporter():
    # torch.onnx logs a warning per missing torchvision op: noise in a test run
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def flux(tmp_path_factory, _quiet_exporter):
    model, _ = tiny_denoiser("flux")
    path = tmp_path_factory.mktemp("flux") / "flux.onnx"
    report = fx.to_onnx(model, path, batch=(1, 4), height=(32, 128), width=(32, 96))
    return model, report


@pytest.fixture(scope="module")
def unet(tmp_path_factory, _quiet_exporter):
    model, _ = tiny_denoiser("unet")
    path = tmp_path_factory.mktemp("unet") / "unet.onnx"
    # A 2 GiB limit of 0 sends the tiny weights to external data: the >2 GB path, tested small.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fx, "_PROTO_LIMIT", 0)
        report = fx.to_onnx(model, path)  # no ranges: every batch and size the model accepts
    return model, report


def _ort_vs_torch(report, model, arch, b, hu, wu, t):
    x = arch.tensors(b, hu, wu, t, torch.float32, "cpu")
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(["noise_pred"], {k: v.numpy() for k, v in x.items()})[0])
    with torch.no_grad():
        ref = arch.wrapper(model)(**x)
    assert got.shape == ref.shape
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _assert_validated(report):
    assert len(report.checks) == 3
    assert any(c.batch % 2 == 1 and c.batch > 1 for c in report.checks)  # an odd batch
    assert any(c.height != c.width for c in report.checks)  # a non-square size
    assert all(c.text_tokens != 7 for c in report.checks)  # not the export example's text length
    for c in report.checks:
        assert c.max_rel_diff < REL_TOL, c


def test_flux_export_with_ranges(flux):
    model, report = flux
    onnx.checker.check_model(str(report.path), full_check=True)
    assert not report.external_data and not report.path.with_name(report.path.name + ".data").exists()
    assert report.architecture == "flux" and report.opset == 20
    assert report.ranges == {"batch": (1, 4), "height": (32, 128), "width": (32, 96)}
    assert report.inputs["hidden_states"] == ("batch", "image_tokens", 4)
    assert report.inputs["img_ids"] == ("image_tokens", 3)
    assert report.inputs["encoder_hidden_states"] == ("batch", "text_tokens", 32)
    assert report.inputs["timestep"] == ("batch",)
    assert report.outputs == {"noise_pred": ("batch", "image_tokens", 4)}
    assert report.file_bytes == report.path.stat().st_size and report.export_seconds > 0
    _assert_validated(report)
    for c in report.checks:
        assert 1 <= c.batch <= 4 and 32 <= c.height <= 128 and 32 <= c.width <= 96
    # another shape, checked here rather than by the report: batch 4, 96 x 48 px, 13 text tokens
    assert _ort_vs_torch(report, model, fx._Flux(model), 4, 6, 3, 13) < REL_TOL


def test_unet_export_unbounded_external_data(unet):
    model, report = unet
    onnx.checker.check_model(str(report.path), full_check=True)
    assert report.external_data and report.path.with_name(report.path.name + ".data").exists()
    assert report.file_bytes > report.path.stat().st_size
    # the tiny UNet downsamples once: latent sides are 2 * Dim, pixel sizes multiples of 16
    assert report.inputs["sample"] == ("batch", 4, "2*height", "2*width")
    assert report.inputs["encoder_hidden_states"] == ("batch", "text_tokens", 32)
    assert report.outputs == {"noise_pred": ("batch", 4, "2*height", "2*width")}
    assert report.ranges == {"batch": (1, 63), "height": (16, None), "width": (16, None)}
    _assert_validated(report)
    # far from the example (2 x 4 x 6 x 10): batch 6, latent 28 x 4
    assert _ort_vs_torch(report, model, fx._UNet(model), 6, 14, 2, 2) < REL_TOL


def test_onnx_graph_dims_are_symbolic(flux, unet):
    for _, report in (flux, unet):
        graph = onnx.load(str(report.path), load_external_data=False).graph
        first = graph.input[0].type.tensor_type.shape.dim
        assert first[0].dim_param == "batch" and first[0].dim_value == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=(40, 64)), "multiples of 16"),
    (dict(width=(64, 32)), "min <= max"),
    (dict(batch=(0, 4)), "positive"),
    (dict(height=(32.0, 64)), "whole numbers"),
    (dict(height="big"), "None, an int or a"),
    (dict(frames=(1, 9)), "video models"),
    (dict(dtype=torch.bfloat16), "validate=False"),
    (dict(dtype=torch.int32), "floating"),
    (dict(opset=13), "opset"),
])
def test_bad_arguments_raise(tmp_path, kwargs, match):
    model, _ = tiny_denoiser("flux")
    with pytest.raises(ValueError, match=match):
        fx.to_onnx(model, tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()


def test_unsupported_models_raise(tmp_path):
    with pytest.raises(ValueError, match="FluxTransformer2DModel, UNet2DConditionModel; got Linear"):
        fx.to_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="pipeline"):
        fx.to_onnx(object(), tmp_path / "m.onnx")
    unet, _ = tiny_denoiser("unet")
    with pytest.raises(ValueError, match="batch max 64 items exceeds"):
        fx.to_onnx(unet, tmp_path / "m.onnx", batch=(1, 64))
    sd3, _ = tiny_denoiser("sd3")
    with pytest.raises(ValueError, match="got SD3Transformer2DModel"):
        fx.to_onnx(sd3, tmp_path / "m.onnx")
