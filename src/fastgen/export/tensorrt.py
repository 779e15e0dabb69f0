"""TensorRT engines from fastgen's ONNX exports: ``build_engine`` (optimization profiles, refittable and
weight-streaming engines, a timing cache), an engine cache that never loads a stale or foreign engine, and
``TensorRTDenoiser``, a drop-in denoiser module (CUDA-graph replay, a weight-streaming budget, refit from a
PyTorch model) (issue #13).

The TensorRT Python API followed is TensorRT 10's (``docs.nvidia.com/deeplearning/tensorrt``: "Python API",
"Refitting an Engine", "Weight Streaming", "Working with Dynamic Shapes") and the bindings of TensorRT 11.1
(``NVIDIA/TensorRT`` ``python/src/infer/pyCore.cpp``). TensorRT 10.1 or newer is needed (the V2
weight-streaming API); 11.x works with the same calls.

Precision. Networks are created ``STRONGLY_TYPED`` (``1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)``;
required for weight streaming in 10.x, always on in 11.x where the flag is ignored): every tensor has the type
the ONNX graph gives it, and the builder flags ``FP16`` / ``BF16`` / ``FP8`` do not apply (TensorRT 11 removed
them). So ``precision`` is chosen at export and only checked here:

- ``"fp32"`` / ``"fp16"`` / ``"bf16"``: the graph's weights must be float32 / float16 / bfloat16 (export with
  ``fastgen.export.to_onnx(..., dtype=torch.float16)`` etc.). ``"fp32"`` also clears ``BuilderFlag.TF32``, so
  fp32 means fp32 (TensorRT allows TF32 by default).
- ``"fp8"``: the graph must carry explicit FP8 quantization (``QuantizeLinear`` / ``DequantizeLinear`` pairs to
  ``FLOAT8E4M3FN``, e.g. from NVIDIA ModelOpt). fastgen's ``to_onnx`` does not quantize: fp8 engines from its
  exports are not supported, and ``build_engine`` says so.

Engine cache. An engine is valid for one TensorRT version and one GPU compute capability (TensorRT's default,
no hardware or version compatibility mode). Each engine file ``X.engine`` has a JSON sidecar ``X.engine.json``
holding the cache key (a SHA-256 over the ONNX bytes, external data included, the model class and config, the
profiles, the precision, the build flags, the compute capability and the TensorRT version), the versions, the
engine's size and SHA-256. Both are written atomically (a temporary file in the same folder, then
``os.replace``): a crash mid-write leaves the previous file or none, never a partial one, and its temporary
file is removed by the next write of the same target once its writer is known dead (``remove_stale_temps``).
Loading checks every sidecar field it reads, the sidecar against this machine and the engine bytes (read once:
the bytes hashed are the bytes deserialized) against their hash, and refuses anything else with
``StaleEngineError``; ``build_engine`` rebuilds over a stale cache entry. Exports of a model on the meta device
(weights as graph inputs) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from fastgen.export.onnx import _ARCHES, read_metadata
from fastgen.export.runtime import ExportedDenoiser, TensorSpec, _symbol

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
MIN_VERSION = (10, 1)  # weight_streaming_budget_v2 and streamable_weights_size appear in 10.1
FORMAT = "fastgen-tensorrt-engine"
SCHEMA = 2  # 2: the export's symbol ranges ("symbols"), which the runtime checks calls against
SIDECAR_SUFFIX = ".json"  # X.engine -> X.engine.json

_INSTALL = ("TensorRT is not installed (or its libraries do not load): pip install tensorrt, or pip install "
            "'fastgen[tensorrt]'. It needs an NVIDIA GPU and driver (TensorRT 10.1 or newer; the wheels bring "
            "libnvinfer for CUDA 12 / 13).")

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


class StaleEngineError(RuntimeError):
    """An engine file that must not be loaded here: built for another GPU or TensorRT version, for other
    ONNX bytes or settings, changed since it was written, or not written by fastgen (no sidecar)."""


# --------------------------------------------------------------------------------------------
# TensorRT, the GPU
# --------------------------------------------------------------------------------------------


def _trt():
    """The ``tensorrt`` module, imported on first use so that ``import fastgen.export`` never needs it."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the bindings are there but libnvinfer is not
        raise ImportError(_INSTALL) from e
    version = _version_tuple(tensorrt.__version__)
    if version[:2] < MIN_VERSION:
        raise ImportError(f"fastgen needs TensorRT {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer, found "
                          f"{tensorrt.__version__}: pip install -U tensorrt")
    return tensorrt


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def tensorrt_version() -> str:
    """The installed TensorRT's version string (``tensorrt.__version__``). Raises ``ImportError`` (saying how to
    install it) where TensorRT is missing or older than 10.1."""
    return _trt().__version__


def operator_target(version: str) -> str:
    """The ``fastgen.export.operators`` target for TensorRT ``version``: the newest release with operator data
    that is not newer than ``version`` (11.x uses the newest 10.x table). Raises ``ValueError`` for a version
    older than every table."""
    from fastgen.export.operators import tensorrt_releases

    have = _version_tuple(version)
    fits = [r for r in tensorrt_releases() if _version_tuple(r) <= have[:len(_version_tuple(r))]]
    if not fits:
        raise ValueError(f"no operator data for TensorRT {version}; the tables cover {tensorrt_releases()}")
    return "tensorrt-" + max(fits, key=_version_tuple)


def compute_capability(device: torch.device | str | int | None = None) -> str:
    """The CUDA compute capability of ``device`` (default: the current one) as ``"major.minor"``, e.g.
    ``"9.0"`` for an H100: what a TensorRT engine is specific to. Raises ``RuntimeError`` without a CUDA GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need an NVIDIA GPU, and torch sees none here (torch.cuda.is_available() "
                           "is False)")
    index = torch.device(device).index if isinstance(device, (str, torch.device)) else device
    return "%d.%d" % torch.cuda.get_device_capability(index)


def default_cache_dir() -> Path:
    """Where engines go without an ``engine_path``: ``$FASTGEN_CACHE_DIR/engines``, by default
    ``$XDG_CACHE_HOME/fastgen/engines`` or ``~/.cache/fastgen/engines`` (the folder of fastgen's other caches)."""
    from fastgen.ops.autotune import cache_path

    return cache_path().parent / "engines"


# --------------------------------------------------------------------------------------------
# The ONNX graph: inputs, symbolic dimensions, precision
# --------------------------------------------------------------------------------------------

# ONNX TensorProto element types -> torch
_ONNX_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 11: torch.float64, 17: torch.float8_e4m3fn,
               7: torch.int64, 6: torch.int32, 3: torch.int8, 2: torch.uint8, 9: torch.bool}
_FLOAT8 = {17, 18, 19, 20}  # FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ
_PRECISION_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _refuse_meta_export(onnx_path) -> None:
    """Raise ``ValueError`` for an export of a model on the meta device (``to_onnx`` metadata
    ``fastgen.weights`` = "false"): its graph takes every weight as an input, so no engine of it computes
    anything."""
    props = {p.key: p.value for p in _load_graph(onnx_path).metadata_props}
    if str(props.get("fastgen.weights", "true")).strip().lower() in ("false", "0", "no"):
        raise ValueError(f"{onnx_path} was exported from the meta device: its weights are graph inputs; export "
                         "the model with its weights (fastgen.export.to_onnx of the model on a real device) to "
                         "build a TensorRT engine")


def _load_graph(onnx_path):
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)  # the graph: weights are not needed


def graph_io(onnx_path) -> tuple[dict[str, tuple[int | str, ...]], dict[str, tuple[int | str, ...]]]:
    """(inputs, outputs) of the graph at ``onnx_path`` in order: name -> dimensions (``int`` static, ``str``
    symbolic, e.g. ``"batch"``, ``"2*height"``)."""
    proto = _load_graph(onnx_path)
    inits = {i.name for i in proto.graph.initializer}

    def dims(values):
        return {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
                for v in values if v.name not in inits}

    return dims(proto.graph.input), dims(proto.graph.output)


def graph_inputs(onnx_path) -> dict[str, tuple[int | str, ...]]:
    """The inputs of ``graph_io``."""
    return graph_io(onnx_path)[0]


def _dim(d: int | str) -> tuple[int, str | None]:
    """A dimension as (coefficient, symbol): 4 -> (4, None), "batch" -> (1, "batch"), "2*height" -> (2, "height")
    (torch.onnx's names for step * Dim). Other expressions stay one opaque symbol (checked for consistency,
    not for range)."""
    if isinstance(d, int):
        return d, None
    sym, step = _symbol(d)
    return step, sym


_VAE_FRAMES = 4  # video frames per latent frame after the first (Wan's and HunyuanVideo's VAEs)


def _arch(meta: dict):
    """The export's own per-architecture facts (pixels per spatial step, frame step) for its metadata."""
    from diffusers.configuration_utils import FrozenDict

    arch = _ARCHES.get(meta["class"])
    if arch is None:
        raise ValueError(f"unknown model class {meta['class']!r} in the export's metadata")
    return arch(SimpleNamespace(config=FrozenDict(meta["config"])))


def symbol_ranges(onnx_path) -> dict[str, tuple[int, int | None]]:
    """The range of each symbolic dimension of a ``to_onnx`` export, from its metadata, in the graph's own units:
    ``batch`` (items), ``height`` / ``width`` (spatial steps of the model: pixels / its pixel step),
    ``image_tokens`` (Flux: height steps x width steps), ``latent_frames`` (video: frame steps),
    ``text_tokens`` (1 and up). ``None``: no upper bound. Symbols not listed have no range check.
    Raises ``ValueError`` for a file ``to_onnx`` did not write."""
    meta = read_metadata(onnx_path)
    arch = _arch(meta)
    rng = meta["ranges"]

    def steps(v, step):
        return None if v is None else v // step

    (hlo, hhi), (wlo, whi) = rng["height"], rng["width"]
    out = {"batch": tuple(rng["batch"]), "height": (steps(hlo, arch.px_step), steps(hhi, arch.px_step)),
           "width": (steps(wlo, arch.px_step), steps(whi, arch.px_step)), "text_tokens": (1, None)}
    if meta["architecture"] == "flux":
        hi = None if hhi is None or whi is None else out["height"][1] * out["width"][1]
        out["image_tokens"] = (out["height"][0] * out["width"][0], hi)
    if "frames" in rng:
        out["latent_frames"] = tuple(None if f is None else _frame_units(f, arch) for f in rng["frames"])
    return out


def _frame_units(frames: int, arch) -> int:
    """Video frames (4k + 1) -> the model's frame steps: (frames - 1) / 4 + 1 latent frames, per frame step."""
    latent = (frames - 1) // _VAE_FRAMES + 1
    if (frames - 1) % _VAE_FRAMES or latent % arch.frame_step:
        raise ValueError(f"frames must be 4k + 1 with (k + 1) a multiple of {arch.frame_step} for this model, got "
                         f"{frames}")
    return latent // arch.frame_step


def _triple(name: str, value, step: int = 1) -> tuple[int, int, int]:
    """A user range -> (min, opt, max): an int (fixed), (min, max) (opt = max: kernels are tuned for the largest
    shape) or (min, opt, max); multiples of ``step``."""
    if isinstance(value, int) and not isinstance(value, bool):
        t = (value, value, value)
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        t = (value[0], value[1], value[1]) if len(value) == 2 else tuple(value)
    else:
        raise ValueError(f"{name} must be an int, (min, max) or (min, opt, max), got {value!r}")
    if not 1 <= t[0] <= t[1] <= t[2]:
        raise ValueError(f"{name} must satisfy 1 <= min <= opt <= max, got {value!r}")
    if any(v % step for v in t):
        raise ValueError(f"{name} must be multiples of {step} for this model, got {value!r}")
    return t


def make_profile(onnx_path, *, batch=None, height=None, width=None, frames=None, text_tokens=None,
                 **dims) -> Profile:
    """One optimization profile for a ``to_onnx`` export: input name -> (min, opt, max) shapes.

    Each argument is an int (fixed), ``(min, max)`` (opt = max) or ``(min, opt, max)``: ``batch`` in items,
    ``height`` / ``width`` in pixels (multiples of the model's pixel step: Flux 16), ``frames`` in video frames
    (video models; 4k + 1), ``text_tokens`` in tokens. ``None`` takes the export's declared range (``to_onnx``'s
    ``batch`` / ``height`` / ``width`` / ``frames``) and fails where that range has no upper bound, and for
    ``text_tokens`` whenever the graph's text length is dynamic (exports leave it unbounded: say what your
    prompts use, e.g. 512 for Flux-dev's T5). ``dims``: any other symbolic dimension of the graph by its name,
    in graph units (e.g. ``image_tokens=257`` for Wan I2V's CLIP image tokens).

    The result is checked with ``validate_profiles`` against the graph and its declared ranges.
    Raises ``ValueError`` naming the argument and the fix.
    """
    meta = read_metadata(onnx_path)
    arch = _arch(meta)
    inputs = graph_inputs(onnx_path)
    symbols = {s for shape in inputs.values() for _, s in map(_dim, shape) if s is not None}
    rng = meta["ranges"]

    def pick(name, value, unit_step=1):
        if value is not None:
            return _triple(name, value, unit_step)
        lo, hi = rng[name]
        if hi is None:
            raise ValueError(f"{name} has no upper bound in this export: pass {name}=(min, opt, max)")
        return lo, hi, hi

    values = {"batch": pick("batch", batch),
              "height": tuple(v // arch.px_step for v in pick("height", height, arch.px_step)),
              "width": tuple(v // arch.px_step for v in pick("width", width, arch.px_step))}
    if meta["architecture"] == "flux":  # packed tokens: one dimension of (height/16) * (width/16)
        values["image_tokens"] = tuple(h * w for h, w in zip(values["height"], values["width"]))
    if "latent_frames" in symbols:
        values["latent_frames"] = tuple(_frame_units(f, arch) for f in pick("frames", frames))
    elif frames is not None:
        raise ValueError(f"frames applies to video exports; this is {meta['class']}")
    if "text_tokens" in symbols:
        if text_tokens is None:
            raise ValueError("text_tokens is dynamic in this graph: pass text_tokens=(min, opt, max), e.g. (1, 512, "
                             "512) for Flux-dev's T5 prompts")
        values["text_tokens"] = _triple("text_tokens", text_tokens)
    for name, value in dims.items():
        if name not in symbols:
            raise ValueError(f"{name} is not a dimension of this graph (its symbols: {sorted(symbols)})")
        values[name] = _triple(name, value)
    unknown = symbols - set(values)
    if unknown:
        raise ValueError(f"pass the graph's dimensions {sorted(unknown)} to make_profile by name, e.g. "
                         f"{sorted(unknown)[0]}=(min, opt, max)")
    profile = {name: tuple(tuple(c * values[sym][i] if sym else c for c, sym in map(_dim, shape)) for i in range(3))
               for name, shape in inputs.items()}
    return validate_profiles(inputs, [profile], symbol_ranges(onnx_path))[0]


def validate_profiles(inputs: dict[str, tuple[int | str, ...]], profiles,
                      ranges: dict[str, tuple[int, int | None]] | None = None) -> list[Profile]:
    """Check optimization profiles against a graph's dimensions; return them normalized (tuples of ints, every
    input present, static inputs filled in).

    - ``inputs``: input name -> dimensions, as ``graph_inputs`` gives them.
    - ``profiles``: one profile or a list; a profile maps input name -> ``(min, opt, max)`` shapes. Inputs with
      only static dimensions may be left out.
    - ``ranges``: symbol -> (min, max or None), as ``symbol_ranges`` gives them; None: no range check.

    The rules (TensorRT's ``IOptimizationProfile.set_shape`` and the graph's own): the shapes have the input's
    rank; a static dimension has min = opt = max = its size; 0 <= min <= opt <= max; a symbolic dimension
    ``k*s`` is a multiple of ``k``, and the value of ``s`` it implies is the same in every input that uses ``s``
    (e.g. ``batch`` in all of them), separately for min, opt and max, and inside ``ranges[s]``.
    Pure: no TensorRT needed. Raises ``ValueError`` naming the input, the dimension and the rule.
    """
    if isinstance(profiles, dict):
        profiles = [profiles]
    if not profiles:
        raise ValueError("profiles is empty: give at least one {input: (min, opt, max)} profile")
    out = []
    for p, profile in enumerate(profiles):
        if not isinstance(profile, dict):
            raise ValueError(f"profile {p} must be a dict of input name -> (min, opt, max), got "
                             f"{type(profile).__name__}")
        unknown = set(profile) - set(inputs)
        if unknown:
            raise ValueError(f"profile {p} names {sorted(unknown)}, which are not graph inputs ({list(inputs)})")
        norm: Profile = {}
        seen: list[dict[str, tuple[int, str]]] = [{}, {}, {}]  # per min/opt/max: symbol -> (value, where)
        for name, dims in inputs.items():
            if name not in profile:
                if any(isinstance(d, str) for d in dims):
                    raise ValueError(f"profile {p} lacks {name!r}, whose dimensions {dims} are dynamic")
                norm[name] = (tuple(dims),) * 3
                continue
            try:
                shapes = tuple(tuple(int(v) for v in s) for s in profile[name])
            except (TypeError, ValueError):
                raise ValueError(f"profile {p}: {name!r} must be (min, opt, max) shapes, got {profile[name]!r}") \
                    from None
            if len(shapes) != 3 or any(len(s) != len(dims) for s in shapes):
                raise ValueError(f"profile {p}: {name!r} needs 3 shapes (min, opt, max) of rank {len(dims)} "
                                 f"{dims}, got {profile[name]!r}")
            for j, d in enumerate(dims):
                lo, mid, hi = (s[j] for s in shapes)
                where = f"profile {p}: {name!r} dimension {j} ({d})"
                if not 0 <= lo <= mid <= hi:
                    raise ValueError(f"{where} must satisfy 0 <= min <= opt <= max, got {(lo, mid, hi)}")
                coef, sym = _dim(d)
                if sym is None:
                    if (lo, mid, hi) != (d, d, d):
                        raise ValueError(f"{where} is static: min = opt = max = {d}, got {(lo, mid, hi)}")
                    continue
                for k, v in enumerate((lo, mid, hi)):
                    if v % coef:
                        raise ValueError(f"{where} must be a multiple of {coef}, got {v}")
                    value, first = v // coef, seen[k].get(sym)
                    if first is not None and first[0] != value:
                        raise ValueError(f"{where} gives {sym} = {value} at {('min', 'opt', 'max')[k]}, but {first[1]} "
                                         f"gives {sym} = {first[0]}: inputs sharing {sym} must agree")
                    seen[k][sym] = (value, where)
                    r = (ranges or {}).get(sym)
                    if r is not None and (value < r[0] or (r[1] is not None and value > r[1])):
                        raise ValueError(f"{where}: {sym} = {value} is outside the export's range {r[0]}..."
                                         f"{'' if r[1] is None else r[1]}")
            norm[name] = shapes
        out.append(norm)
    return out


def _check_precision(proto, precision: str) -> None:
    """The graph's weights must already be in ``precision`` (strongly typed networks keep the graph's types)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8":
        fp8 = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node) and (
            any(i.data_type in _FLOAT8 for i in proto.graph.initializer)
            or any(a.name == "output_dtype" and a.i in _FLOAT8 for n in proto.graph.node for a in n.attribute))
        if not fp8:
            raise ValueError("precision='fp8' needs a graph with explicit FP8 quantization (QuantizeLinear / "
                             "DequantizeLinear to FLOAT8E4M3FN, e.g. from NVIDIA ModelOpt); fastgen's to_onnx does "
                             "not quantize, and TensorRT's FP8 builder flag does not apply to strongly typed "
                             "networks (it is gone in TensorRT 11). Build 'fp16' or 'bf16' from an export in that "
                             "dtype instead")
        return
    weights: dict[int, int] = {}
    for i in proto.graph.initializer:
        if i.data_type in _ONNX_TORCH and _ONNX_TORCH[i.data_type].is_floating_point:
            weights[i.data_type] = weights.get(i.data_type, 0) + _numel(i.dims)
    if not weights:
        return
    main = _ONNX_TORCH[max(weights, key=weights.get)]
    want = _PRECISION_DTYPE[precision]
    if main != want:
        raise ValueError(f"precision={precision!r} but the graph's weights are {str(main).removeprefix('torch.')}: "
                         "TensorRT builds strongly typed networks in the graph's own types, so export in the dtype "
                         f"you want (fastgen.export.to_onnx(..., dtype=torch.{str(want).removeprefix('torch.')})) or "
                         f"pass precision={[k for k, v in _PRECISION_DTYPE.items() if v == main][0]!r}")


# --------------------------------------------------------------------------------------------
# Hashes, keys, atomic files
# --------------------------------------------------------------------------------------------

_CHUNK = 16 << 20


def onnx_files(onnx_path) -> list[Path]:
    """The ``.onnx`` file and the external data files its initializers point to (sorted, each once)."""
    path = Path(onnx_path)
    proto = _load_graph(path)
    extra = set()
    for init in proto.graph.initializer:
        if init.data_location == 1:  # TensorProto.EXTERNAL
            loc = {e.key: e.value for e in init.external_data}.get("location")
            if loc:
                extra.add(loc)
    return [path] + [path.parent / loc for loc in sorted(extra)]


def hash_onnx(onnx_path) -> str:
    """SHA-256 (hex) of the ONNX model: the graph file, then each external data file (their names are in the
    graph), each after its size, streamed in 16 MiB chunks (a 24 GB Flux-dev export never sits in memory)."""
    h = hashlib.sha256()
    for f in onnx_files(onnx_path):
        h.update(f.stat().st_size.to_bytes(8, "little"))
        _hash_file(f, h)
    return h.hexdigest()


def _hash_file(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h


def engine_key(*, onnx_sha256: str, model_class: str, config: dict, profiles: list[Profile], precision: str,
               flags: dict, compute_capability: str, tensorrt_version: str) -> str:
    """The cache key of an engine (SHA-256 hex) over everything that changes it: the ONNX bytes (by hash), the
    model class and config, the profiles, the precision, the build flags (refit, weight streaming, workspace),
    the GPU compute capability and the TensorRT version. Pure."""
    doc = {"schema": SCHEMA, "onnx": onnx_sha256, "class": model_class, "config": config,
           "profiles": [{k: [list(s) for s in v] for k, v in sorted(p.items())} for p in profiles],
           "precision": precision, "flags": flags, "cc": compute_capability, "tensorrt": tensorrt_version}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


STALE_TEMP_SECONDS = 3600  # a temporary file of a write untouched this long is a crashed writer's


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's live process (or a platform without signal 0)
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Remove the temporary files that crashed ``atomic_write`` calls for ``path`` left beside it; returns them.

    ``atomic_write`` names its temporary file ``.<name>.<host>.<pid>.<random>.tmp``. One is stale, and removed,
    when its writer is dead: written on this host (a pid means nothing across hosts on a shared folder) by a pid
    that no longer exists, or, any host, not modified for ``STALE_TEMP_SECONDS`` (an hour: a live writer
    modifies it continuously while it writes, then renames it within moments; a pid reused since the crash is
    covered by this age rule too). Temporary files of other targets and of live writers are left alone; an
    error removing one (another process removed it first) is ignored."""
    path = Path(path)
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.(?:(?P<host>[^.]*)\.(?P<pid>\d+)\.)?[^.]+\.tmp")
    host, now, removed = _host(), time.time(), []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if not m or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                dead = m["pid"] is not None and m["host"] == host and not _pid_alive(int(m["pid"]))
                if dead or now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def atomic_write(path, data) -> None:
    """Write ``data`` (bytes-like; TensorRT's ``IHostMemory`` is one) to ``path`` so that ``path`` is either its
    old content or all of ``data``: a temporary file in the same folder (same filesystem, so the rename is
    atomic), flushed and fsynced, then ``os.replace``. On any error the temporary file is removed; temporary
    files of ``path`` that a killed writer left behind are removed first (``remove_stale_temps``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data).cast("B")
            for start in range(0, len(view), _CHUNK):
                f.write(view[start:start + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sidecar_path(engine_path) -> Path:
    """``X.engine`` -> ``X.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def read_sidecar(engine_path) -> dict:
    """The sidecar of ``engine_path`` as a dict. Raises ``StaleEngineError`` where it is missing or not
    fastgen's (a foreign engine)."""
    side = sidecar_path(engine_path)
    try:
        doc = json.loads(side.read_text())
    except FileNotFoundError:
        raise StaleEngineError(f"{engine_path} has no sidecar {side.name}: it was not built by "
                               "fastgen.export.build_engine (or its write did not finish); rebuild it") from None
    except (OSError, ValueError) as e:
        raise StaleEngineError(f"{side} is unreadable ({e}); rebuild the engine") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("schema") != SCHEMA:
        raise StaleEngineError(f"{side} is not a {FORMAT} schema {SCHEMA} sidecar; rebuild the engine")
    bad = _sidecar_problems(doc)
    if bad:
        raise StaleEngineError(f"{side} is damaged: {'; '.join(bad[:4])}; rebuild the engine (build_engine "
                               "rebuilds over it)")
    return doc


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_dims(v) -> bool:
    return isinstance(v, list) and all(_is_int(d) or _is_str(d) for d in v)


def _is_range(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(x is None or _is_int(x) for x in v)


def _is_dtype(v) -> bool:
    return _is_str(v) and isinstance(getattr(torch, v, None), torch.dtype)


def _is_profiles(v) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(p, dict) and all(isinstance(s, list) and len(s) == 3 and all(_is_dims(x) for x in s)
                                    for s in p.values()) for p in v)


# Every sidecar field something reads (check_engine, TensorRTDenoiser, refit_from) and what it must be.
_SIDECAR_FIELDS = {
    "key": _is_str, "tensorrt": _is_str, "compute_capability": _is_str, "precision": lambda v: v in PRECISIONS,
    "flags": lambda v: isinstance(v, dict) and isinstance(v.get("refit"), bool)
    and isinstance(v.get("weight_streaming"), bool),
    "profiles": _is_profiles, "onnx_path": _is_str, "onnx_sha256": _is_str, "class": _is_str,
    "architecture": _is_str, "config": lambda v: isinstance(v, dict),
    "inputs": lambda v: isinstance(v, list) and bool(v) and all(map(_is_str, v)), "output": _is_str,
    "graph_inputs": lambda v: isinstance(v, dict) and all(map(_is_dims, v.values())),
    "graph_outputs": lambda v: isinstance(v, dict) and all(map(_is_dims, v.values())),
    "dtype": _is_dtype, "ranges": lambda v: isinstance(v, dict) and all(map(_is_range, v.values())),
    "symbols": lambda v: isinstance(v, dict) and all(map(_is_range, v.values())),
    "engine_bytes": lambda v: _is_int(v) and v >= 0, "engine_sha256": _is_str,
    "fastgen_version": _is_str,
}


def _sidecar_problems(doc: dict) -> list[str]:
    """What is wrong with a sidecar's fields (empty: every field the loader reads is there and well formed)."""
    bad = [f"{k} is {'missing' if k not in doc else 'malformed: ' + repr(doc[k])[:60]}"
           for k, ok in _SIDECAR_FIELDS.items() if k not in doc or not ok(doc[k])]
    if not bad:
        if not set(doc["inputs"]) <= set(doc["graph_inputs"]):
            bad.append(f"inputs {doc['inputs']} are not all in graph_inputs {sorted(doc['graph_inputs'])}")
        if doc["output"] not in doc["graph_outputs"]:
            bad.append(f"output {doc['output']!r} is not in graph_outputs {sorted(doc['graph_outputs'])}")
    return bad


def check_engine(engine_path, *, key: str | None = None, tensorrt_version: str | None = None,
                 capability: str | None = None, verify_bytes: bool = True) -> dict:
    """Whether ``engine_path`` may be loaded here; returns its sidecar.

    Compared: the sidecar's TensorRT version with ``tensorrt_version`` (default: the installed one), its compute
    capability with ``capability`` (default: the current GPU's), its key with ``key`` where given, the engine's
    size and (with ``verify_bytes``, default) its SHA-256 with the sidecar's. Raises ``StaleEngineError`` listing
    every mismatch and what to do; ``ImportError`` / ``RuntimeError`` without TensorRT / a GPU when the defaults
    must be read.
    """
    return _check_engine(engine_path, key=key, tensorrt_version=tensorrt_version, capability=capability,
                         verify_bytes=verify_bytes)[0]


def _check_engine(engine_path, *, key=None, tensorrt_version=None, capability=None, verify_bytes=True,
                  read=False) -> tuple[dict, bytes | None]:
    """``check_engine``, and with ``read`` the engine's bytes as checked: read once, so that what is
    deserialized is what was hashed (a concurrent ``os.replace`` of the file cannot slip in between)."""
    engine_path = Path(engine_path)
    doc = read_sidecar(engine_path)
    data = None
    try:
        if read:
            data = engine_path.read_bytes()
        elif not engine_path.is_file():
            raise FileNotFoundError(engine_path)
    except (FileNotFoundError, IsADirectoryError):
        raise StaleEngineError(f"{engine_path} is missing (its sidecar is there): rebuild it") from None
    tensorrt_version = tensorrt_version or _trt().__version__
    capability = capability or compute_capability()
    problems = []
    if doc.get("tensorrt") != tensorrt_version:
        problems.append(f"built with TensorRT {doc.get('tensorrt')}, this is {tensorrt_version}")
    if doc.get("compute_capability") != capability:
        problems.append(f"built for compute capability {doc.get('compute_capability')}, this GPU is {capability}")
    if key is not None and doc.get("key") != key:
        problems.append("built from other ONNX bytes or settings (cache key differs)")
    size = len(data) if data is not None else engine_path.stat().st_size
    if size != doc.get("engine_bytes"):
        problems.append(f"the engine file has {size} bytes, its sidecar says {doc.get('engine_bytes')}")
    elif verify_bytes and (hashlib.sha256(data) if data is not None else _hash_file(engine_path)).hexdigest() \
            != doc.get("engine_sha256"):
        problems.append("the engine file's SHA-256 differs from its sidecar's (changed or replaced since written)")
    if problems:
        raise StaleEngineError(f"{engine_path} must not be loaded here: " + "; ".join(problems)
                               + ". Rebuild it with fastgen.export.build_engine (a cached engine is rebuilt "
                               "automatically).")
    return doc, data


# --------------------------------------------------------------------------------------------
# Timing cache
# --------------------------------------------------------------------------------------------


def _timing_cache(config, path: Path | None):
    """Attach a timing cache to ``config``: the file's if it loads and matches this device, else a new one.
    The returned object must live until the build ends (TensorRT's ``set_timing_cache`` contract)."""
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another device or TensorRT version: its header does not verify. Start afresh and
        # overwrite it after the build rather than fail the build.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


@dataclass
class EngineBuild:
    """What ``build_engine`` produced: the engine file, its sidecar (a dict), whether it came from the cache,
    and seconds spent building (0 for a cache hit)."""

    path: Path
    sidecar: dict
    cached: bool
    build_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def build_engine(onnx_path, engine_path=None, *, precision: str = "fp16", profiles=None, batch=None, height=None,
                 width=None, frames=None, text_tokens=None, timing_cache=None, weight_streaming: bool = False,
                 refittable: bool = False, workspace: int | None = None, cache_dir=None, rebuild: bool = False,
                 target: str | None = None, **dims) -> EngineBuild:
    """Build a TensorRT engine from a ``fastgen.export.to_onnx`` export (or reuse the cached one).

    - ``onnx_path``: the ``.onnx`` file (external data beside it is read by TensorRT's parser).
    - ``engine_path``: where to write the engine (its sidecar goes to ``<engine_path>.json``); None (default):
      the engine cache, ``cache_dir`` or ``default_cache_dir()``, file ``<class>-<precision>-<key>.engine``.
      Either way an existing engine whose sidecar matches this build's key, this TensorRT and this GPU is
      reused without building (``rebuild=True`` forces a build); a stale one is rebuilt over.
    - ``precision``: ``"fp16"`` (default), ``"bf16"``, ``"fp32"`` or ``"fp8"``; checked against the graph, not
      applied (strongly typed networks; see the module doc).
    - ``profiles``: optimization profiles, each ``{input: (min, opt, max) shapes}``, checked by
      ``validate_profiles``. None (default): one profile from ``make_profile(onnx_path, batch=, height=,
      width=, frames=, text_tokens=, **dims)`` (items / pixels / video frames / tokens; see there).
    - ``timing_cache``: a file to load the timing cache from (if present and valid for this GPU) and save it
      back to after the build (atomically); None: no file.
    - ``weight_streaming``: ``BuilderFlag.WEIGHT_STREAMING``: the weights may stay in host memory and stream in
      (``TensorRTDenoiser.load(weight_streaming_budget=...)``).
    - ``refittable``: ``BuilderFlag.REFIT``: weights can be replaced after the build
      (``TensorRTDenoiser.refit_from``).
    - ``workspace``: the workspace memory pool limit in bytes (``MemoryPoolType.WORKSPACE``); None: TensorRT's
      default (the device's memory).
    - ``target``: the operator table to check the graph against before building (``fastgen.export.operators``);
      None: the installed TensorRT's (``operator_target``).

    Returns an ``EngineBuild``. Raises ``ImportError`` without TensorRT (saying how to install it),
    ``RuntimeError`` without a GPU or when TensorRT's parser or builder fails (with its errors),
    ``ValueError`` for a precision the graph is not in, profiles that do not fit the graph, or nodes the
    target TensorRT cannot parse (named).
    """
    onnx_path = Path(onnx_path)
    _refuse_meta_export(onnx_path)
    trt = _trt()
    from fastgen.export.operators import require_supported

    meta = read_metadata(onnx_path)
    proto = _load_graph(onnx_path)
    _check_precision(proto, precision)
    inputs, outputs = graph_io(onnx_path)
    if profiles is None:
        profiles = [make_profile(onnx_path, batch=batch, height=height, width=width, frames=frames,
                                 text_tokens=text_tokens, **dims)]
    elif dims or any(v is not None for v in (batch, height, width, frames, text_tokens)):
        raise ValueError("pass either profiles or batch / height / width / frames / text_tokens, not both")
    profiles = validate_profiles(inputs, profiles, symbol_ranges(onnx_path))
    if workspace is not None and (not isinstance(workspace, int) or isinstance(workspace, bool) or workspace <= 0):
        raise ValueError(f"workspace must be a positive number of bytes, got {workspace!r}")
    version = trt.__version__
    require_supported(proto, target or operator_target(version))

    capability = compute_capability()
    flags = {"refit": bool(refittable), "weight_streaming": bool(weight_streaming), "workspace": workspace,
             "tf32": precision != "fp32"}
    onnx_sha = hash_onnx(onnx_path)
    key = engine_key(onnx_sha256=onnx_sha, model_class=meta["class"], config=meta["config"], profiles=profiles,
                     precision=precision, flags=flags, compute_capability=capability, tensorrt_version=version)
    if engine_path is None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        engine_path = root / f"{meta['class']}-{precision}-{key[:32]}.engine"
    engine_path = Path(engine_path)
    result = EngineBuild(engine_path, {}, cached=False)
    if not rebuild and engine_path.exists():
        try:
            result.sidecar = check_engine(engine_path, key=key, tensorrt_version=version, capability=capability)
            result.cached = True
            return result
        except StaleEngineError as e:
            result.warnings.append(str(e))  # rebuilt below, over the stale one

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(inputs):
        raise RuntimeError(f"TensorRT's network inputs {sorted(names)} differ from the graph's {sorted(inputs)}")
    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, mid, hi) in p.items():
            prof.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(prof)
    timing_path = Path(timing_cache) if timing_cache is not None else None
    cache = _timing_cache(config, timing_path) if timing_path is not None else None
    host = builder.build_serialized_network(network, config)
    if host is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}; its log above says why")
    if cache is not None:
        atomic_write(timing_path, config.get_timing_cache().serialize())
    data = memoryview(host).cast("B")
    result.build_seconds = time.perf_counter() - start
    result.sidecar = {
        "format": FORMAT, "schema": SCHEMA, "key": key, "tensorrt": version, "compute_capability": capability,
        "precision": precision, "flags": flags,
        "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
        "onnx_path": str(onnx_path.resolve()), "onnx_sha256": onnx_sha, "fastgen_version": meta["version"],
        "class": meta["class"], "architecture": meta["architecture"], "config": meta["config"],
        "inputs": meta["inputs"], "output": meta["output"], "graph_inputs": inputs, "graph_outputs": outputs,
        "dtype": str(meta["dtype"]).removeprefix("torch."), "ranges": meta["ranges"], "symbols": meta["symbols"],
        "engine_bytes": len(data), "engine_sha256": hashlib.sha256(data).hexdigest(),
        "build_seconds": round(result.build_seconds, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # Engine first, sidecar last: a crash between leaves an engine without a (matching) sidecar, which
    # loading refuses and the next build_engine rebuilds.
    atomic_write(engine_path, data)
    atomic_write(sidecar_path(engine_path), json.dumps(result.sidecar, indent=1).encode())
    return result


# --------------------------------------------------------------------------------------------
# Weight streaming budget
# --------------------------------------------------------------------------------------------


MIN_BUDGET_BYTES = 1 << 20  # smaller int budgets (but 0) are refused: 1 is 1 byte, 1.0 is everything


def streaming_budget(value, streamable_bytes: int) -> int:
    """The ``weight_streaming_budget_v2`` for ``value``: an ``int`` is bytes (0, or at least ``MIN_BUDGET_BYTES``
    = 1 MiB: ``1`` would be one byte where ``1.0`` is every weight, so ints from 1 to 1 MiB - 1 are refused as
    the mistake they almost surely are), a ``float`` a fraction in [0, 1] of ``streamable_bytes`` (the
    engine's ``streamable_weights_size``), rounded down. Values at or above ``streamable_bytes`` keep every
    weight on the GPU (no streaming: TensorRT's default); 0 streams the most. Pure. Raises
    ``ValueError`` for other values, and for any budget on an engine with nothing to stream
    (``streamable_bytes`` 0: built without ``weight_streaming=True``)."""
    if streamable_bytes <= 0:
        raise ValueError("this engine has no streamable weights: build it with build_engine(..., "
                         "weight_streaming=True) to set a weight-streaming budget")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"weight_streaming_budget must be bytes (int), a fraction (float in [0, 1]) or 'auto', "
                         f"got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a fractional weight_streaming_budget must be in [0, 1], got {value!r}")
        return int(value * streamable_bytes)
    if value < 0:
        raise ValueError(f"weight_streaming_budget must be >= 0 bytes, got {value}")
    if 0 < value < MIN_BUDGET_BYTES:
        raise ValueError(f"weight_streaming_budget={value} is an int, so bytes: {value} byte(s), which is surely not "
                         f"meant (a fraction is a float: {float(value)!r} = {value:.0%} of the streamable weights). "
                         f"Byte budgets are 0 or at least {MIN_BUDGET_BYTES} (1 MiB)")
    return min(value, streamable_bytes)


# --------------------------------------------------------------------------------------------
# Refit: which model tensor each engine weight holds
# --------------------------------------------------------------------------------------------

# torch.onnx records the FX node each ONNX node came from; torch.export names a parameter's placeholder
# "p_" + its qualified name with dots as underscores ("b_" for buffers).
_FX_NODE = "pkg.torch.onnx.fx_node"
_LINEAR_WEIGHT = re.compile(r"target=torch\.ops\.aten\.linear\.default\]\(args = \(%\w+, %(\w+)")
_REFS = re.compile(r"%([pb]_\w+)")
_PARAM_PREFIX = "model."  # to_onnx's wrapper: the model's parameter <key> is initializer "model.<key>"


@dataclass(frozen=True)
class WeightSource:
    """Where one engine weight (an ONNX initializer) gets its value at a refit: ``key`` of the model's state
    dict (``transpose``: as its 2-D transpose), or ``key`` None: a constant of the graph (its ONNX value)."""

    key: str | None
    transpose: bool = False


def refit_sources(proto, shapes) -> dict[str, WeightSource]:
    """For each initializer of the ONNX graph ``proto`` (a ``to_onnx`` export): which tensor of a model with
    state-dict shapes ``shapes`` (key -> shape) it holds.

    - An initializer named after a state-dict entry (``model.<key>``: the export's wrapper) holds it.
    - torch.onnx's optimizer folds a ``Linear`` weight that feeds ``MatMul`` (3-D inputs) into a new
      initializer ``val_N`` = its transpose: found through the FX node recorded on the consumers
      (``aten.linear``, weight argument) and mapped back as a transpose.
    - Anything else is a constant of the graph (rotary tables, LayerNorm ones, epsilons).

    Refuses (``ValueError``, naming them) what a refit could not set right: an initializer folded from a
    parameter in another way (e.g. UNet GroupNorm weights reshaped to [C, 1, 1], which the optimizer also
    shares between parameters of equal values), and a parameter the graph uses that no initializer holds.
    Pure (needs ``onnx`` only for the proto).
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    inits = {i.name: i for i in proto.graph.initializer}
    # Every initializer named after a parameter of the exported model (to_onnx keeps each as
    # "model.<key>", untransposed, unshared) must be in the given state dict with its shape: one missing
    # is a model of another architecture or a state dict lacking it, never a "graph constant" (which
    # would silently keep the engine's old values).
    missing = sorted(n for n in inits if n.startswith(_PARAM_PREFIX) and n[len(_PARAM_PREFIX):] not in shapes)
    wrong = sorted(f"{n} {list(inits[n].dims)} vs {list(shapes[n[len(_PARAM_PREFIX):]])}" for n in inits
                   if n.startswith(_PARAM_PREFIX) and n[len(_PARAM_PREFIX):] in shapes
                   and tuple(inits[n].dims) != shapes[n[len(_PARAM_PREFIX):]])
    if missing or wrong:
        raise ValueError(
            "the model does not match the exported one: "
            + (f"{len(missing)} engine weight(s) have no tensor in it ({', '.join(missing[:4])}"
               f"{' ...' if len(missing) > 4 else ''})" if missing else "")
            + ("; " if missing and wrong else "")
            + (f"{len(wrong)} differ in shape ({'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''})"
               if wrong else "")
            + ". Refit from a model of the exported architecture and config with every parameter")
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name in inits:
                consumers.setdefault(name, []).append((node, k))

    def fx(node) -> str:
        return next((m.value for m in node.metadata_props if m.key == _FX_NODE), "")

    out: dict[str, WeightSource] = {}
    prefixes: dict[str, int] = {}
    for name, init in inits.items():
        for prefix in ("", name.split(".", 1)[0] + "." if "." in name else None):
            if prefix is not None and name[len(prefix):] in shapes:
                key = name[len(prefix):]
                if tuple(init.dims) != shapes[key]:
                    raise ValueError(f"engine weight {name} has shape {list(init.dims)}, the model's {key} "
                                     f"{list(shapes[key])}: not the exported model's architecture")
                out[name] = WeightSource(key)
                prefixes[prefix] = prefixes.get(prefix, 0) + 1
                break
    prefix = max(prefixes, key=prefixes.get) if prefixes else "model."
    placeholder: dict[str, str] = {}
    for key in shapes:
        flat = (prefix + key).replace(".", "_")
        placeholder["p_" + flat] = placeholder["b_" + flat] = key
    params = {placeholder[r] for node in proto.graph.node for r in _REFS.findall(fx(node))
              if r.startswith("p_") and r in placeholder}

    for name, init in inits.items():
        if name in out:
            continue
        uses = consumers.get(name, [])
        numel = _numel(init.dims)
        weights = {m.group(1) for node, _ in uses for m in [_LINEAR_WEIGHT.search(fx(node))] if m}
        if len(weights) == 1 and all(node.op_type == "MatMul" and k == 1 for node, k in uses):
            key = placeholder.get(weights.pop())
            if key is not None and len(shapes[key]) == 2 and shapes[key][::-1] == tuple(init.dims):
                out[name] = WeightSource(key, transpose=True)
                continue
        folded = sorted({placeholder[r] for node, _ in uses for r in _REFS.findall(fx(node))
                         if r.startswith("p_") and r in placeholder and _numel(shapes[placeholder[r]]) == numel})
        if init.data_type in _ONNX_TORCH and _ONNX_TORCH[init.data_type].is_floating_point and folded:
            raise ValueError(f"engine weight {name} {list(init.dims)} was folded by the ONNX exporter from "
                             f"parameter(s) {folded[:4]} in a way fastgen cannot trace back (only Linear "
                             "transposes are), so a refit could not set it: this export is not refittable "
                             "(to_onnx's optimizer folds UNet GroupNorm weights this way)")
        out[name] = WeightSource(None)
    held = {s.key for s in out.values() if s.key is not None}
    lost = sorted(params - held)
    if lost:
        # Usually the exporter's deduplication: parameters equal at export (e.g. norms still at their
        # initial ones) become one initializer, which a refit cannot split again.
        key = lost[0]
        ref = "%p_" + (prefix + key).replace(".", "_")
        shared = sorted({f"{n} (= {out[n].key})" for node in proto.graph.node if re.search(re.escape(ref) + r"\b",
                         fx(node)) for n in node.input if n in out and out[n].key not in (None, key)})
        raise ValueError(f"the graph uses parameter(s) {lost[:4]}{' ...' if len(lost) > 4 else ''} but no engine "
                         f"weight holds {'them' if len(lost) > 1 else 'it'}"
                         + (f"; {key} is read through {shared[:2]}: the exporter merged parameters that were "
                            "equal at export into one initializer" if shared else "")
                         + ". This export is not refittable: export a model whose parameters differ (trained "
                         "weights do), or rebuild the engine per weight set")
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_LORA = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
_FUSE = ("fuse the LoRA into the base weights first (diffusers: model.fuse_lora(); PEFT: merge_adapter() or "
         "merge_and_unload()), then refit from the model")


def _model_state(model_or_state_dict) -> dict[str, torch.Tensor]:
    """The tensors of a model or state dict by the exported model's keys. PEFT LoRA layers: the base layer's
    ``...to_q.base_layer.weight`` is ``...to_q.weight`` and the adapter tensors are dropped, for a module whose
    adapters are merged (fused) only: a module with an unmerged adapter, or a state dict carrying adapter
    tensors (whose merged state it cannot tell), is refused with ``ValueError``."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        m = model_or_state_dict
        unmerged = sorted(n for n, mod in m.named_modules() if isinstance(getattr(mod, "lora_A", None),
                          torch.nn.ModuleDict) and len(mod.lora_A) and not getattr(mod, "merged", False))
        if unmerged:
            raise ValueError(f"the model has LoRA adapters that are not merged into its weights ({unmerged[:3]}"
                             f"{' ...' if len(unmerged) > 3 else ''}): {_FUSE}")
        state = {**{k: v.detach() for k, v in m.named_buffers()}, **{k: v.detach() for k, v in m.named_parameters()}}
    elif isinstance(model_or_state_dict, dict) or hasattr(model_or_state_dict, "items"):
        state = dict(model_or_state_dict.items())
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"state dict entries {bad[:3]} are not tensors")
        lora = sorted(k for k in state if _LORA.search(k))
        if lora:
            raise ValueError(f"the state dict holds LoRA adapter tensors ({lora[:2]}), and whether they are merged "
                             f"into its base weights cannot be told from a state dict: {_FUSE}")
        state = {k: v.detach() for k, v in state.items()}
    else:
        raise ValueError(f"refit_from takes a torch.nn.Module or a state dict, got "
                         f"{type(model_or_state_dict).__name__}")
    out = {}
    for k, v in state.items():
        if _LORA.search(k):
            continue
        plain = k.replace(".base_layer.", ".")
        if plain in out and plain != k:
            raise ValueError(f"the model has both {plain!r} and {k!r}")
        out[plain] = v
    return out


# --------------------------------------------------------------------------------------------
# The denoiser module
# --------------------------------------------------------------------------------------------


def _trt_dtypes(trt) -> dict:
    """TensorRT DataType -> torch dtype (the members this TensorRT has)."""
    pairs = (("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT32", torch.int32),
             ("INT64", torch.int64), ("INT8", torch.int8), ("UINT8", torch.uint8), ("BOOL", torch.bool),
             ("FP8", torch.float8_e4m3fn))
    return {getattr(trt.DataType, n): t for n, t in pairs if hasattr(trt.DataType, n)}


class _CudaGraphs:
    """Capture with ``torch.cuda.graph`` on ``stream``; the returned ``CUDAGraph`` replays on the current stream."""

    def capture(self, fn, stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        return graph


@dataclass
class _Context:
    """An execution context and what was last set on it (its profile)."""

    context: object
    profile: int = 0


@dataclass
class _Graph:
    """A captured run for one set of input shapes: its context, static input / output buffers, the graph."""

    ctx: _Context
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    graph: object


def _ranges_of(meta_ranges: dict) -> dict:
    return {k: (v[0], v[1]) for k, v in meta_ranges.items()}


class TensorRTDenoiser(ExportedDenoiser):
    """A TensorRT engine built by ``build_engine``, standing in for the diffusers denoiser:
    ``pipe.transformer = TensorRTDenoiser.load(engine)`` (``pipe.unet`` for UNets). Same call signature, config,
    dtype and device as the PyTorch model (see ``fastgen.export.runtime.ExportedDenoiser``).

    Each call picks the first optimization profile whose ranges hold the inputs (``set_optimization_profile_async``
    when it changes), sets every input shape (``set_input_shape``) and binds inputs and a torch-allocated output
    by name (``set_tensor_address``), then ``execute_async_v3`` on a stream of its own ordered after and before
    the caller's current stream. Execution contexts share one scratch buffer (``USER_MANAGED`` allocation,
    ``device_memory_size_v2`` bytes): they run one at a time on that stream.

    CUDA graphs (``cuda_graphs``): one capture per distinct set of input shapes (up to ``max_graphs``, least
    recently used dropped), each with its own execution context and static buffers (a graph fixes shapes,
    addresses and context); a call copies its inputs in and replays. Default: on where every engine input is
    static (one shape per profile) and the device is CUDA. Graphs are dropped on refit and budget changes.

    Build one with ``load``. Verified against a stand-in TensorRT (``tests/trt_standin.py``); CUDA-graph capture
    and execution on a real engine run only where TensorRT and a GPU are present (``-m tensorrt`` tests).
    """

    _graph_backend = _CudaGraphs()

    def __init__(self, engine_path, *, device=None, weight_streaming_budget=None, cuda_graphs: bool | None = None,
                 max_graphs: int = 8, verify: bool = True, onnx_path=None):
        trt = _trt()
        engine_path = Path(engine_path)
        if device is None:
            if not torch.cuda.is_available():
                raise RuntimeError("TensorRT engines need an NVIDIA GPU, and torch sees none here")
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device(device)
        # The bytes checked against the sidecar are the bytes deserialized: read once.
        sidecar, data = _check_engine(engine_path, tensorrt_version=trt.__version__, verify_bytes=verify, read=True,
                                      capability=compute_capability(device if device.type == "cuda" else None))
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        # An engine lives on the CUDA device current when it is deserialized.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            engine = runtime.deserialize_cuda_engine(data)
        del data
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}; its log above says why")
        dtypes = _trt_dtypes(trt)
        ins, outs = {}, {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (ins if mode == trt.TensorIOMode.INPUT else outs)[name] = dtypes[engine.get_tensor_dtype(name)]
        if set(ins) != set(sidecar["graph_inputs"]) or set(outs) != {sidecar["output"]}:
            raise StaleEngineError(f"{engine_path}: the engine's inputs {sorted(ins)} / outputs {sorted(outs)} are "
                                   f"not its sidecar's graph ({sorted(sidecar['graph_inputs'])} -> "
                                   f"{sidecar['output']}): rebuild it")
        metadata = {"version": sidecar.get("fastgen_version", ""), "class": sidecar["class"],
                    "architecture": sidecar["architecture"], "config": sidecar["config"],
                    "inputs": sidecar["inputs"], "output": sidecar["output"],
                    "dtype": getattr(torch, sidecar["dtype"]), "ranges": _ranges_of(sidecar["ranges"]),
                    "symbols": _ranges_of(sidecar["symbols"])}
        specs = [TensorSpec(n, tuple(sidecar["graph_inputs"][n]), ins[n]) for n in sidecar["inputs"]]
        out_name = sidecar["output"]
        super().__init__(metadata, specs, TensorSpec(out_name, tuple(sidecar["graph_outputs"][out_name]),
                                                     outs[out_name]), device)
        self._trt, self._logger, self._runtime, self._engine = trt, logger, runtime, engine
        self.engine_path, self.sidecar = engine_path, sidecar
        self._onnx_path = Path(onnx_path) if onnx_path is not None else Path(sidecar["onnx_path"])
        self._profiles = [{n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, p)) for n in ins}
                          for p in range(engine.num_optimization_profiles)]
        static = all(lo == hi for prof in self._profiles for lo, _, hi in prof.values())
        self.cuda_graphs = (static and device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._graphs: dict[tuple, _Graph] = {}
        self._sources: dict[tuple, dict[str, WeightSource]] = {}
        self._constants: dict[str, torch.Tensor] = {}
        self._eager: _Context | None = None
        self._scratch: torch.Tensor | None = None
        if weight_streaming_budget is not None:
            self.set_weight_streaming_budget(weight_streaming_budget)

    @classmethod
    def load(cls, source, *, device=None, weight_streaming_budget=None, cuda_graphs: bool | None = None,
             max_graphs: int = 8, verify: bool = True, onnx_path=None, **build_kwargs) -> TensorRTDenoiser:
        """Load an engine as a denoiser module.

        - ``source``: an engine file written by ``build_engine`` (its sidecar beside it), an ``EngineBuild``, or
          an ``.onnx`` export: then ``build_engine(source, **build_kwargs)`` runs first, which reuses the
          cached engine when one matches (a cache hit builds nothing).
        - ``device``: the CUDA device the engine runs on (default: the current one).
        - ``weight_streaming_budget``: None (default: every weight on the GPU), bytes (``int``: 0 or at least
          1 MiB, see ``streaming_budget``), a fraction (``float`` in [0, 1]: ``1.0`` is every weight, ``1`` would
          be one byte and is refused) of the engine's ``streamable_weights_size``, or ``"auto"`` (TensorRT's
          ``get_weight_streaming_automatic_budget``, from free memory). Needs ``build_engine(...,
          weight_streaming=True)``.
        - ``cuda_graphs`` / ``max_graphs``: see the class doc.
        - ``verify``: check the engine file's SHA-256 against its sidecar (default; reads the file once more).
        - ``onnx_path``: the export the engine was built from, read by ``refit_from`` (default: the path the
          sidecar recorded; its hash must match the sidecar's).

        Raises ``StaleEngineError`` for an engine built for another GPU / TensorRT, changed since it was written
        or without a sidecar; ``ImportError`` without TensorRT; ``RuntimeError`` without a GPU or when TensorRT
        cannot deserialize it; ``ValueError`` for a bad budget.
        """
        if isinstance(source, EngineBuild):
            source = source.path
        source = Path(source)
        if source.suffix == ".onnx":
            _refuse_meta_export(source)
            onnx_path = onnx_path or source
            source = build_engine(source, **build_kwargs).path
        elif build_kwargs:
            raise ValueError(f"{sorted(build_kwargs)} apply when source is an .onnx export; {source} is an engine")
        return cls(source, device=device, weight_streaming_budget=weight_streaming_budget, cuda_graphs=cuda_graphs,
                   max_graphs=max_graphs, verify=verify, onnx_path=onnx_path)

    # -- contexts, streams --------------------------------------------------------------------

    def _handle(self) -> int:
        return self._stream.cuda_stream if self._stream is not None else 0

    def _new_context(self) -> _Context:
        size = self._engine.device_memory_size_v2
        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        context = self._engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?); its log says why")
        context.set_device_memory(self._scratch.data_ptr(), size)
        return _Context(context)

    def _drop_contexts(self) -> None:
        # Budget changes need no live context (TensorRT's setWeightStreamingBudgetV2 contract); graphs hold theirs.
        if self._stream is not None:
            self._stream.synchronize()
        self._graphs.clear()
        self._eager = None

    @contextlib.contextmanager
    def _on_stream(self, tensors):
        """Run TensorRT work on this module's stream, after what the caller's stream has queued and before what
        it queues next (TensorRT warns against the default stream; graphs cannot capture on it)."""
        if self._stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            yield
        current.wait_stream(self._stream)
        for t in tensors:  # the caching allocator must not hand these to the caller's stream too early
            t.record_stream(self._stream)

    # -- profiles, binding, running -----------------------------------------------------------

    def _profile_for(self, feed) -> int:
        for i, prof in enumerate(self._profiles):
            if all(all(lo <= v <= hi for lo, v, hi in zip(prof[n][0], t.shape, prof[n][2])) for n, t in feed.items()):
                return i
        spans = "; ".join(", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in prof.items())
                          for prof in self._profiles)
        shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in feed.items())
        raise ValueError(f"no optimization profile of this engine holds the inputs ({shapes}); its profiles: {spans}. "
                         "Build the engine with profiles covering these shapes")

    def _bind(self, ctx: _Context, feed: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        profile = self._profile_for(feed)
        c = ctx.context
        if profile != ctx.profile:
            # Before any set_input_shape (TensorRT's order), on the stream the enqueue uses.
            if not c.set_optimization_profile_async(profile, self._handle()):
                raise RuntimeError(f"TensorRT refused optimization profile {profile}")
            ctx.profile = profile
        for name, t in feed.items():
            if not c.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"TensorRT refused shape {list(t.shape)} for {name}")
            if not c.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {name}")
        got = tuple(c.get_tensor_shape(self.output.name))
        if got != tuple(out.shape):
            raise RuntimeError(f"the engine computes {self.output.name} as {list(got)}, the graph's dimensions give "
                               f"{list(out.shape)}: the engine does not match its sidecar; rebuild it")
        if not c.set_tensor_address(self.output.name, out.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of {self.output.name}")

    def _enqueue(self, ctx: _Context) -> None:
        if not ctx.context.execute_async_v3(self._handle()):
            raise RuntimeError("TensorRT's execute_async_v3 failed; its log says why")

    def _run(self, feed):
        if self.cuda_graphs:
            return self._replay(feed)
        out = torch.empty(self.output_shape(feed), dtype=self.output.dtype, device=self.device)
        if self._eager is None:
            self._eager = self._new_context()
        with self._on_stream([*feed.values(), out]):
            self._bind(self._eager, feed, out)
            self._enqueue(self._eager)
        return out

    def _replay(self, feed):
        key = tuple((n, tuple(t.shape)) for n, t in feed.items())
        g = self._graphs.pop(key, None)
        if g is None:
            g = self._capture(feed)
        self._graphs[key] = g  # most recently used last
        out = torch.empty_like(g.output)
        with self._on_stream([*feed.values(), out]):
            for n, t in feed.items():
                g.inputs[n].copy_(t)
            g.graph.replay()
            out.copy_(g.output)
        return out

    def _capture(self, feed) -> _Graph:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        ctx = self._new_context()
        static = {n: t.clone() for n, t in feed.items()}
        out = torch.empty(self.output_shape(feed), dtype=self.output.dtype, device=self.device)
        with self._on_stream([]):
            self._bind(ctx, static, out)
            # TensorRT does deferred work on the first enqueue after shapes are set: run once uncaptured.
            self._enqueue(ctx)
        if self._stream is not None:
            self._stream.synchronize()
        graph = self._graph_backend.capture(lambda: self._enqueue(ctx), self._stream)
        return _Graph(ctx, static, out, graph)

    # -- weight streaming ---------------------------------------------------------------------

    @property
    def streamable_weights_size(self) -> int:
        """Bytes of weights the engine can stream from host memory (0 unless built with ``weight_streaming``)."""
        return int(self._engine.streamable_weights_size)

    @property
    def weight_streaming_budget(self) -> int:
        """Bytes of streamable weights kept on the GPU (``weight_streaming_budget_v2``)."""
        return int(self._engine.weight_streaming_budget_v2)

    def set_weight_streaming_budget(self, value) -> int:
        """Set the GPU budget for streamable weights: bytes, a fraction of ``streamable_weights_size`` or
        ``"auto"`` (see ``load``). Drops the execution contexts and CUDA graphs first (TensorRT refuses a budget
        change while contexts live); they are made again on the next call. Returns the budget in bytes.
        Raises ``ValueError`` for a bad value or an engine built without weight streaming, ``RuntimeError`` if
        TensorRT does not take it."""
        size = self.streamable_weights_size
        if value == "auto":
            if size <= 0:
                streaming_budget(0, size)  # raises: nothing to stream
            budget = int(self._engine.get_weight_streaming_automatic_budget())
        else:
            budget = streaming_budget(value, size)
        self._drop_contexts()
        self._engine.weight_streaming_budget_v2 = budget
        if self.weight_streaming_budget != budget:  # the property setter drops TensorRT's bool: read back
            raise RuntimeError(f"TensorRT did not take a weight-streaming budget of {budget} bytes (it keeps "
                               f"{self.weight_streaming_budget}); its log says why")
        self._scratch = None  # its size depends on the budget (weight-streaming scratch memory)
        return budget

    # -- refit --------------------------------------------------------------------------------

    def refit_from(self, model_or_state_dict) -> list[str]:
        """Replace every weight of a refittable engine (``build_engine(..., refittable=True)``) with the tensors of
        ``model_or_state_dict`` (a module of the exported architecture, e.g. with a LoRA fused, or its state dict;
        any device and dtype: cast to each weight's engine type).

        Every refittable weight is set, not only those that changed: an engine weight holds whatever was last set,
        so a partial refit would keep the previous model's values (A -> B -> A would not return A's output). The
        names come from ``Refitter.get_all_weights`` (the ONNX initializer names, which TensorRT's ONNX parser
        gives the weights); each is matched to the model through the ONNX export (``refit_sources``; graph
        constants get their ONNX values). ``get_missing_weights`` must then be empty before
        ``refit_cuda_engine``. CUDA graphs are dropped (captured before the refit). The first refit hashes the
        ONNX file once (it must be the export the engine was built from) and reads its constants.

        Returns the weight names set. Raises ``ValueError`` (engine not refittable; an export whose weights cannot
        be traced back; a model of another architecture; the ONNX file changed since the build), ``RuntimeError``
        when TensorRT rejects a weight, reports missing ones or fails the refit.
        """
        if not self.sidecar["flags"].get("refit"):
            raise ValueError(f"{self.engine_path} was built without refittable=True: rebuild it with "
                             "build_engine(..., refittable=True) to refit")
        state = _model_state(model_or_state_dict)
        sources = self._refit_sources(state)
        trt = self._trt
        refitter = trt.Refitter(self._engine, self._logger)
        names = list(refitter.get_all_weights())
        unknown = [n for n in names if n not in sources]
        if unknown:
            raise RuntimeError(f"the engine has refittable weights {unknown[:4]} that are not initializers of "
                               f"{self._onnx_path}: the engine and the ONNX file do not belong together")
        dtypes = _trt_dtypes(trt)
        location = trt.TensorLocation.DEVICE if self.device.type == "cuda" else trt.TensorLocation.HOST
        constants = self._constants_for([n for n in names if sources[n].key is None])
        keep = []  # TensorRT reads the memory at refit_cuda_engine: alive until then
        for name in names:
            src = sources[name]
            if src.key is None:
                value = constants[name]
            else:
                if src.key not in state:
                    raise ValueError(f"the model has no {src.key!r}, which engine weight {name} holds")
                value = state[src.key].t() if src.transpose else state[src.key]
            proto = refitter.get_weights_prototype(name)
            value = value.to(device=self.device, dtype=dtypes[proto.dtype]).contiguous()
            if value.numel() != proto.size:
                raise ValueError(f"engine weight {name} has {proto.size} elements, the model gives {value.numel()}")
            keep.append(value)
            if not refitter.set_named_weights(name, trt.Weights(proto.dtype, value.data_ptr(), value.numel()),
                                              location):
                raise RuntimeError(f"TensorRT rejected the weights for {name}")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise RuntimeError(f"after setting every weight TensorRT still misses {missing[:4]}: not refitting")
        self._drop_contexts()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the casts above ran on torch's stream
        if not refitter.refit_cuda_engine():
            raise RuntimeError("TensorRT's refit_cuda_engine failed; its log says why (the engine may hold a mix "
                               "of old and new weights now: refit again or reload it)")
        del keep
        return names

    def _refit_sources(self, state) -> dict[str, WeightSource]:
        key = tuple(sorted((k, tuple(v.shape)) for k, v in state.items()))
        if key not in self._sources:
            self._check_onnx()
            self._sources[key] = refit_sources(_load_graph(self._onnx_path), {k: v.shape for k, v in state.items()})
        return self._sources[key]

    def _check_onnx(self) -> None:
        if not self._onnx_path.is_file():
            raise ValueError(f"refit_from reads the export the engine was built from, {self._onnx_path}, which is "
                             "missing: pass onnx_path= to TensorRTDenoiser.load")
        if hash_onnx(self._onnx_path) != self.sidecar["onnx_sha256"]:
            raise ValueError(f"{self._onnx_path} is not the export {self.engine_path} was built from (its hash "
                             "differs): pass the right onnx_path= to TensorRTDenoiser.load")

    def _constants_for(self, names) -> dict[str, torch.Tensor]:
        """The ONNX values of graph constants ``names``, read once (external data only for them)."""
        todo = set(names) - set(self._constants)
        if todo:
            from onnx import numpy_helper
            from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

            for init in _load_graph(self._onnx_path).graph.initializer:
                if init.name in todo:
                    if uses_external_data(init):
                        load_external_data_for_tensor(init, str(self._onnx_path.parent))
                    self._constants[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy())
        return self._constants


__all__ = ["EngineBuild", "MIN_BUDGET_BYTES", "PRECISIONS", "StaleEngineError", "TensorRTDenoiser", "WeightSource",
           "atomic_write", "build_engine", "check_engine", "compute_capability", "default_cache_dir", "engine_key",
           "graph_inputs", "graph_io", "hash_onnx", "make_profile", "onnx_files", "operator_target", "read_sidecar",
           "refit_sources", "remove_stale_temps", "sidecar_path", "streaming_budget", "symbol_ranges",
           "tensorrt_version", "validate_profiles"]
