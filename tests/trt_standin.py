"""A stand-in for the ``tensorrt`` module: the calls fastgen.export.tensorrt makes, with TensorRT 10's
semantics where fastgen depends on them, run on the CPU so the binding, profile, cache, budget and refit logic
is tested where TensorRT cannot be installed.

- An "engine" is the ONNX model (weights inline) plus its profiles and flags, pickled behind a magic line
  that names the stand-in's version: ``deserialize_cuda_engine`` refuses another version's engine (returns
  None and logs an error, as TensorRT does).
- ``execute_async_v3`` reads every input from the address bound to it (``set_tensor_address``: host memory
  here, so a wrong pointer, shape or dtype gives wrong numbers), runs onnxruntime on the CPU with the engine's
  current weights and writes the output to its bound address. It refuses to run without every shape and
  address set, with a shape outside the active profile, or without device memory for a ``USER_MANAGED``
  context.
- Refit: every float initializer is a refittable weight by its ONNX name (what TensorRT's ONNX parser names
  them). Weights consumed by the same node are "combined" (TensorRT's example of missing weights): setting one
  makes the others missing until they are set. ``refit_cuda_engine`` reads the set weights' memory then,
  fails with any missing, and keeps every unset weight as it was. ``engine.refit_log`` records each refit's
  names.
- Weight streaming: ``streamable_weights_size`` is the float weights' bytes for engines built with
  ``WEIGHT_STREAMING`` (0 otherwise); the budget defaults to it and cannot change while an execution context
  is alive (TensorRT's rule; the setter then logs an error and keeps the old value).

Install with ``monkeypatch.setitem(sys.modules, "tensorrt", trt_standin.module())``.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import pickle
import sys
import types
import weakref

import numpy as np

__version__ = "10.15.1.29"
MAGIC = b"FASTGEN-TRT-STANDIN\n"
LOG: list[tuple[str, str]] = []  # (severity, message) of everything the stand-in logged


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = "INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity

    def log(self, severity, msg):
        LOG.append((severity, msg))


def _error(msg):
    LOG.append(("ERROR", msg))


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"
    BF16 = "bfloat16"
    FP8 = "fp8"


_ONNX_DTYPE = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 7: DataType.INT64, 6: DataType.INT32,
               3: DataType.INT8, 2: DataType.UINT8, 9: DataType.BOOL, 17: DataType.FP8}


def _np(dtype: DataType):
    if dtype in (DataType.BF16, DataType.FP8):
        raise NotImplementedError(f"the stand-in runs on numpy / onnxruntime CPU, which have no {dtype.name}")
    return np.dtype(dtype.value)


class TensorIOMode(enum.Enum):
    NONE, INPUT, OUTPUT = range(3)


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1  # TensorRT 10: bit 1 (bit 0 was the deprecated EXPLICIT_BATCH)


class BuilderFlag(enum.Enum):
    REFIT, WEIGHT_STREAMING, TF32, DEBUG = range(4)


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class TensorLocation(enum.Enum):
    DEVICE, HOST = range(2)


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC, ON_PROFILE_CHANGE, USER_MANAGED = range(3)


class Weights:
    """``trt.Weights(type, ptr, count)``: a typed pointer, read later (no copy)."""

    def __init__(self, type=DataType.FLOAT, ptr=0, count=0):
        self.dtype, self.ptr, self.size = type, int(ptr), int(count)

    @property
    def nbytes(self):
        return _np(self.dtype).itemsize * self.size


def _read(ptr: int, dtype: DataType, count: int) -> np.ndarray:
    """A copy of ``count`` elements at host address ``ptr``."""
    dt = _np(dtype)
    if count == 0:
        return np.empty(0, dt)
    return np.frombuffer((ctypes.c_byte * (count * dt.itemsize)).from_address(ptr), dtype=dt).copy()


# ---------------------------------------------------------------------------------------- build


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, shape, dtype


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self.model = None
        self.inputs: list[_Tensor] = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class _ParserError:
    def __init__(self, desc):
        self._desc = desc

    def desc(self):
        return self._desc

    def __str__(self):
        return self._desc


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, model):
        import onnx

        try:
            proto = onnx.load(model)  # external data too, like TensorRT's parser
        except Exception as e:  # noqa: BLE001  (the parser reports, it does not raise)
            self.errors.append(_ParserError(f"cannot read {model}: {e}"))
            return False
        inits = {i.name for i in proto.graph.initializer}
        self.network.model = proto
        self.network.inputs = [
            _Tensor(v.name, tuple(d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim),
                    _ONNX_DTYPE[v.type.tensor_type.elem_type])
            for v in proto.graph.input if v.name not in inits]
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002  (TensorRT's argument names)
        lo, mid, hi = (tuple(int(v) for v in s) for s in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi)) or not all(0 <= a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ValueError(f"inconsistent profile shapes for {input}: {lo} {mid} {hi}")
        self.shapes[input] = (lo, mid, hi)


class _TimingCache:
    MAGIC = b"STANDIN-TIMING-CACHE\n"

    def __init__(self, entries):
        self.entries = entries

    def serialize(self):
        return self.MAGIC + pickle.dumps(self.entries)


class _Config:
    def __init__(self):
        self.flags, self.pools, self.profiles, self.timing_cache = {BuilderFlag.TF32}, {}, [], None

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, pool_size):
        if pool_size <= 0:
            raise ValueError("pool size must be positive")
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        data = bytes(serialized_timing_cache)
        if not data:
            return _TimingCache({"version": __version__, "entries": {}})
        if not data.startswith(_TimingCache.MAGIC):
            _error("timing cache: bad header")
            return _TimingCache({"version": None, "entries": {}})
        return _TimingCache(pickle.loads(data[len(_TimingCache.MAGIC):]))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.entries.get("version") != __version__ and not ignore_mismatch:
            _error("timing cache was made by another TensorRT / device")
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        strongly_typed = bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        if BuilderFlag.WEIGHT_STREAMING in config.flags and not strongly_typed:
            _error("weight streaming needs a strongly typed network")
            return None
        profiles = []
        for p in config.profiles or [_Profile()]:
            shapes = {}
            for t in network.inputs:
                if t.name in p.shapes:
                    lo, _, hi = p.shapes[t.name]
                    if len(lo) != len(t.shape) or any(d != -1 and not lo[i] == hi[i] == d
                                                       for i, d in enumerate(t.shape)):
                        _error(f"profile does not fit {t.name} {t.shape}")
                        return None
                    shapes[t.name] = p.shapes[t.name]
                elif -1 in t.shape:
                    _error(f"no profile shapes for dynamic input {t.name}")
                    return None
                else:
                    shapes[t.name] = (t.shape,) * 3
            profiles.append(shapes)
        if config.timing_cache is not None:  # a "tactic" per network, counted per build
            entries = config.timing_cache.entries["entries"]
            entries[network.model.graph.name] = entries.get(network.model.graph.name, 0) + 1
        plan = {"version": __version__, "model": network.model.SerializeToString(), "profiles": profiles,
                "refit": BuilderFlag.REFIT in config.flags,
                "streaming": BuilderFlag.WEIGHT_STREAMING in config.flags}
        return MAGIC + pickle.dumps(plan)


# ---------------------------------------------------------------------------------------- runtime


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        data = bytes(serialized_engine)
        if not data.startswith(MAGIC):
            _error("not a serialized engine")
            return None
        plan = pickle.loads(data[len(MAGIC):])
        if plan["version"] != __version__:
            _error(f"engine plan built with {plan['version']}, this is {__version__}")
            return None
        return _Engine(plan)


class _Engine:
    def __init__(self, plan):
        import onnx
        from onnx import numpy_helper

        self.model = onnx.load_from_string(plan["model"])
        self.profiles, self.refittable, self.streaming = plan["profiles"], plan["refit"], plan["streaming"]
        g = self.model.graph
        inits = {i.name for i in g.initializer}
        self.io = [(v, TensorIOMode.INPUT) for v in g.input if v.name not in inits]
        self.io += [(v, TensorIOMode.OUTPUT) for v in g.output]
        self.weights = {i.name: numpy_helper.to_array(i).copy() for i in g.initializer
                        if _ONNX_DTYPE.get(i.data_type) in (DataType.FLOAT, DataType.HALF, DataType.BF16)}
        self.groups = [{x for x in n.input if x in self.weights} for n in g.node]
        self.contexts = weakref.WeakSet()
        self.refit_log: list[list[str]] = []
        self._budget = self.streamable_weights_size
        self._session = None

    # I/O
    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, index):
        return self.io[index][0].name

    def _value(self, name):
        return next(v for v, _ in self.io if v.name == name)

    def get_tensor_mode(self, name):
        return next(m for v, m in self.io if v.name == name)

    def get_tensor_dtype(self, name):
        return _ONNX_DTYPE[self._value(name).type.tensor_type.elem_type]

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    def get_tensor_profile_shape(self, name, profile_index):
        return [list(s) for s in self.profiles[profile_index][name]]

    # memory
    @property
    def streamable_weights_size(self):
        return sum(w.nbytes for w in self.weights.values()) if self.streaming else 0

    @property
    def weight_streaming_budget_v2(self):
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, value):
        # TensorRT's setter returns false (the Python property drops it) and logs; the budget stays.
        if not self.streaming:
            _error("weight streaming was not enabled at build")
        elif len(self.contexts):
            _error("the weight streaming budget cannot change while execution contexts exist")
        elif value < 0:
            _error("negative budget")
        else:
            self._budget = int(value)

    def get_weight_streaming_automatic_budget(self):
        return self.streamable_weights_size // 2

    @property
    def device_memory_size_v2(self):
        streaming = self.streaming and self._budget < self.streamable_weights_size
        return 4096 + (1024 if streaming else 0)  # scratch grows when weights stream

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        ctx = _Context(self, strategy)
        self.contexts.add(ctx)
        return ctx

    def session(self):
        if self._session is None:
            import onnxruntime as ort
            from onnx import numpy_helper

            model = type(self.model)()
            model.CopyFrom(self.model)
            for init in model.graph.initializer:
                if init.name in self.weights:
                    init.CopyFrom(numpy_helper.from_array(self.weights[init.name], init.name))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self._session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return self._session


class _Context:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.profile, self.shapes, self.addresses, self.memory = 0, {}, {}, None
        self.runs = 0

    def set_optimization_profile_async(self, profile_index, stream_handle):
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            _error(f"no profile {profile_index}")
            return False
        self.profile, self.shapes = profile_index, {}
        return True

    def set_device_memory(self, memory, size):
        if size < self.engine.device_memory_size_v2:
            raise ValueError(f"device memory of {size} bytes < device_memory_size_v2 "
                             f"{self.engine.device_memory_size_v2}")
        self.memory = (memory, size)

    def set_input_shape(self, name, shape):
        shape = tuple(int(s) for s in shape)
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            _error(f"{name} shape {shape} is outside profile {self.profile}: {lo}..{hi}")
            return False
        self.shapes[name] = shape
        return True

    def _symbols(self):
        symbols = {}
        for v, mode in self.engine.io:
            if mode == TensorIOMode.INPUT and v.name in self.shapes:
                for d, s in zip(v.type.tensor_type.shape.dim, self.shapes[v.name]):
                    if d.dim_param:
                        symbols[d.dim_param] = s
        return symbols

    def get_tensor_shape(self, name):
        v = self.engine._value(name)
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes.get(name, tuple(-1 for _ in v.type.tensor_type.shape.dim))
        symbols = self._symbols()
        return tuple(d.dim_value if not d.dim_param else symbols.get(d.dim_param, -1)
                     for d in v.type.tensor_type.shape.dim)

    def set_tensor_address(self, name, memory):
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        e = self.engine
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.memory is None:
            _error("USER_MANAGED context without set_device_memory")
            return False
        feed = {}
        for v, mode in e.io:
            if v.name not in self.addresses or (mode == TensorIOMode.INPUT and v.name not in self.shapes):
                _error(f"{v.name}: shape or address not set")
                return False
            if mode == TensorIOMode.INPUT:
                shape = self.shapes[v.name]
                arr = _read(self.addresses[v.name], e.get_tensor_dtype(v.name), int(np.prod(shape)))
                feed[v.name] = arr.reshape(shape)
        outs = e.session().run(None, feed)
        for (v, mode), out in zip([x for x in e.io if x[1] == TensorIOMode.OUTPUT], outs):
            want = self.get_tensor_shape(v.name)
            if tuple(out.shape) != tuple(want):
                _error(f"{v.name}: computed {out.shape}, declared {want}")
                return False
            out = np.ascontiguousarray(out, dtype=_np(e.get_tensor_dtype(v.name)))
            ctypes.memmove(self.addresses[v.name], out.ctypes.data, out.nbytes)
        self.runs += 1
        return True


class Refitter:
    def __init__(self, engine, logger):
        if not engine.refittable:
            raise RuntimeError("engine was not built with BuilderFlag.REFIT")
        self.engine, self.set = engine, {}

    def get_all_weights(self):
        return list(self.engine.weights)

    def get_weights_prototype(self, weights_name):
        w = self.engine.weights.get(weights_name)
        if w is None:
            return Weights(DataType.FLOAT, 0, -1)
        return Weights(next(d for d in DataType if d.value == str(w.dtype)), 0, w.size)

    def set_named_weights(self, name, weights, location=TensorLocation.HOST):
        proto = self.get_weights_prototype(name)
        if proto.size < 0 or weights.size != proto.size or weights.dtype != proto.dtype:
            _error(f"rejected weights for {name}")
            return False
        self.set[name] = weights
        return True

    def get_missing_weights(self):
        missing = set()
        for group in self.engine.groups:
            if group & set(self.set):
                missing |= group - set(self.set)
        return sorted(missing)

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            _error(f"missing weights {self.get_missing_weights()}")
            return False
        e = self.engine
        for name, w in self.set.items():
            e.weights[name] = _read(w.ptr, w.dtype, w.size).reshape(e.weights[name].shape)
        e._session = None
        e.refit_log.append(sorted(self.set))
        return True


def module(version: str | None = None) -> types.ModuleType:
    """A fresh ``tensorrt`` module object backed by this file (its own ``__version__`` when given)."""
    mod = types.ModuleType("tensorrt")
    # torch._dynamo looks installed modules up with importlib.util.find_spec, which needs a spec.
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    for name in ("Logger", "DataType", "TensorIOMode", "NetworkDefinitionCreationFlag", "BuilderFlag",
                 "MemoryPoolType", "TensorLocation", "ExecutionContextAllocationStrategy", "Weights", "Builder",
                 "OnnxParser", "Runtime", "Refitter"):
        setattr(mod, name, getattr(sys.modules[__name__], name))
    mod.__version__ = version or __version__
    return mod
