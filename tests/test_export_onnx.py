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
    # At opset 20 a target changes no node (no fused forms below 23): the graph is the untargeted one,
    # checked against tensorrt-10.1's operators as well; test_target_picks_operator_forms reads it for
    # that target instead of exporting Flux once more (~10 s of CI's time).
    report = fx.to_onnx(model, path, batch=(1, 4), height=(32, 128), width=(32, 96), target="tensorrt-10.1")
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
    with pytest.raises(ValueError, match="FluxTransformer2DModel, UNet2DConditionModel, .*; got Linear"):
        fx.to_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="pipeline"):
        fx.to_onnx(object(), tmp_path / "m.onnx")
    unet, _ = tiny_denoiser("unet")
    with pytest.raises(ValueError, match="batch max 64 items exceeds"):
        fx.to_onnx(unet, tmp_path / "m.onnx", batch=(1, 64))
    framepack, _ = tiny_denoiser("framepack")
    with pytest.raises(ValueError, match="got HunyuanVideoFramepackTransformer3DModel"):
        fx.to_onnx(framepack, tmp_path / "m.onnx")
    sd3, _ = tiny_denoiser("sd3")  # pos_embed_max_size 32 patches of 8 px: 256 px at most
    with pytest.raises(ValueError, match=r"height max 264 pixels exceeds what the model accepts \(256 pixels\)"):
        fx.to_onnx(sd3, tmp_path / "m.onnx", height=(8, 264))
    wan, _ = tiny_denoiser("wan")
    for frames, match in [(4, "4k \\+ 1"), ((1, 10), "4k \\+ 1"), ((9, 5), "min <= max"), (129, "exceeds")]:
        with pytest.raises(ValueError, match=match):
            fx.to_onnx(wan, tmp_path / "m.onnx", frames=frames)
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------------------------
# SD3 / SD3.5 and the video models
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, _quiet_exporter):
    """name -> (model, report) of a tiny denoiser exported with batch (1, 5), once per module."""
    done = {}

    def get(name):
        if name not in done:
            model, _ = tiny_denoiser(name)
            done[name] = model, fx.to_onnx(model, tmp_path_factory.mktemp(name) / "m.onnx", batch=(1, 5))
        return done[name]

    return get


@pytest.mark.parametrize("name", ["sd35", "wan", "wan_i2v", "hunyuan"])
def test_sd3_and_video_exports_match_pytorch(exported, name):
    model, report = exported(name)
    onnx.checker.check_model(str(report.path), full_check=True)
    assert report.architecture == {"sd35": "sd3", "wan_i2v": "wan"}.get(name, name)
    assert len(report.checks) == 3 and any(c.batch == 3 for c in report.checks)
    assert any(c.height != c.width for c in report.checks)
    for c in report.checks:
        assert c.max_rel_diff < REL_TOL, c
    video = report.inputs["hidden_states"]
    if name == "sd35":  # patch 1: latent sides are the Dims themselves
        assert video == ("batch", 4, "height", "width") and report.ranges["height"] == (8, 256)
        assert "frames" not in report.ranges and all(c.frames is None for c in report.checks)
    else:
        assert video[:3] == ("batch", 4, "latent_frames")
        # frames 4k + 1: 5 frames = 2 latent frames; a single-frame video (an image) included
        assert sorted(c.frames for c in report.checks) == [1, 5, 9] and report.ranges["frames"][0] == 1
    if name == "wan_i2v":  # upstream splits its context at 512 text tokens: that length is fixed
        assert report.inputs["encoder_hidden_states"] == ("batch", 512, 16)
        assert report.inputs["encoder_hidden_states_image"] == ("batch", "image_tokens", 8)
        assert {c.text_tokens for c in report.checks} == {512}
    else:
        assert report.inputs["encoder_hidden_states"][:2] == ("batch", "text_tokens")


def test_hunyuan_mask_is_honoured(exported):
    # Padding tokens must not leak into the output: the graph's mask path, not only its shapes.
    model, report = exported("hunyuan")
    assert report.inputs["encoder_attention_mask"] == ("batch", "text_tokens")
    graph = onnx.load(str(report.path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    # onnxruntime has no boolean Where: the mask's masked_fill became logic ops
    assert not [n for n in graph.node if n.op_type == "Where" and types.get(n.output[0]) == onnx.TensorProto.BOOL]
    assert any(n.op_type == "Or" for n in graph.node)
    arch = fx._Hunyuan(model)
    x = arch.tensors(2, 2, 3, 6, torch.float32, "cpu", fu=2)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    run = lambda feed: sess.run(["noise_pred"], {k: v.numpy() for k, v in feed.items()})[0]  # noqa: E731
    masked = dict(x, encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]))
    changed = dict(masked, encoder_hidden_states=masked["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][0, 3:] += 10.0  # only masked tokens of item 0 change
    a, b = run(masked), run(changed)
    assert abs(a[0] - b[0]).max() < 1e-5 * abs(a).max()  # item 0 ignores its padding
    assert abs(a[1] - b[1]).max() == 0
    with torch.no_grad():
        ref = arch.wrapper(model)(**masked).numpy()
    assert abs(a - ref).max() < REL_TOL * abs(ref).max()


def test_sd3_crop_by_gather_equals_upstream():
    model, _ = tiny_denoiser("sd3")
    embed = model.pos_embed
    n = embed.pos_embed_max_size
    for h in range(1, n + 1, 3):
        for w in (1, 2, n - 1, n):
            assert torch.equal(fx._crop_by_gather(embed, h, w), embed.cropped_pos_embed(h, w))


# --------------------------------------------------------------------------------------------
# Targets: operator forms per runtime, checked before anything is built
# --------------------------------------------------------------------------------------------


def _op_types(path):
    model = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}


@pytest.mark.parametrize("target, opset, fused", [
    ("tensorrt-10.1", 20, set()),  # opset 20: MatMul-Softmax-MatMul, Pow/ReduceMean/Sqrt
    ("tensorrt-10.14", 23, {"Attention"}),  # Attention, but RMSNorm stays primitive
    ("onnxruntime", 23, {"Attention", "RMSNormalization"}),  # onnxruntime runs every fused form
])
def test_target_picks_operator_forms(tmp_path, flux, target, opset, fused):
    if target == "tensorrt-10.1":  # the module's Flux export is for this target
        report = flux[1]
    else:
        model, _ = tiny_denoiser("flux")  # RMS-normed q/k: where fused norms would appear
        report = fx.to_onnx(model, tmp_path / "m.onnx", batch=(1, 4), height=(16, 64), width=(16, 64), target=target,
                            opset=23 if target == "onnxruntime" else None, validate=target == "onnxruntime")
    assert (report.opset, report.target) == (opset, target)
    ops = _op_types(report.path)
    assert ops & {"Attention", "RMSNormalization"} == fused
    assert ("Softmax" in ops) == ("Attention" not in fused)
    for c in report.checks:
        assert c.max_rel_diff < REL_TOL, c


def test_target_errors(tmp_path):
    model, _ = tiny_denoiser("flux")
    with pytest.raises(ValueError, match="unknown export target 'tensorrt-9'"):
        fx.to_onnx(model, tmp_path / "m.onnx", target="tensorrt-9")
    with pytest.raises(ValueError, match="tensorrt-10.1 parses opsets 9 to 20, got opset=23"):
        fx.to_onnx(model, tmp_path / "m.onnx", target="tensorrt-10.1", opset=23)
    # A node the target refuses is named before any engine build: a fused Attention for 10.1.
    with pytest.MonkeyPatch.context() as mp:
        from fastgen.export import operators

        refusing = operators.Target("tensorrt-10.1", frozenset({"Gemm"}), 9, 20)
        mp.setattr(operators, "target", lambda name: refusing)
        with pytest.raises(ValueError, match=r"(?s)node\(s\) would fail on tensorrt-10.1:\n  .*: tensorrt-10.1 has no (MatMul|Mul|Add)"):
            fx.to_onnx(model, tmp_path / "m.onnx", target="tensorrt-10.1", validate=False)


# --------------------------------------------------------------------------------------------
# Patched models: fastgen's custom ops lowered to standard ONNX
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux"])  # attention and the fused prologue; the UNet has attention only
def test_patched_model_exports_standard_operators(tmp_path, name):
    import fastgen

    model, _ = tiny_denoiser(name)
    # the Triton paths (the interpreter here): the model runs fastgen::attention_triton and, in
    # Flux, fastgen::qk_norm_rope_triton; the graph must hold neither
    fastgen.patch(model, attention_backend="triton", prologue_backend="triton")
    arch = fx._ARCHES[type(model).__name__](model)
    x = arch.tensors(2, 3, 5, 7, torch.float32, "cpu")
    with torch.no_grad():
        graph = torch.export.export(arch.wrapper(model), (), kwargs=x, strict=False).graph
    assert any("fastgen" in str(n.target) for n in graph.nodes)  # what would need lowering
    report = fx.to_onnx(model, tmp_path / "m.onnx", batch=(1, 5), height=(16, 64), width=(16, 64))
    model_proto = onnx.load(str(report.path), load_external_data=False)
    assert {n.domain for n in model_proto.graph.node} <= {""} and not model_proto.functions
    for c in report.checks:  # compared with the patched model running its kernels
        assert c.max_rel_diff < REL_TOL, c
    assert fastgen.is_patched(model)  # export leaves the patch in place
    fastgen.patch(model, tome=0.5)
    with pytest.raises(ValueError, match="exact patches only.*tome=ToMeConfig"):
        fx.to_onnx(model, tmp_path / "n.onnx")


def test_metadata_round_trip(flux):
    model, report = flux
    meta = fx.read_metadata(report.path)
    assert meta["class"] == "FluxTransformer2DModel" and meta["architecture"] == "flux"
    assert meta["config"]["num_layers"] == model.config.num_layers
    assert meta["inputs"] == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                              "txt_ids"]
    assert meta["output"] == "noise_pred" and meta["dtype"] == torch.float32 and meta["weights"] is True
    assert meta["ranges"] == report.ranges
    # graph units: batch items, image tokens (the product of the side ranges in 16-px steps), text tokens
    assert meta["symbols"] == {"batch": (1, 4), "image_tokens": (2 * 2, 8 * 6), "text_tokens": (1, None)}


def test_read_metadata_refuses_foreign_files(tmp_path):
    from onnx import helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="no fastgen metadata"):
        fx.read_metadata(tmp_path / "other.onnx")


def test_portable_scope_runs_every_op_as_its_reference():
    # Every fastgen op that has a kernel, asked for it by name: outside portable() the custom ops
    # run (so this can fail), inside it none does, silently, and the results equal the kernels'.
    from torch.utils._python_dispatch import TorchDispatchMode

    import fastgen
    from fastgen.merging import matching
    from fastgen.ops.portable import is_portable, portable

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.namespace)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    x = torch.randn(1, 16, 8, generator=g)

    def run():
        out = [fastgen.ops.attention(q, k, v, backend="triton"),
               *fastgen.ops.qk_norm_rope(q, k, q_weight=torch.ones(16), k_weight=torch.ones(16), rope=None,
                                         backend="triton"),
               *fastgen.ops.quantize_fp8(q, backend="triton")]
        m = matching.bipartite_match(x, 4, 4, 2, 2, 4, use_rand=False, backend="triton")
        return out + [matching.unmerge(matching.merge(x, m, backend="triton"), m, backend="triton")]

    with Ops() as kernels:
        ref = run()
    assert "fastgen" in kernels.seen
    with Ops() as refs, portable():
        assert is_portable()
        got = run()
    assert not is_portable() and "fastgen" not in refs.seen
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)


def test_meta_model_exports_its_graph_without_weights(tmp_path):
    # How released sizes larger than memory are checked (tools/export_real_size.py): the graph of a
    # model on the meta device, each weight a graph input of its parameter's name.
    model, _ = tiny_denoiser("unet")
    names = {n for n, _ in model.named_parameters()}
    model = model.to("meta")
    with pytest.raises(ValueError, match="meta device has no weights"):
        fx.to_onnx(model, tmp_path / "m.onnx")
    report = fx.to_onnx(model, tmp_path / "m.onnx", validate=False, target="tensorrt-10.1")
    assert not report.weights and not report.checks and not report.external_data
    assert fx.read_metadata(report.path)["weights"] is False
    graph = onnx.load(str(report.path)).graph
    inputs = {i.name for i in graph.input}
    assert {"sample", "timestep", "encoder_hidden_states"} <= inputs
    # every weight is an input, named by its parameter path under the export wrapper's "model."
    assert {n for n in names if f"model.{n}" in inputs} == names
    assert report.inputs["sample"] == ("batch", 4, "2*height", "2*width")


def test_masked_attention_stays_decomposed_at_opset_23(tmp_path):
    # HunyuanVideo's padding mask [B, 1, 1, S] broadcasts over the queries: valid ONNX Attention, but
    # onnxruntime's kernel refuses it, so masked models keep MatMul-Softmax-MatMul at every target.
    model, _ = tiny_denoiser("hunyuan")
    report = fx.to_onnx(model, tmp_path / "m.onnx", target="tensorrt-10.15", batch=(1, 3), height=(8, 32),
                        width=(8, 32), frames=(1, 9))
    assert report.opset == 23 and "Attention" not in _op_types(report.path)
    for c in report.checks:
        assert c.max_rel_diff < REL_TOL, c


def test_ranges_open_ended_fixed_and_reexport(tmp_path, caplog):
    model, _ = tiny_denoiser("flux")
    path = tmp_path / "m.onnx"
    with pytest.MonkeyPatch.context() as mp:  # first export with external data beside the graph
        mp.setattr(fx, "_PROTO_LIMIT", 0)
        fx.to_onnx(model, path, batch=1, height=32, width=(32, 48), validate=False)
    assert path.with_name("m.onnx.data").exists()
    # torch.compile's wrapper is unwrapped; (min, None) is unbounded; fixed dims are Dim.STATIC
    with caplog.at_level(logging.WARNING, logger="torch"):
        logging.disable(logging.NOTSET)
        try:
            report = fx.to_onnx(torch.compile(model), path, batch=(2, None), height=32, width=(32, 48),
                                validate=False)
        finally:
            logging.disable(logging.WARNING)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert report.ranges["batch"] == (2, None) and report.ranges["height"] == (32, 32)
    assert report.inputs["hidden_states"][0] == "batch"
    # the re-export is inline: the first export's external data is gone, not left to be read
    assert not report.external_data and not path.with_name("m.onnx.data").exists()
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])  # and it runs at batch 3
    x = fx._Flux(model).tensors(3, 2, 3, 5, torch.float32, "cpu")
    got = torch.from_numpy(sess.run(["noise_pred"], {k: v.numpy() for k, v in x.items()})[0])
    with torch.no_grad():
        ref = fx._Flux(model).wrapper(model)(**x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < REL_TOL
