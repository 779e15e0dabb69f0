"""pytest-benchmark glue: environment stamped into the JSON, and fastgen's baseline-vs-fastgen
table (median ms, TFLOP/s or GB/s, speed-up over the best baseline) printed at the end."""

from __future__ import annotations

from fastgen.benchmarks import core
from fastgen.benchmarks.attention import is_sdpa

DEVICE = core.default_device()


def pytest_addoption(parser):
    parser.addoption("--fastgen-out", default=None, help="write fastgen's table (bench-<device>.md/.json) into this folder")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastgen"] = core.environment(DEVICE)


def _results(config) -> list[core.Result]:
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return []
    rows = []
    for bench in session.benchmarks:
        info = bench.extra_info
        if "suite" not in info or bench.stats is None:
            continue
        if "row" in info:  # a suite's own row (benchmarks.framepack: per-section lists), as the suite made it
            rows.append(core.Result(**info["row"]))
            continue
        if "rows" in info:  # several, as the suite made them (benchmarks.fractal: both samplers of a case)
            rows.extend(core.Result(**r) for r in info["rows"])
            continue
        ms = bench.stats.median * 1e3
        if info["suite"] == "condition":  # per image: the first forward, then (steps - 1) timed ones
            steps = info["steps"]
            rows.append(core.Result("condition", info["case"], info["provider"],
                                    info["first_forward_ms"] + (steps - 1) * ms, peak_mb=info.get("peak_mb"),
                                    extra={"first_forward_ms": info["first_forward_ms"], "later_forward_ms": ms,
                                           "tokens_per_image": "", "cache_mb": info["cache_mb"]}))
            continue
        if info["suite"] == "edit":  # the edit's time; inversion measured apart (benchmarks.edit.edit_path_result)
            extra = {k: v for k, v in info.items() if k not in ("suite", "case", "provider", "peak_mb", "max_diff")}
            extra["total_ms"] = ms + (info.get("inversion_ms") or 0.0)
            rows.append(core.Result("edit", info["case"], info["provider"], ms, max_diff=info.get("max_diff"),
                                    peak_mb=info.get("peak_mb"), extra=extra))
            continue
        if info["suite"] == "merging":  # its own table (benchmarks.merging.merging_table): rounds and deviation
            rows.append(core.Result("merging", info["case"], info["provider"], ms, max_diff=info.get("max_diff"),
                                    peak_mb=info.get("peak_mb"), extra={
                                        "kind": "matching" if info["case"].startswith("matching") else "step",
                                        "round_ms": [t * 1e3 for t in bench.stats.data],
                                        "rel_l2": info.get("rel_l2"), "merging": info.get("merging", "")}))
            continue
        rows.append(core.Result(
            info["suite"], info["case"], info["provider"], ms,
            tflops=info["flops"] / ms / 1e9 if "flops" in info else None,
            gbps=info["bytes"] / ms / 1e6 if "bytes" in info else None,
            max_diff=info.get("max_diff"), peak_mb=info.get("peak_mb"),
            extra={"reference": info.get("reference")},
        ))
    for suite, baseline in (("attention", is_sdpa), ("prologue", lambda p: p == "torch-unfused"),
                            ("quantize", lambda p: p == "torch-unfused"),
                            ("denoiser", lambda p: p == "diffusers"), ("condition", lambda p: p.startswith("(a)")),
                            ("edit", lambda p: p.startswith("full generation")),
                            ("merging", lambda p: p == "unpatched" or (p.startswith("tomesd") and "match" in p))):
        core.add_speedups([r for r in rows if r.suite == suite], baseline)
    for r in rows:  # a speed-up counts as measured only where the rounds' ranges are apart
        if r.suite == "merging":
            base = next((b for b in rows if b.suite == "merging" and b.case == r.case
                         and (b.provider == "unpatched" or b.provider.startswith("tomesd") and "match" in b.provider)), None)
            r.extra["measured_speedup"] = (core.measured_speedup(base.extra["round_ms"], r.extra["round_ms"])
                                           if base is not None else None)
    return rows


_ENV: dict = {}


def _environment() -> dict:
    if not _ENV:
        _ENV.update(core.environment(DEVICE))
    return _ENV


def pytest_runtest_logfinish(nodeid, location):
    # The tables so far, after every benchmark: a run cut by a time limit (bench/run_gpu.sh) still
    # leaves what it measured, marked partial until the session ends.
    config = _CONFIG.get("config")
    out = config.getoption("--fastgen-out") if config is not None else None
    rows = _results(config) if out else []
    if rows:
        core.save(rows, dict(_environment(), partial="the run had not finished when these rows were written"), out,
                  f"bench-{DEVICE.type}")


_CONFIG: dict = {}


def pytest_configure(config):
    _CONFIG["config"] = config


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _results(config)
    if not rows:
        return
    env = _environment()
    terminalreporter.write_sep("=", "fastgen: baseline vs fastgen (same run, same device)")
    terminalreporter.write_line(core.markdown_table(rows, env))
    out = config.getoption("--fastgen-out")
    if out:
        j, m = core.save(rows, env, out, f"bench-{DEVICE.type}")
        terminalreporter.write_line(f"fastgen: wrote {j} and {m}")
