"""Measured backend choice for ``backend="auto"``.

The first time an op meets a new *key* (device name and capability; torch, triton and fastgen
versions; dtype; head dim; shape bucket; segment layout) it runs every candidate backend once on
the very inputs it was given, checks each result against PyTorch's (within that dtype's tolerance,
relative to PyTorch's own error), times the correct ones and keeps the fastest, like cuDNN's
benchmark mode and Triton's autotuner: a few milliseconds per new shape, then a dictionary lookup.
A candidate that runs but is wrong is never chosen, and one ``FastgenFallbackWarning`` names it; one
that cannot run these inputs at all (SDPA's flash backend under a mask) is simply not a candidate.

Decisions live in memory and in one JSON file, ``$FASTGEN_CACHE_DIR/autotune-v1.json`` (default
``$XDG_CACHE_HOME/fastgen`` or ``~/.cache/fastgen``). Writes merge with what other processes wrote
under an exclusive lock, then replace the file atomically (temporary file + ``os.replace``); a
corrupt or foreign file is ignored with one warning and rewritten. Keys carry the versions of torch,
triton, fastgen, cuDNN and xformers, so an upgrade decides again; a decision whose backend cannot
run any more (xformers uninstalled, the CUDA extension not built) is decided again too.

No timing runs while ``torch.compile`` traces or a CUDA graph is captured: the decision already
made for that key is used, else the fixed table documented in ``static_choice`` of each op. With
``FASTGEN_AUTOTUNE=0`` (or ``autotune=False`` on the op) the fixed table is used, decisions made
earlier included. Inputs whose PyTorch result has a NaN or an infinity decide nothing (the table runs
them; a later, finite call decides). ``fastgen tune`` makes the decisions of a pipeline ahead of time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fastgen._version import __version__
from fastgen._warnings import warn_once
from fastgen.kernels._common import autotune_enabled

ENV_SWITCH = "FASTGEN_AUTOTUNE"
ENV_CACHE_DIR = "FASTGEN_CACHE_DIR"
FORMAT = "fastgen-autotune"
SCHEMA = 1
FILE_NAME = f"autotune-v{SCHEMA}.json"  # a later schema writes a file of its own, never this one
MAX_ATTEMPTS = 3  # tries at a key that decides nothing (non-finite inputs) before the table stays
MAX_ENTRIES = 4096  # oldest entries (other devices, older versions) go first
TIME_BUDGET_S = 2e-3  # timed runs per candidate: about this long, 3 to 25 of them

# Error of a candidate vs PyTorch's result, relative to the result's largest magnitude, is allowed
# to be this much, or 4x the error PyTorch's own result has against a float32 reference, whichever is
# larger. fp32 allows TF32 (PyTorch's kernels may use it where the user enabled it).
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass(frozen=True)
class Decision:
    """One choice of backend for one key.

    Attributes:
        op: ``"attention"`` or ``"qk_norm_rope"``.
        key: the key it was decided for (see the module doc).
        backend: the backend that runs, e.g. ``"triton"``, ``"cuda"``, ``"sdpa:cudnn"``, ``"torch"``.
        source: ``"measured"`` (timed here), ``"cached"`` (read from the file), ``"static"`` (the
            fixed table: autotuning off, or no timing allowed now), ``"only candidate"``.
        why: one line for people (``fastgen info``, the demo).
        times_ms: median milliseconds per candidate timed (empty unless measured).
        rejected: candidates left out, with the reason (cannot run here, or wrong result).
    """

    op: str
    key: str
    backend: str
    source: str
    why: str
    times_ms: Mapping[str, float] = dataclasses.field(default_factory=dict)
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"op": self.op, "backend": self.backend, "why": self.why, "times_ms": dict(self.times_ms),
                "rejected": dict(self.rejected), "t": time.time()}


def enabled(override: bool | None = None) -> bool:
    """Whether ``auto`` measures: ``override`` when given, else ``FASTGEN_AUTOTUNE`` (on unless
    ``0``, ``false``, ``off`` or ``no``; the same switch fixes Triton's tile configuration)."""
    if override is not None:
        return bool(override)
    return autotune_enabled()


def cache_path() -> Path:
    """The decisions file: ``$FASTGEN_CACHE_DIR/autotune-v1.json``, default under ``$XDG_CACHE_HOME``
    or ``~/.cache``, in a folder ``fastgen``."""
    root = os.environ.get(ENV_CACHE_DIR)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastgen")
    return Path(root) / FILE_NAME


def timing_allowed(device: torch.device) -> str | None:
    """Why no candidate may be timed now, or None: ``torch.compile`` tracing, CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def bucket(n: int) -> int:
    """Shape bucket of a size: the next power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


_DEVICE_PREFIX: dict[tuple[str, int | None], str] = {}


def device_prefix(device: torch.device) -> str:
    """What every key starts with on ``device``: its name and capability, and the versions."""
    slot = (device.type, device.index)
    prefix = _DEVICE_PREFIX.get(slot)
    if prefix is None:
        try:
            import triton

            tv = triton.__version__
        except ImportError:
            tv = "none"
        others = ""
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cap = "%d.%d" % torch.cuda.get_device_capability(index)
            name = f"{torch.cuda.get_device_name(index)} sm{cap}"
            others = f" cudnn {torch.backends.cudnn.version()}"
            try:
                import xformers

                others += f" xformers {xformers.__version__}"
            except ImportError:
                pass
        else:
            name = device.type
        prefix = f"{name}|torch {torch.__version__}{others}|triton {tv}|fastgen {__version__}"
        _DEVICE_PREFIX[slot] = prefix
    return prefix


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def layout(t: torch.Tensor) -> str:
    """``""`` for (B, H, N, D) in memory, ``"/t"`` for token-major views of a (B, N, H, D) buffer."""
    return "/t" if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2) else ""


def lookup_while_tracing(key: str, static: str, candidates: tuple[str, ...], tune: bool | None) -> str:
    """The backend to bake into a graph being traced: ``static`` with autotuning off (``tune``, else
    ``FASTGEN_AUTOTUNE``), else the decision made for ``key`` if its backend is among ``candidates``,
    else ``static``. Ops call it through ``torch.compiler.assume_constant_result``."""
    if not enabled(tune):
        return static
    hit = TUNER.cached(key)
    return hit.backend if hit is not None and hit.backend in candidates else static


def make_key(device: torch.device, op: str, shape: str) -> str:
    """``device_prefix(device)|op|shape``; ``shape`` (the op's dtype, sizes and layout) has no ``|``."""
    return f"{device_prefix(device)}|{op}|{shape}"


def shape_of(key: str) -> str:
    """The op-specific part of a key: dtype, buckets, layout."""
    return key.rsplit("|", 1)[-1]


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn()`` (already warmed up): CUDA events on a GPU, the wall clock
    elsewhere; about ``TIME_BUDGET_S`` of runs, 3 to 25."""
    if device.type == "cuda":
        def once() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        torch.cuda.synchronize(device)
    else:
        def once() -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    first = once()
    reps = max(3, min(25, int(TIME_BUDGET_S * 1e3 / max(first, 1e-3))))
    return statistics.median([first] + [once() for _ in range(reps - 1)])


def relative_error(out, ref) -> float:
    """max |out - ref| / max |ref| over a tensor or a tuple of tensors (inf where out has a NaN or
    another shape; 0 for empty tensors)."""
    outs, refs = (out, ref) if isinstance(ref, (tuple, list)) else ((out,), (ref,))
    if not isinstance(outs, (tuple, list)) or len(outs) != len(refs):
        return math.inf
    worst, scale = 0.0, 1e-6
    for o, r in zip(outs, refs):
        if not isinstance(o, torch.Tensor) or o.shape != r.shape:
            return math.inf
        if r.numel() == 0:
            continue
        o, r = o.float(), r.float()
        same = o == r  # equal infinities too: rows with no admissible key have lse -inf on every backend
        diff = float(torch.where(same, 0.0, (o - r).abs()).amax())
        if not math.isfinite(diff):
            return math.inf
        finite = r[torch.isfinite(r)]
        worst, scale = max(worst, diff), max(scale, float(finite.abs().amax()) if finite.numel() else 0.0)
    return worst / scale


def all_finite(x) -> bool:
    """Whether every element of a tensor or tuple of tensors is finite (``-inf`` allowed: the lse of
    a row with no admissible key)."""
    return all(bool((torch.isfinite(t) | (t == -math.inf)).all()) for t in (x if isinstance(x, (tuple, list)) else (x,)))


class Tuner:
    """Decisions in memory and on disk; ``decide`` measures what is not decided yet.

    ``timer(name, fn, device) -> ms`` times candidate ``name``; ``time_ms`` unless given (tests
    inject timings).
    """

    def __init__(self, path: Path | str | None = None, timer: Callable | None = None):
        self._path = Path(path) if path is not None else None
        self.timer = timer or (lambda name, fn, device: time_ms(fn, device))
        self._memory: dict[str, Decision] = {}
        self._disk: dict[str, dict] = {}
        self._disk_stamp: tuple | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._attempts: dict[str, int] = {}
        self._given_up: dict[str, Decision] = {}
        self._fixed: dict[str, Decision] = {}  # the fixed table's answers while autotuning is off
        self.spent_s = 0.0  # wall time spent deciding in this process: first runs, checks and timing
        self.first_run_s = 0.0  # of which each candidate's first run (Triton's JIT compile and tile autotune)
        self.log: list[Decision] = []  # every decision made or read in this process, in order

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_path()

    # ---------------------------------------------------------------- lookup

    def cached(self, key: str) -> Decision | None:
        """The decision made for ``key``, in memory or on disk (another process may have made it)."""
        hit = self._memory.get(key)
        if hit is not None:
            return hit
        self._reload()
        entry = self._disk.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str):
            return None
        op = entry.get("op")
        hit = Decision(op if isinstance(op, str) else "?", key, entry["backend"], "cached",
                       f"measured earlier: {entry.get('why', '')}".strip(),
                       entry.get("times_ms") or {}, entry.get("rejected") or {})
        self._memory[key] = hit
        self.log.append(hit)
        return hit

    def _reload(self) -> None:
        path = self.path
        try:
            st = path.stat()
        except OSError:
            self._disk, self._disk_stamp = {}, None
            return
        stamp = (str(path), st.st_mtime_ns, st.st_size)
        if stamp != self._disk_stamp:
            self._disk = self._read(path)
            self._disk_stamp = stamp

    @staticmethod
    def _read(path: Path) -> dict[str, dict]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            warn_once(f"autotune-file:{path}", f"fastgen autotune: ignoring the unreadable decisions file {path} "
                      f"({type(exc).__name__}: {exc}); it is rewritten with the next decision")
            return {}
        if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("schema") == SCHEMA
                and isinstance(data.get("entries"), dict)):
            warn_once(f"autotune-file:{path}", f"fastgen autotune: ignoring {path}: not a fastgen decisions file of "
                      f"schema {SCHEMA}; it is rewritten with the next decision")
            return {}
        return data["entries"]

    # ---------------------------------------------------------------- deciding

    def decide(self, op: str, key: str, device: torch.device, candidates: Mapping[str, Callable[[], object]],
               reference: Callable[[], object], pytorch_error: Callable[[object], float] | None,
               dtype: torch.dtype, static: str, allow: bool = True) -> Decision:
        """The backend for ``key``: the fixed table when ``allow`` is False, else the decision made
        earlier (if its backend is still a candidate), else measured now (if timing is possible now),
        else ``static``.

        Args:
            candidates: {backend: a call that runs it on the inputs at hand and returns its output (a
                tensor or a tuple of tensors)}; a call that raises cannot run these inputs.
            reference: PyTorch's result on the same inputs (its plain SDPA / unfused sequence).
            pytorch_error: given that result, its error against a float32 computation (sets the
                tolerance); None to use the dtype's tolerance alone.
            static: the fixed table's choice.
        """
        if not allow:
            return self._static(op, key, static, "autotuning is off (FASTGEN_AUTOTUNE=0 or autotune=False)")
        if len(candidates) == 1:
            (only,) = candidates
            hit = self._memory.get(key)
            return hit or self._keep(Decision(op, key, only, "only candidate", f"the only backend for these inputs on {device}"))
        hit = self.cached(key)
        if hit is not None and hit.backend in candidates:
            return hit
        if key in self._given_up:
            return self._given_up[key]
        why_not = timing_allowed(device)
        if why_not is None and getattr(self._local, "measuring", False):
            why_not = "called from inside a candidate being measured"  # re-entrant: never wait on our own lock
        if why_not is not None:
            return Decision(op, key, static, "static", f"fixed table: {why_not}")
        with self._lock:
            hit = self._memory.get(key)
            if hit is not None and hit.backend in candidates:
                return hit
            t0 = time.perf_counter()
            self._local.measuring = True
            try:
                decision = self._measure(op, key, device, candidates, reference, pytorch_error, dtype, static)
            finally:
                self._local.measuring = False
                self.spent_s += time.perf_counter() - t0
            if decision.source == "measured":
                return self._keep(decision, save=True)
            # Nothing to keep (non-finite inputs, no correct candidate): a later call tries again, up
            # to MAX_ATTEMPTS in all; then the table for the rest of the process, without measuring.
            self._attempts[key] = self._attempts.get(key, 0) + 1
            if self._attempts[key] >= MAX_ATTEMPTS:
                self._given_up[key] = dataclasses.replace(decision, why=decision.why + f" ({MAX_ATTEMPTS} tries)")
            return decision

    def _static(self, op, key, static, why) -> Decision:
        # Kept apart from the decisions, so switching autotuning back on measures the key.
        hit = self._fixed.get(key)
        if hit is None or hit.backend != static:
            hit = self._fixed[key] = Decision(op, key, static, "static", f"fixed table: {why}")
        return hit

    def _measure(self, op, key, device, candidates, reference, pytorch_error, dtype, static) -> Decision:
        with torch.no_grad():
            try:
                ref = reference()
            except Exception as exc:  # noqa: BLE001 - the table's backend will say it again, to the caller
                return Decision(op, key, static, "static", f"fixed table: PyTorch's result failed ({type(exc).__name__})")
            if not all_finite(ref):
                return Decision(op, key, static, "static", "fixed table: PyTorch's result is not finite on these "
                                "inputs (nothing to check candidates against); a later call decides")
            tol = TOLERANCE.get(dtype, 2e-3)
            if pytorch_error is not None:
                try:
                    own = pytorch_error(ref)
                except Exception:  # noqa: BLE001 - e.g. out of memory for the float32 copy: the dtype's tolerance
                    own = math.nan
                if math.isfinite(own):
                    tol = max(tol, 4 * own)
            rejected, times = {}, {}
            for name, run in candidates.items():
                t1 = time.perf_counter()
                try:
                    with warnings.catch_warnings():  # e.g. SDPA's "flash attention kernel not used because"
                        warnings.simplefilter("ignore")
                        out = run()  # also the warm-up: Triton compiles and autotunes its tiles here
                except Exception as exc:  # noqa: BLE001 - any failure (Triton's OutOfResources too) = cannot run
                    rejected[name] = f"cannot run these inputs ({type(exc).__name__}: {_first_line(exc)})"
                    continue
                finally:
                    self.first_run_s += time.perf_counter() - t1
                err = relative_error(out, ref)
                del out
                if not err <= tol:
                    rejected[name] = f"wrong result: error {err:.3g} against PyTorch's, tolerance {tol:.3g}"
                    warn_once(f"autotune-wrong:{op}:{name}:{device_prefix(device)}",
                              f"fastgen autotune: {op} backend {name!r} gave a wrong result on {device} "
                              f"({shape_of(key)}: {rejected[name]}); it is never chosen for these inputs")
                    continue
                try:
                    times[name] = float(self.timer(name, run, device))
                except Exception as exc:  # noqa: BLE001 - ran once, failed when repeated: not a candidate
                    rejected[name] = f"failed while timed ({type(exc).__name__}: {_first_line(exc)})"
            del ref
        if not times:
            return Decision(op, key, static, "static", "fixed table: no candidate ran correctly", {}, rejected)
        best = min(times, key=times.get)
        others = ", ".join(f"{n} {t:.3g} ms" for n, t in sorted(times.items(), key=lambda x: x[1]) if n != best)
        why = f"fastest correct: {best} {times[best]:.3g} ms" + (f" (then {others})" if others else "")
        return Decision(op, key, best, "measured", why, times, rejected)

    def _keep(self, decision: Decision, save: bool = False) -> Decision:
        self._memory[decision.key] = decision
        self.log.append(decision)
        if save:
            self._save(decision)
        return decision

    def _save(self, decision: Decision) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(path.with_name(path.name + ".lock")):
                entries = self._read(path)  # what other processes wrote meanwhile is kept
                entries[decision.key] = decision.to_json()
                if len(entries) > MAX_ENTRIES:
                    keep = sorted(entries, key=lambda k: _stamp(entries[k]))
                    for old in keep[: len(entries) - MAX_ENTRIES]:
                        del entries[old]
                fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": FORMAT, "schema": SCHEMA, "entries": entries}, f, indent=1, sort_keys=True)
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            self._disk = entries
            st = path.stat()
            self._disk_stamp = (str(path), st.st_mtime_ns, st.st_size)
        except OSError as exc:  # a read-only home: decisions still hold for this process
            warn_once(f"autotune-save:{path}", f"fastgen autotune: cannot write {path} ({exc}); decisions are kept "
                      "in memory for this process only (set FASTGEN_CACHE_DIR to a writable folder)")

    # ---------------------------------------------------------------- reading out

    def decisions(self, device: torch.device | str | None = None) -> list[Decision]:
        """Every decision known (memory and file), for one device's keys when ``device`` is given."""
        self._reload()
        seen = dict(self._memory)
        for key in self._disk:
            if key not in seen:
                hit = self.cached(key)
                if hit is not None:
                    seen[key] = hit
        out = list(seen.values())
        if device is not None:
            prefix = device_prefix(torch.device(device)) + "|"
            out = [d for d in out if d.key.startswith(prefix)]
        return out

    def forget(self) -> None:
        """Drop the in-memory decisions (the file stays)."""
        self._memory.clear()
        self._fixed.clear()
        self._attempts.clear()
        self._given_up.clear()
        self._disk, self._disk_stamp = {}, None
        self.log.clear()
        self.spent_s = self.first_run_s = 0.0


def _stamp(entry) -> float:
    t = entry.get("t", 0) if isinstance(entry, dict) else 0
    try:
        t = float(t) if isinstance(t, (int, float)) else 0.0  # a huge JSON integer overflows
    except OverflowError:
        return 0.0
    return t if math.isfinite(t) else 0.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else "no message"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: the rename alone is atomic; concurrent merges may drop an entry
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


TUNER = Tuner()


def decisions(device: torch.device | str | None = None) -> list[Decision]:
    """Every backend decision known to this process and its decisions file (``fastgen info``)."""
    return TUNER.decisions(device)


def describe(decision: Decision) -> str:
    """One line: op, shape part of the key, backend, why."""
    text = f"{decision.op} [{shape_of(decision.key)}] -> {decision.backend} ({decision.source}; {decision.why})"
    return " ".join(text.split())  # a key or reason read from a file stays on one line
