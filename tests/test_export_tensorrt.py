"""``fastgen.export.tensorrt``: profiles against the graph's dynamic dimensions, the engine cache (keys, atomic
writes, stale and foreign engines), the missing-TensorRT error, and ``TensorRTDenoiser`` (binding, profiles,
weight-streaming budget, CUDA-graph bookkeeping, refit A -> B -> A) on a tiny Flux export.

TensorRT cannot be installed on the development machines, so everything short of TensorRT's own build runs
against ``tests/trt_standin.py``: a ``tensorrt`` module whose engines are the ONNX graph run by onnxruntime on
the CPU, reading inputs from and writing the output to the addresses fastgen binds, with TensorRT's refit
(every weight by its ONNX name, combined weights reported missing, unset weights kept) and weight-streaming
rules. The tests marked ``tensorrt`` build and run a real engine wherever TensorRT and a GPU are present.

Tolerance: the stand-in is onnxruntime fp32 against PyTorch fp32, ~1e-6 of the output's scale (sum order);
1e-4 of the largest |output| as in tests/test_export_onnx.py. Refit round trips are compared bit for bit.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import trt_standin  # noqa: E402

from fastgen.export import tensorrt as ft  # noqa: E402
from fastgen.export import to_onnx  # noqa: E402
from fastgen.models import tiny_denoiser  # noqa: E402

REL_TOL = 1e-4
RANGES = dict(batch=(1, 2), height=(32, 64), width=(32, 64))
# Two profiles: small shapes, and the export's largest (a call picks the first that holds it).
SMALL = dict(batch=(1, 1, 2), height=(32, 32, 32), width=(32, 32, 48), text_tokens=(1, 7, 8))
LARGE = dict(batch=(1, 2, 2), height=(32, 64, 64), width=(32, 64, 64), text_tokens=(1, 8, 16))
_REAL_TRT = importlib.util.find_spec("tensorrt") is not None
_COMPUTE_CAPABILITY = ft.compute_capability  # the module's own, before the stand-in fixture replaces it


def _perturbed(seed: int, scale: float):
    # Random offsets on every parameter, so that models A and B differ in every weight a refit sets
    # (tiny_denoiser's norms all start at ones).
    model, inputs = tiny_denoiser("flux")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model, inputs


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    logging.disable(logging.WARNING)  # torch.onnx logs a warning per missing torchvision op
    try:
        model, inputs = _perturbed(1, 0.02)
        path = tmp_path_factory.mktemp("onnx") / "flux.onnx"
        to_onnx(model, path, validate=False, **RANGES)
    finally:
        logging.disable(logging.NOTSET)
    return model, inputs, path


@pytest.fixture(scope="module")
def trt(export):
    """The stand-in as ``tensorrt`` and a fixed compute capability, for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        mod = trt_standin.module()
        mp.setitem(sys.modules, "tensorrt", mod)
        mp.setattr(ft, "compute_capability", lambda device=None: "9.0")
        yield mod


@pytest.fixture(scope="module")
def engine(trt, export, tmp_path_factory):
    """A refittable, weight-streaming fp32 engine with the two profiles, in a fresh cache."""
    _, _, path = export
    profiles = [ft.make_profile(path, **SMALL), ft.make_profile(path, **LARGE)]
    return ft.build_engine(path, precision="fp32", profiles=profiles, refittable=True, weight_streaming=True,
                           cache_dir=tmp_path_factory.mktemp("cache"))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _flux_inputs(model, b, hu, wu, t):
    # fastgen.export.onnx's own per-architecture example tensors (packed image ids, text ids)
    from fastgen.export.onnx import _ARCHES

    arch = _ARCHES["FluxTransformer2DModel"](model)
    x = arch.tensors(b, hu, wu, t, torch.float32, "cpu")
    return dict(hidden_states=x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                pooled_projections=x["pooled_projections"], timestep=x["timestep"], img_ids=x["img_ids"],
                txt_ids=x["txt_ids"], return_dict=False)


# ---------------------------------------------------------------------------------------- profiles

GRAPH = {"sample": ("batch", 4, "2*height", "2*width"), "timestep": ("batch",),
         "encoder_hidden_states": ("batch", "text_tokens", 32), "time_ids": (6,)}
RANGES_U = {"batch": (1, 4), "height": (2, 8), "width": (2, 8), "text_tokens": (1, None)}


def _unet_profile(**change):
    p = {"sample": ((1, 4, 4, 4), (2, 4, 8, 12), (4, 4, 16, 16)), "timestep": ((1,), (2,), (4,)),
         "encoder_hidden_states": ((1, 1, 32), (2, 77, 32), (4, 77, 32))}
    p.update(change)
    return p


def test_validate_profiles_accepts_and_normalizes():
    (p,) = ft.validate_profiles(GRAPH, _unet_profile(), RANGES_U)
    assert p["time_ids"] == ((6,), (6,), (6,))  # a static input left out is filled in
    assert p["sample"][1] == (2, 4, 8, 12)
    assert len(ft.validate_profiles(GRAPH, [_unet_profile(), _unet_profile()], RANGES_U)) == 2


@pytest.mark.parametrize("change, match", [
    (dict(sample=((1, 3, 4, 4), (2, 4, 8, 8), (4, 4, 16, 16))), r"dimension 1 \(4\) is static"),
    (dict(sample=((2, 4, 4, 4), (1, 4, 8, 8), (4, 4, 16, 16))), "min <= opt <= max"),
    (dict(sample=((1, 4, 4), (2, 4, 8), (4, 4, 16))), "rank 4"),
    (dict(timestep=((1,), (3,), (4,))), "batch = 3 at opt.*must agree"),
    (dict(sample=((1, 4, 5, 4), (2, 4, 8, 8), (4, 4, 16, 16))), "multiple of 2"),
    (dict(sample=((1, 4, 4, 4), (2, 4, 8, 8), (4, 4, 18, 16))), r"height = 9 is outside the export's range 2\.\.\.8"),
    (dict(encoder_hidden_states=((1, 1, 32), (2, 7, 32), (8, 7, 32)),
          sample=((1, 4, 4, 4), (2, 4, 8, 8), (8, 4, 16, 16)), timestep=((1,), (2,), (8,))), "batch = 8"),
    (dict(latents=((1,), (1,), (1,))), "not graph inputs"),
])
def test_validate_profiles_refuses(change, match):
    with pytest.raises(ValueError, match=match):
        ft.validate_profiles(GRAPH, _unet_profile(**change), RANGES_U)


def test_validate_profiles_needs_every_dynamic_input():
    p = _unet_profile()
    del p["timestep"]
    with pytest.raises(ValueError, match="lacks 'timestep'"):
        ft.validate_profiles(GRAPH, p, RANGES_U)


def test_make_profile_from_the_export(export):
    _, _, path = export
    p = ft.make_profile(path, batch=(1, 2), height=(32, 48, 64), width=32, text_tokens=(1, 8, 16))
    # image tokens = (height/16) * (width/16) at min, opt, max; shared by hidden_states and img_ids
    assert p["hidden_states"] == ((1, 4, 4), (2, 6, 4), (2, 8, 4))
    assert p["img_ids"] == ((4, 3), (6, 3), (8, 3))
    assert p["txt_ids"] == ((1, 3), (8, 3), (16, 3))
    assert ft.make_profile(path, text_tokens=8)["hidden_states"] == ((1, 4, 4), (2, 16, 4), (2, 16, 4))
    with pytest.raises(ValueError, match="text_tokens is dynamic"):
        ft.make_profile(path)
    with pytest.raises(ValueError, match="multiples of 16"):
        ft.make_profile(path, height=40, text_tokens=8)
    with pytest.raises(ValueError, match="outside the export's range"):
        ft.make_profile(path, height=(32, 128), text_tokens=8)


def test_make_profile_for_a_video_export(tmp_path):
    # A graph with a Wan export's inputs and metadata (to_onnx itself takes ~30 s for tiny Wan on 2 cores).
    from onnx import helper

    model, _ = tiny_denoiser("wan")
    shapes = {"hidden_states": ["batch", 4, "latent_frames", "2*height", "2*width"], "timestep": ["batch"],
              "encoder_hidden_states": ["batch", "text_tokens", 16]}
    graph = helper.make_graph(
        [helper.make_node("Identity", ["hidden_states"], ["noise_pred"])], "wan",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, d) for n, d in shapes.items()],
        [helper.make_tensor_value_info("noise_pred", onnx.TensorProto.FLOAT, shapes["hidden_states"])])
    proto = helper.make_model(graph)
    meta = {"version": "0", "class": "WanTransformer3DModel", "architecture": "wan", "config": model.to_json_string(),
            "inputs": json.dumps(list(shapes)), "output": "noise_pred", "dtype": "float32",
            "ranges": json.dumps({"batch": [1, 2], "height": [32, 64], "width": [32, 64], "frames": [1, 9]}),
            "symbols": json.dumps({"batch": [1, 2], "height": [2, 4], "width": [2, 4], "latent_frames": [1, 3],
                                   "text_tokens": [1, None]})}
    for k, v in meta.items():
        proto.metadata_props.add(key=f"fastgen.{k}", value=v)
    path = tmp_path / "wan.onnx"
    onnx.save(proto, str(path))
    assert ft.symbol_ranges(path)["latent_frames"] == (1, 3)  # frames 1..9 -> (frames - 1) / 4 + 1 latent frames
    p = ft.make_profile(path, frames=(1, 5, 9), text_tokens=8)
    assert p["hidden_states"] == ((1, 4, 1, 4, 4), (2, 4, 2, 8, 8), (2, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ft.make_profile(path, frames=(1, 6), text_tokens=8)
    with pytest.raises(ValueError, match="latent_frames = 4 is outside"):
        ft.make_profile(path, frames=(1, 13), text_tokens=8)
    with pytest.raises(ValueError, match="not a dimension of this graph"):
        ft.make_profile(path, text_tokens=8, image_tokens=257)


# ---------------------------------------------------------------------------------------- cache

KEY = dict(onnx_sha256="a" * 64, model_class="FluxTransformer2DModel", config={"num_layers": 1},
           profiles=[{"x": ((1,), (2,), (4,))}], precision="fp16",
           flags={"refit": False, "weight_streaming": False, "workspace": None, "tf32": True},
           compute_capability="9.0", tensorrt_version="10.15.1")


@pytest.mark.parametrize("part, value", [
    ("onnx_sha256", "b" * 64), ("model_class", "UNet2DConditionModel"), ("config", {"num_layers": 2}),
    ("profiles", [{"x": ((1,), (2,), (8,))}]), ("precision", "bf16"),
    ("flags", {**KEY["flags"], "refit": True}), ("flags", {**KEY["flags"], "weight_streaming": True}),
    ("flags", {**KEY["flags"], "workspace": 1 << 30}), ("compute_capability", "8.9"),
    ("tensorrt_version", "10.14.1")])
def test_cache_key_changes_with_each_part(part, value):
    assert ft.engine_key(**KEY) == ft.engine_key(**dict(KEY))
    assert ft.engine_key(**{**KEY, part: value}) != ft.engine_key(**KEY)


def test_onnx_hash_covers_external_data(tmp_path):
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(torch.arange(4, dtype=torch.float32).numpy(), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    assert [f.name for f in ft.onnx_files(path)] == ["m.onnx", "m.onnx.data"]
    before = ft.hash_onnx(path)
    data = path.with_name("m.onnx.data")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert ft.hash_onnx(path) != before


def test_atomic_write_leaves_old_file_or_none(tmp_path, monkeypatch):
    target = tmp_path / "x.engine"
    ft.atomic_write(target, b"old")

    def crash(*a):
        raise KeyboardInterrupt  # a kill mid-write: after part of the data, before the rename

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        ft.atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.engine"]  # the temporary file is gone
    with pytest.raises(KeyboardInterrupt):
        ft.atomic_write(tmp_path / "y.engine", b"new")
    assert os.listdir(tmp_path) == ["x.engine"]


def test_crash_between_engine_and_sidecar_is_rebuilt(trt, export, tmp_path, monkeypatch):
    _, _, path = export
    real = ft.atomic_write

    def no_sidecar(p, data):
        if str(p).endswith(".json"):
            raise OSError("disk full")
        real(p, data)

    monkeypatch.setattr(ft, "atomic_write", no_sidecar)
    kw = dict(precision="fp32", text_tokens=8, cache_dir=tmp_path)
    with pytest.raises(OSError):
        ft.build_engine(path, **kw)
    (engine_file,) = tmp_path.glob("*.engine")
    with pytest.raises(ft.StaleEngineError, match="no sidecar"):
        ft.TensorRTDenoiser.load(engine_file, device="cpu")
    monkeypatch.setattr(ft, "atomic_write", real)
    again = ft.build_engine(path, **kw)
    assert not again.cached and again.path == engine_file and "no sidecar" in again.warnings[0]
    assert ft.build_engine(path, **kw).cached


def test_stale_and_foreign_engines_are_refused(trt, engine, tmp_path, monkeypatch):
    ft.check_engine(engine.path)
    copy = tmp_path / "e.engine"
    copy.write_bytes(engine.path.read_bytes())
    ft.sidecar_path(copy).write_text(ft.sidecar_path(engine.path).read_text())
    ft.check_engine(copy)

    monkeypatch.setattr(trt, "__version__", "10.16.0")  # TensorRT upgraded since the build
    with pytest.raises(ft.StaleEngineError, match="built with TensorRT 10.15.1.29, this is 10.16.0"):
        ft.TensorRTDenoiser.load(copy, device="cpu")
    monkeypatch.undo()
    monkeypatch.setattr(ft, "compute_capability", lambda device=None: "8.9")  # another GPU
    with pytest.raises(ft.StaleEngineError, match="compute capability 9.0, this GPU is 8.9"):
        ft.check_engine(copy)
    monkeypatch.undo()
    with pytest.raises(ft.StaleEngineError, match="cache key differs"):
        ft.check_engine(copy, key="0" * 64)

    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other bytes
    copy.write_bytes(bytes(raw))
    with pytest.raises(ft.StaleEngineError, match="SHA-256 differs"):
        ft.check_engine(copy)
    copy.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ft.StaleEngineError, match="bytes, its sidecar says"):
        ft.check_engine(copy)

    foreign = tmp_path / "foreign.engine"
    foreign.write_bytes(b"\0" * 64)
    with pytest.raises(ft.StaleEngineError, match="not built by fastgen"):
        ft.check_engine(foreign)
    ft.sidecar_path(foreign).write_text(json.dumps({"format": "someone-else"}))
    with pytest.raises(ft.StaleEngineError, match="not a fastgen-tensorrt-engine"):
        ft.check_engine(foreign)


def test_stale_cache_entry_is_rebuilt(trt, export, tmp_path, monkeypatch):
    _, _, path = export
    kw = dict(precision="fp32", text_tokens=8, cache_dir=tmp_path)
    first = ft.build_engine(path, **kw)
    assert not first.cached and ft.build_engine(path, **kw).cached
    raw = bytearray(first.path.read_bytes())
    raw[-1] ^= 0xFF
    first.path.write_bytes(bytes(raw))
    again = ft.build_engine(path, **kw)
    assert not again.cached and "SHA-256 differs" in again.warnings[0]
    ft.check_engine(again.path)


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("graph_inputs"), lambda d: d.update(dtype="not_a_dtype"), lambda d: d.update(flags="x"),
    lambda d: d.update(inputs=["nope"]), lambda d: d.update(symbols={"batch": "x"}), lambda d: d.pop("output")])
def test_damaged_sidecar_is_stale_and_rebuilt(trt, export, engine, tmp_path, damage):
    # Every field the loader reads is checked when the sidecar is read: a damaged one is stale, not a cache hit
    # followed by a KeyError / AttributeError at load.
    copy = tmp_path / "e.engine"
    copy.write_bytes(engine.path.read_bytes())
    doc = json.loads(ft.sidecar_path(engine.path).read_text())
    damage(doc)
    ft.sidecar_path(copy).write_text(json.dumps(doc))
    with pytest.raises(ft.StaleEngineError, match="is damaged"):
        ft.TensorRTDenoiser.load(copy, device="cpu")
    with pytest.raises(ft.StaleEngineError, match="is damaged"):
        ft.check_engine(copy, key=engine.sidecar["key"])


def test_damaged_sidecar_cache_entry_is_rebuilt(trt, export, tmp_path):
    _, _, path = export
    kw = dict(precision="fp32", text_tokens=8, cache_dir=tmp_path)
    first = ft.build_engine(path, **kw)
    side = ft.sidecar_path(first.path)
    doc = json.loads(side.read_text())
    del doc["graph_inputs"]
    side.write_text(json.dumps(doc))
    again = ft.build_engine(path, **kw)
    assert not again.cached and "graph_inputs is missing" in again.warnings[0]
    ft.TensorRTDenoiser.load(again.path, device="cpu")


def test_load_deserializes_the_bytes_it_hashed(trt, export, engine, tmp_path, monkeypatch):
    # A concurrent build's os.replace landing between the hash and a second read must not load an engine the
    # sidecar does not describe: the file is read once, hashed and deserialized from those bytes.
    _, _, path = export
    other = ft.build_engine(path, precision="fp32", profiles=[ft.make_profile(path, **SMALL)], cache_dir=tmp_path)
    copy = tmp_path / "e.engine"
    copy.write_bytes(engine.path.read_bytes())
    ft.sidecar_path(copy).write_text(ft.sidecar_path(engine.path).read_text())
    real_hash, real_read = ft._hash_file, type(copy).read_bytes
    reads = []

    def replaced_after(p, *a):
        h = real_hash(p, *a)
        if p == copy:
            copy.write_bytes(other.path.read_bytes())  # the concurrent replace lands now
        return h

    def counted(p):
        reads.append(p)
        return real_read(p)

    monkeypatch.setattr(ft, "_hash_file", replaced_after)
    monkeypatch.setattr(type(copy), "read_bytes", counted)
    den = ft.TensorRTDenoiser.load(copy, device="cpu")
    assert len(den._profiles) == 2 == len(den.sidecar["profiles"])  # the engine hashed, not the other one
    assert reads.count(copy) == 1


def test_stale_temporary_files_are_removed(tmp_path, monkeypatch):
    # A writer killed mid-write leaves .<name>.<host>.<pid>.<random>.tmp; the next write of the same target
    # removes it once its writer is known dead (a gone pid on this host, or an hour without a change).
    target = tmp_path / "x.engine"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ft._host()
    files = {name: tmp_path / name for name in (
        f".x.engine.{host}.{dead.pid}.abc123.tmp",  # dead writer here: removed
        ".x.engine.old_style.tmp",  # no pid, an hour old: removed
        f".x.engine.{host}.{os.getpid()}.live01.tmp",  # live writer: kept
        f".x.engine.otherhost.{dead.pid}.far001.tmp",  # another host's writer, recent: kept
        f".y.engine.{host}.{dead.pid}.other1.tmp")}  # another target's: left to it
    for f in files.values():
        f.write_bytes(b"partial")
    old = os.path.getmtime(files[".x.engine.old_style.tmp"]) - ft.STALE_TEMP_SECONDS - 10
    os.utime(files[".x.engine.old_style.tmp"], (old, old))
    ft.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(["x.engine", *list(files)[2:]])


def test_meta_device_exports_are_refused(trt, export, tmp_path):
    _, _, path = export
    proto = onnx.load(str(path), load_external_data=False)
    proto.metadata_props.add(key="fastgen.weights", value="false")
    meta = tmp_path / "meta.onnx"
    onnx.save(proto, str(meta))
    msg = "exported from the meta device: its weights are graph inputs; export the model with its weights"
    with pytest.raises(ValueError, match=msg):
        ft.build_engine(meta, precision="fp32", text_tokens=8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=msg):
        ft.TensorRTDenoiser.load(meta, device="cpu", precision="fp32", text_tokens=8, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.engine"))


def test_timing_cache_is_loaded_and_saved(trt, export, tmp_path):
    _, _, path = export
    cache = tmp_path / "timing.cache"
    kw = dict(precision="fp32", text_tokens=8, cache_dir=tmp_path, timing_cache=cache, rebuild=True)
    ft.build_engine(path, **kw)
    assert cache.read_bytes().startswith(trt_standin._TimingCache.MAGIC)
    ft.build_engine(path, **kw)  # read back and extended: the network's entry counted twice
    entries = trt.Builder(None).create_builder_config().create_timing_cache(cache.read_bytes()).entries
    assert list(entries["entries"].values()) == [2]
    cache.write_bytes(b"not a timing cache")  # another TensorRT's: replaced, the build goes on
    ft.build_engine(path, **kw)
    assert cache.read_bytes().startswith(trt_standin._TimingCache.MAGIC)


def test_precision_is_the_graphs(trt, export, tmp_path):
    _, _, path = export
    with pytest.raises(ValueError, match=r"weights are float32.*dtype=torch.float16"):
        ft.build_engine(path, precision="fp16", text_tokens=8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="explicit FP8 quantization"):
        ft.build_engine(path, precision="fp8", text_tokens=8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision must be one of"):
        ft.build_engine(path, precision="int8", text_tokens=8, cache_dir=tmp_path)


def test_fp8_needs_qdq_nodes():
    from onnx import helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [helper.make_tensor("s", onnx.TensorProto.FLOAT16, [], [1.0]),
             helper.make_tensor("z", onnx.TensorProto.FLOAT8E4M3FN, [], [0])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [4])], inits)
    ft._check_precision(helper.make_model(graph), "fp8")


# ---------------------------------------------------------------------------------------- no TensorRT


def test_missing_tensorrt_says_how_to_install(export, monkeypatch, tmp_path):
    _, _, path = export
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    for call in (lambda: ft.build_engine(path, text_tokens=8, cache_dir=tmp_path),
                 lambda: ft.TensorRTDenoiser.load(tmp_path / "x.engine"), ft.tensorrt_version):
        with pytest.raises(ImportError, match=r"pip install tensorrt.*fastgen\[tensorrt\].*NVIDIA GPU"):
            call()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standin.module("10.0.1.6"))
    with pytest.raises(ImportError, match="TensorRT 10.1 or newer, found 10.0.1.6"):
        ft.tensorrt_version()
    assert ft.operator_target("10.15.1.29") == "tensorrt-10.15"
    assert ft.operator_target("10.14.1") == "tensorrt-10.14" and ft.operator_target("10.9.0") == "tensorrt-10.1"
    assert ft.operator_target("11.1.0.106") == "tensorrt-10.15"


def test_importing_fastgen_export_does_not_import_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None; import fastgen.export, fastgen.export.tensorrt; "
            "from fastgen.export import TensorRTDenoiser, build_engine")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------- the denoiser


@pytest.fixture(scope="module")
def denoiser(engine):
    return ft.TensorRTDenoiser.load(engine, device="cpu")


def test_denoiser_matches_pytorch_in_both_profiles(export, engine, denoiser):
    model = export[0]
    engine_obj = denoiser._engine
    # (batch, height steps, width steps, text tokens): the first fits the small profile, the rest the large
    for b, hu, wu, t in ((1, 2, 3, 5), (2, 2, 2, 7), (2, 4, 3, 11)):
        x = _flux_inputs(model, b, hu, wu, t)
        with torch.no_grad():
            ref = model(**x)[0]
            out = denoiser(**x)[0]
        assert out.shape == ref.shape and _rel(out, ref) < REL_TOL
    assert denoiser._eager.profile == 1 and len(engine_obj.contexts) == 1
    with pytest.raises(ValueError, match="outside this export|exported for"):
        denoiser(**_flux_inputs(model, 2, 5, 4, 7))  # 80 px: beyond the export's 64
    assert engine.sidecar["flags"] == {"refit": True, "weight_streaming": True, "workspace": None, "tf32": False}


def test_denoiser_refuses_shapes_no_profile_holds(export, trt, tmp_path):
    _, _, path = export
    kw = dict(precision="fp32", profiles=[ft.make_profile(path, **SMALL)], cache_dir=tmp_path)
    den = ft.TensorRTDenoiser.load(path, device="cpu", **kw)  # an .onnx source: built, then loaded
    assert ft.build_engine(path, **kw).cached and den.engine_path == ft.build_engine(path, **kw).path
    with pytest.raises(ValueError, match="no optimization profile of this engine holds"):
        den(**_flux_inputs(export[0], 2, 4, 4, 7))
    with pytest.raises(ValueError, match="built without refittable=True"):
        den.refit_from(export[0])
    with pytest.raises(ValueError, match="no streamable weights"):
        den.set_weight_streaming_budget(0.5)


def test_weight_streaming_budget(export, denoiser):
    assert ft.streaming_budget(0.25, 1000) == 250 and ft.streaming_budget(1.0, 1000) == 1000
    mib = ft.MIN_BUDGET_BYTES
    assert ft.streaming_budget(3 * mib, 10 * mib) == 3 * mib and ft.streaming_budget(50 * mib, 10 * mib) == 10 * mib
    assert ft.streaming_budget(0, 1000) == 0 == ft.streaming_budget(0.0, 1000)
    for bad in (-1, 1.5, -0.1, True, "half", None):
        with pytest.raises(ValueError):
            ft.streaming_budget(bad, 1000)
    # An int is bytes, a float a fraction: 1 would be one byte where 1.0 is everything, so small ints are refused
    for small in (1, 300, mib - 1):
        with pytest.raises(ValueError, match=r"so bytes.*a fraction is a float.*at least 1048576"):
            ft.streaming_budget(small, 10 * mib)
    size = denoiser.streamable_weights_size
    assert size > sum(p.numel() * 4 for p in export[0].parameters())  # every float weight (+ graph constants)
    assert denoiser.weight_streaming_budget == size  # TensorRT's default: nothing streams
    x = _flux_inputs(export[0], 1, 2, 2, 5)
    with torch.no_grad():
        before = denoiser(**x)[0]
        # The stand-in refuses a budget change while a context lives (TensorRT's rule): contexts are dropped.
        assert denoiser.set_weight_streaming_budget(0.25) == size // 4 == denoiser.weight_streaming_budget
        assert torch.equal(denoiser(**x)[0], before)
        assert denoiser.set_weight_streaming_budget("auto") == size // 2
        assert denoiser.set_weight_streaming_budget(1.0) == size
        with pytest.raises(ValueError, match="so bytes"):
            denoiser.set_weight_streaming_budget(1)
        assert denoiser.weight_streaming_budget == size


class _Recorded:
    """CUDA-graph capture simulated: the captured call is kept and replayed as is."""

    def __init__(self):
        self.captures = 0

    def capture(self, fn, stream):
        self.captures += 1
        return type("G", (), {"replay": staticmethod(fn)})()


def test_graph_replay_per_input_shapes(export, denoiser, monkeypatch):
    model = export[0]
    backend = _Recorded()
    monkeypatch.setattr(denoiser, "_graph_backend", backend)
    monkeypatch.setattr(denoiser, "cuda_graphs", True)
    monkeypatch.setattr(denoiser, "max_graphs", 2)
    shapes = [(1, 2, 3, 5), (2, 4, 3, 11), (1, 2, 3, 5), (2, 2, 2, 7)]
    with torch.no_grad():
        outs = [denoiser(**_flux_inputs(model, *s))[0] for s in shapes]
        for s, out in zip(shapes, outs):
            assert _rel(out, model(**_flux_inputs(model, *s))[0]) < REL_TOL
    assert backend.captures == 3  # the repeated shape replayed its graph
    assert len(denoiser._graphs) == 2  # max_graphs: the least recently used went
    assert [k[0][1][1] for k in denoiser._graphs] == [6, 4]  # image tokens of the two kept, oldest first
    denoiser.set_weight_streaming_budget(1.0)
    assert not denoiser._graphs
    monkeypatch.undo()


def test_refit_a_b_a_is_bit_exact(export, denoiser):
    model_a = export[0]
    model_b, _ = _perturbed(7, 0.05)
    x = _flux_inputs(model_a, 2, 3, 4, 9)
    with torch.no_grad():
        out_a = denoiser(**x)[0]
        names = denoiser.refit_from(model_b)
        out_b = denoiser(**x)[0]
        ref_b = model_b(**x)[0]
        denoiser.refit_from(model_a.state_dict())  # a state dict works too
        out_a2 = denoiser(**x)[0]
    engine = denoiser._engine
    all_weights = trt_standin.Refitter(engine, None).get_all_weights()
    assert engine.refit_log[-1] == engine.refit_log[-2] == sorted(names) == sorted(all_weights)
    assert _rel(out_b, ref_b) < REL_TOL and _rel(out_b, out_a) > 1e-2
    assert torch.equal(out_a2, out_a)


def test_a_partial_refit_would_not_return_to_a(export, denoiser, trt):
    # Why refit_from sets every weight: set only what B changed and going back to A keeps B's other values.
    model_a = export[0]
    model_b = _perturbed(1, 0.02)[0]
    with torch.no_grad():
        model_b.proj_out.bias.add_(1.0)
        model_b.x_embedder.bias.add_(1.0)
    x = _flux_inputs(model_a, 1, 2, 2, 5)
    with torch.no_grad():
        out_a = denoiser(**x)[0]
        denoiser.refit_from(model_b)
        changed = ["model.proj_out.bias"]  # a "partial refit" that forgets x_embedder.bias
        r = trt.Refitter(denoiser._engine, None)
        keep = [model_a.proj_out.bias.detach().clone()]
        r.set_named_weights(changed[0], trt.Weights(trt.DataType.FLOAT, keep[0].data_ptr(), keep[0].numel()))
        assert r.get_missing_weights() == [] and r.refit_cuda_engine()
        assert not torch.equal(denoiser(**x)[0], out_a)
        denoiser.refit_from(model_a)
        assert torch.equal(denoiser(**x)[0], out_a)


def test_refit_from_a_fused_lora_model(export, denoiser):
    # PEFT's LoRA layers rename the base weights (...to_q.base_layer.weight): a fused model refits to its output.
    pytest.importorskip("peft")
    from peft import LoraConfig

    model_a = export[0]
    lora = copy.deepcopy(model_a)
    lora.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    x = _flux_inputs(model_a, 1, 2, 2, 5)
    with torch.no_grad():
        out_a = denoiser(**x)[0]
        with pytest.raises(ValueError, match=r"not merged.*fuse_lora\(\)"):
            denoiser.refit_from(lora)
        with pytest.raises(ValueError, match=r"cannot be told from a state dict.*fuse_lora\(\)"):
            denoiser.refit_from(lora.state_dict())
        lora.fuse_lora(lora_scale=1.0)
        ref = lora(**x)[0]
        assert _rel(ref, model_a(**x)[0]) > 1e-3  # the LoRA matters
        denoiser.refit_from(lora)
        assert _rel(denoiser(**x)[0], ref) < REL_TOL
        denoiser.refit_from(model_a)
        assert torch.equal(denoiser(**x)[0], out_a)


def test_refit_from_refuses_a_model_lacking_weights(export, denoiser):
    # A weight the state dict lacks is never taken from the ONNX file (it would keep the previous model's value).
    model_a = export[0]
    state = dict(model_a.state_dict())
    del state["transformer_blocks.0.attn.to_q.weight"]
    with pytest.raises(ValueError, match=r"have no tensor in it \(model\.transformer_blocks\.0\.attn\.to_q\.weight"):
        denoiser.refit_from(state)
    bad = dict(model_a.state_dict())
    bad["proj_out.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"differ in shape \(model\.proj_out\.bias \[\d+\] vs \[3\]"):
        denoiser.refit_from(bad)
    unet, _ = tiny_denoiser("unet")  # another architecture into this (Flux) engine
    with pytest.raises(ValueError, match="does not match the exported one"):
        denoiser.refit_from(unet)


def test_refit_sources_trace_every_parameter(export):
    from onnx import numpy_helper

    model, _, path = export
    proto = onnx.load(str(path))
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    sources = ft.refit_sources(proto, {k: v.shape for k, v in state.items()})
    held = set()
    for init in proto.graph.initializer:
        src = sources[init.name]
        if src.key is not None:
            value = state[src.key].detach()
            held.add(src.key)
            # the mapping reproduces the exported weights bit for bit (transposes included)
            assert torch.equal((value.t() if src.transpose else value).contiguous(),
                               torch.from_numpy(numpy_helper.to_array(init).copy())), init.name
    assert held == {k for k, _ in model.named_parameters()}
    # to_onnx keeps each parameter as an initializer of its own name, untransposed and unshared
    assert not any(s.transpose for s in sources.values())


def test_refit_sources_refuse_what_cannot_be_set(export):
    model, _, path = export
    shapes = {k: v.shape for k, v in model.named_parameters()}
    proto = onnx.load(str(path), load_external_data=False)
    # Two parameters merged into one initializer (the exporter does this to equal values):
    merged = onnx.ModelProto()
    merged.CopyFrom(proto)
    k, q = "model.transformer_blocks.0.attn.norm_k.weight", "model.transformer_blocks.0.attn.norm_q.weight"
    for node in merged.graph.node:
        node.input[:] = [q if i == k else i for i in node.input]
    merged.graph.initializer.remove(next(i for i in merged.graph.initializer if i.name == k))
    with pytest.raises(ValueError, match="merged parameters that were equal at export"):
        ft.refit_sources(merged, shapes)
    # A parameter folded into an initializer of another name, not a Linear transpose:
    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    for init in folded.graph.initializer:
        if init.name == "model.x_embedder.bias":
            init.name = "val_folded"
    for node in folded.graph.node:
        node.input[:] = ["val_folded" if i == "model.x_embedder.bias" else i for i in node.input]
    with pytest.raises(ValueError, match=r"val_folded \[32\] was folded.*x_embedder.bias"):
        ft.refit_sources(folded, shapes)


# ---------------------------------------------------------------------------------------- real TensorRT


@pytest.fixture
def real_trt(monkeypatch):
    if not _REAL_TRT or not torch.cuda.is_available():
        pytest.skip("needs TensorRT and a CUDA GPU")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(ft, "compute_capability", _COMPUTE_CAPABILITY)
    import tensorrt

    return tensorrt


@pytest.mark.tensorrt
def test_real_engine_build_run_refit_and_graphs(real_trt, export, tmp_path):
    model_a, _, path = export
    model_a = copy.deepcopy(model_a).cuda()
    model_b = _perturbed(7, 0.05)[0].cuda()
    built = ft.build_engine(path, precision="fp32", batch=(1, 2), height=(32, 64), width=(32, 64),
                            text_tokens=(1, 8, 16), refittable=True, weight_streaming=True, cache_dir=tmp_path,
                            timing_cache=tmp_path / "timing.cache")
    assert ft.build_engine(path, precision="fp32", batch=(1, 2), height=(32, 64), width=(32, 64),
                           text_tokens=(1, 8, 16), refittable=True, weight_streaming=True,
                           cache_dir=tmp_path).cached
    den = ft.TensorRTDenoiser.load(built, cuda_graphs=True)
    x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _flux_inputs(model_a, 2, 3, 4, 9).items()}
    with torch.no_grad():
        out_a = den(**x)[0]
        assert _rel(out_a, model_a(**x)[0]) < 1e-3  # TF32 off; TensorRT's kernels sum in other orders
        assert torch.equal(den(**x)[0], out_a)  # graph replay
        den.refit_from(model_b)
        assert _rel(den(**x)[0], model_b(**x)[0]) < 1e-3
        den.refit_from(model_a)
        assert torch.equal(den(**x)[0], out_a)
        den.set_weight_streaming_budget(0.5)
        assert _rel(den(**x)[0], out_a) < 1e-3  # streamed weights may take other kernels

