"""What every benchmark suite shares: environment capture, timing, peak memory, result rows,
speed-ups, markdown tables and saving.

Rules kept here: baseline and fastgen are timed in the same run on the same device; medians;
every result carries the environment (device name, torch/triton/CUDA versions, commit).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import fastgen
from fastgen.kernels._common import HAVE_TRITON, INTERPRET

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _commit() -> str:
    if os.environ.get("FASTGEN_COMMIT"):
        return os.environ["FASTGEN_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: torch.device | str) -> dict:
    """Where a measurement was taken: device name, versions, commit, date."""
    device = torch.device(device)
    triton_version = None
    if HAVE_TRITON:
        import triton

        triton_version = triton.__version__
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        cap = None
    return {
        "device": name,
        "compute_capability": cap,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpreter": INTERPRET,
        "python": platform.python_version(),
        "fastgen": fastgen.__version__,
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(value: str | None) -> torch.device:
    """The torch device ``value`` names (default: cuda where present, else cpu); ValueError with a one-line
    reason for a name torch does not know or a device this machine does not have (cpu:1, cuda:N past the
    last GPU: torch accepts both and would quietly run on another device)."""
    if not value:
        return default_device()
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"--device {value!r} is not a device ({exc})") from None
    if device.type == "meta":
        raise ValueError(f"--device {value}: the meta device holds no data to compute with; name cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {value} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"--device {value}: there is one CPU device, cpu (or cpu:0)")
    if device.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=device)  # another kind (mps, xpu, ...): present in this torch and machine?
        except (RuntimeError, AssertionError):
            raise ValueError(f"--device {value}: this torch ({torch.__version__}) and machine have no "
                             f"{device.type} device") from None
    return device


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


def synced(fn: Callable, device: torch.device) -> Callable:
    """``fn`` followed by a device sync, so host timers measure the work, not the launch."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def time_ms(fn: Callable, device: torch.device, budget_s: float = 1.0) -> float:
    """Median milliseconds of ``fn``: CUDA events via triton's do_bench on a GPU, a host clock on CPU."""
    if device.type == "cuda" and HAVE_TRITON:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=int(budget_s * 1000), return_mode="median"))
    fn()  # warm-up (compilation, caches)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measured_speedup(baseline_ms: Sequence[float], fastgen_ms: Sequence[float]) -> float | None:
    """median(baseline_ms) / median(fastgen_ms) where the two min-max ranges are apart, each over at
    least 2 rounds; None otherwise: no measurable difference (one round has no range to compare)."""
    if len(baseline_ms) < 2 or len(fastgen_ms) < 2:
        return None
    if min(baseline_ms) <= max(fastgen_ms) and min(fastgen_ms) <= max(baseline_ms):
        return None
    return statistics.median(baseline_ms) / statistics.median(fastgen_ms)


def range_text(ms: Sequence[float], spec: str) -> str:
    """"min-max" of timed rounds, each formatted with ``spec``."""
    return f"{min(ms):{spec}}-{max(ms):{spec}}"


def speedup_text(baseline_ms: Sequence[float], fastgen_ms: Sequence[float]) -> str:
    """``measured_speedup`` in words: "1.234x (...)" or "no measurable difference (...)"."""
    rounds = min(len(baseline_ms), len(fastgen_ms))
    speedup = measured_speedup(baseline_ms, fastgen_ms)
    if speedup is not None:
        return f"{speedup:.3f}x (ratio of medians; min-max ranges of {rounds} interleaved rounds apart)"
    if rounds < 2:
        return "no measurable difference (1 round each has no spread; 3 or more rounds)"
    return f"no measurable difference (min-max ranges of {rounds} interleaved rounds overlap)"


def call_ms(fn: Callable, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def time_runs_ms(fn: Callable, device: torch.device, repeats: int) -> float:
    """Median ms of ``repeats`` synced calls: for runs of seconds (do_bench would call ~10 times)."""
    return statistics.median(call_ms(fn, device) for _ in range(repeats))


def run_once(run: Callable, device: torch.device):
    """(output, peak MB allocated above what was live before, or None off CUDA) of one call."""
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _host_rss_reader() -> Callable[[], int] | None:
    """A function returning this process's resident set size in bytes, or None where there is no way."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        process = psutil.Process()
        return lambda: process.memory_info().rss
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read
    return None


class PeakMemory:
    """Peak memory while the ``with`` block runs: ``mb`` (MB, or None where it cannot be read) and
    ``kind`` (what ``mb`` is).

    On CUDA: the peak of memory PyTorch allocated on the device (``torch.cuda.max_memory_allocated``
    after a reset; weights and every live tensor count), ``kind`` "CUDA allocated". Elsewhere: the
    peak resident set size (RSS) of the whole process (weights, activations, Python and its
    libraries, and what the allocator keeps after freeing), read with psutil, else
    ``/proc/self/statm``, at entry, at exit and every ``interval_s`` (default 0.01 s) in between by
    a background thread; ``kind`` "host RSS". A peak shorter than the interval can fall between two
    samples. (``resource.getrusage``'s ``ru_maxrss`` is the whole process lifetime's maximum, so it
    cannot tell one run from an earlier one.)
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.01):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.kind = "CUDA allocated" if self.device.type == "cuda" else "host RSS"
        self.mb: float | None = None
        self._read = None if self.device.type == "cuda" else _host_rss_reader()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self._peak = max(self._peak, self._read())

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._read is not None:
            self._sample()
            self._thread = threading.Thread(target=self._watch, name="fastgen-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._read is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self.mb = self._peak / 2**20


def max_diff(out, ref) -> float:
    out = out[0] if isinstance(out, tuple) else out
    ref = ref[0] if isinstance(ref, tuple) else ref
    return float((out.double() - ref.double()).abs().max())


def free_memory(device: torch.device) -> None:
    """Hand cached device memory (and pinned host chunks of an offloaded cache) back between rows."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned chunks of an offloaded cache
            torch._C._host_emptyCache()


# --------------------------------------------------------------------------------------------
# Results and tables
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    suite: str
    case: str
    provider: str
    ms: float
    tflops: float | None = None
    gbps: float | None = None
    speedup: float | None = None  # over the best baseline of the same case
    max_diff: float | None = None  # max |out - reference| (see ``extra["reference"]``)
    peak_mb: float | None = None  # peak device memory above what was allocated before (CUDA only)
    extra: dict = field(default_factory=dict)


def add_speedups(results: list[Result], baseline: Callable[[str], bool]) -> None:
    """Fill ``speedup`` of every row: best baseline ms of its case / its ms."""
    by_case: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by_case.setdefault((r.suite, r.case), []).append(r)
    for rows in by_case.values():
        base = [r.ms for r in rows if baseline(r.provider)]
        if base:
            for r in rows:
                r.speedup = min(base) / r.ms


def run_bandwidth_suite(suite: str, cases, providers: dict, reference: Callable, device, budget_s, progress,
                        diff: Callable | None = None, ref_kind: str = "float64") -> list[Result]:
    """A memory-bound op's suite: GB/s of each provider per case, against ``reference(case, kw)``;
    speed-ups over "torch-unfused"."""
    diff = diff or max_diff
    results = []
    for case in cases:
        kw = case.inputs(device)
        ref = reference(case, kw)
        for name, make in providers.items():
            run = make(kw)
            out, peak = run_once(run, device)
            ms = time_ms(synced(run, device), device, budget_s)
            results.append(Result(suite, case.name, name, ms, gbps=case.bytes / ms / 1e6, max_diff=diff(out, ref),
                                  peak_mb=peak, extra={"reference": ref_kind}))
            if progress:
                progress()
    add_speedups(results, lambda p: p == "torch-unfused")
    return results


def kernel_backends(device: torch.device | str, cuda_op: str | None = None) -> dict[str, str]:
    """{provider: ``backend=``} of an op with a PyTorch path, a Triton kernel and a CUDA twin:
    "torch-unfused" always, "fastgen-triton" and "fastgen-cuda" (the compiled ``fastgen_C::cuda_op``
    where named) where they run on ``device``."""
    from fastgen._cuda import cuda_ext_can_run_on
    from fastgen.kernels._common import triton_can_run_on

    device = torch.device(device)
    out = {"torch-unfused": "torch"}
    if triton_can_run_on(device) is None:
        out["fastgen-triton"] = "triton"
    if cuda_ext_can_run_on(device, cuda_op) is None:
        out["fastgen-cuda"] = "cuda"
    return out


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{suffix}"


def condition_table(rows: list[Result]) -> list[str]:
    """Lines of the conditions suite's table (its rows' ``extra``: first and later forward ms,
    tokens per image, cache MB); empty without rows."""
    if not rows:
        return []
    lines = ["", "Conditions: per image = first forward + (steps - 1) later forwards (the first fills the cache).",
             "", "| case | variant | ms / image | first fwd ms | later fwd ms | tokens / image | cache MB "
             "| vs (a) | vs (b) | max diff vs (b) | peak MB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: | ---: |"]
    base_b = {r.case: r.ms for r in rows if r.provider.startswith("(b)")}
    for r in rows:
        e = r.extra
        vs_b = base_b[r.case] / r.ms if r.case in base_b else None
        lines.append(f"| {r.case} | {r.provider} | {r.ms:.1f} | {e['first_forward_ms']:.2f} | "
                     f"{e['later_forward_ms']:.2f} | {e['tokens_per_image']} | {e['cache_mb']:.1f} | "
                     f"{_fmt(r.speedup, '.3g', 'x')} | {_fmt(vs_b, '.3g', 'x')} | {_fmt(r.max_diff, '.2e')} | "
                     f"{_fmt(r.peak_mb, '.1f')} |")
    return lines


def edit_table(rows: list[Result]) -> list[str]:
    """Lines of the KV-Edit suite's table: a blank line, a heading line, a blank line, then the
    table (its rows' ``extra``: inversion and total ms, cache sizes, resident layers, background
    exactness; or ``error``); empty without rows."""
    if not rows:
        return []
    lines = ["", "KV-Edit: edit = denoising the foreground only, from one inversion (timed apart: one inversion "
             "serves many edits); speed-up of the edit over the best full generation; peak MB over inversion + edit.",
             "", "| case | path | edit ms | inversion ms | inversion + edit ms | edit speed-up | GPU cache MB "
             "| host cache MB | max resident layers | background bit-exact | max diff vs exact | peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        e = r.extra
        if "error" in e:
            lines.append(f"| {r.case} | {r.provider} | {e['error']} |  |  |  |  |  |  |  |  |  |")
            continue
        lines.append(f"| {r.case} | {r.provider} | {r.ms:.1f} | {_fmt(e.get('inversion_ms'), '.1f')} | "
                     f"{e['total_ms']:.1f} | {_fmt(r.speedup, '.3g', 'x')} | {_fmt(e.get('cache_mb'), '.1f')} | "
                     f"{_fmt(e.get('host_mb'), '.1f')} | {_fmt(e.get('max_resident_layers'), 'd')} | "
                     f"{e.get('background_exact', '')} | {_fmt(r.max_diff, '.2e')} | {_fmt(r.peak_mb, '.1f')} |")
    return lines


# Suites whose rows carry per-suite columns get a table of their own; every other row goes into
# the shared table (median ms, TFLOP/s, GB/s, speed-up, max diff, peak MB).
_OWN_TABLES = {"condition": condition_table, "edit": edit_table}


def register_table(suite: str, table: Callable[[list[Result]], list[str]]) -> None:
    """Give ``suite`` a table of its own in ``markdown_table`` (its rows leave the shared table):
    ``table(rows)`` returns its lines, a blank line and a heading first."""
    _OWN_TABLES[suite] = table


def markdown_table(results: list[Result], env: dict) -> str:
    """The environment line, notes (interpreter, no CUDA), the shared table, then the conditions
    and KV-Edit tables, as markdown."""
    lines = [
        f"Device: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} "
        f"| fastgen {env['fastgen']} commit {env['commit']} | {env['date']}",
        "",
    ]
    if env.get("partial"):
        lines += [f"**Partial**: {env['partial']} (the rows below are all that were measured).", ""]
    if env.get("triton_interpreter"):
        lines += ["Triton ran under its CPU interpreter: its times show correctness, not kernel speed.", ""]
    if env.get("compute_capability") is None:
        lines += ["Peak MB off CUDA is the whole process's peak resident set size (host RSS: weights, Python and "
                  "its libraries included), not a device's allocation.", ""]
    shared = [r for r in results if r.suite not in _OWN_TABLES]
    if shared:
        lines += [
            "| suite | case | provider | median ms | TFLOP/s | GB/s | speed-up vs best baseline | max abs diff | peak MB |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for r in shared:
        lines.append(
            f"| {r.suite} | {r.case} | {r.provider} | {r.ms:.3f} | {_fmt(r.tflops, '.1f')} | {_fmt(r.gbps, '.0f')} "
            f"| {_fmt(r.speedup, '.3g', 'x')} | {_fmt(r.max_diff, '.2e')} | {_fmt(r.peak_mb, '.1f')} |"
        )
    for suite, table in _OWN_TABLES.items():
        lines += table([r for r in results if r.suite == suite])
    return "\n".join(lines) + "\n"


def save(results: list[Result], env: dict, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (environment and rows) and ``<stem>.md`` (``markdown_table``) into
    ``out_dir`` (created if missing); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2))
    m.write_text(markdown_table(results, env))
    return j, m


def report(results: list[Result], env: dict, out_dir: str | Path | None, stem: str) -> None:
    """What a suite's ``python -m`` entry point ends with: print ``markdown_table``; with ``out_dir``,
    ``save`` there and print where."""
    print(markdown_table(results, env))
    if out_dir:
        j, m = save(results, env, out_dir, stem)
        print(f"wrote {j} and {m}")
