"""Token merging suite (issue #12): what ToMe and ToDo save per denoising step, and what they change
in the output, beside the unpatched model and tomesd, measured in the same run.

Rows, per model and setting: median ms per step over interleaved rounds, peak memory, and the
deviation of the step's output from the unpatched model's on the same inputs (relative L2 in
``extra["rel_l2"]``, max abs in ``max_diff``). Settings: unpatched; fastgen without merging (its exact
patch alone, so that the merging's own gain can be told apart); tomesd (UNets only) and fastgen ToMe
at each ratio; fastgen ToDo x2. A step is what a pipeline runs per denoising step: one UNet forward on
a CFG batch of 2 (SD 1.5, SDXL); one Flux-dev forward of batch 1 (guidance-distilled: no CFG batch);
two Wan forwards (its pipeline runs CFG as two calls).

Same merges: every ToMe row draws no random dst (``use_rand=False``: the top-left token of each 2x2
cell), and tomesd's ``max_downsample`` is the level fastgen merges at (the model's highest-resolution
level with attention: 1 on SD 1.5, 2 on SDXL). tomesd and fastgen then merge the same tokens, their
deviations agree to rounding, and the difference in time is the implementations'.

Timing: one first call of every setting (warm-up; its output and peak memory are the row's), then
``rounds`` rounds that each run every setting in turn, so a change in the machine's load hits all
alike. A call longer than a third of ``budget_s`` is timed once per round (on a CPU its first call is
the first round: nothing compiles or tunes there); a shorter one with ``core.time_ms`` within
``budget_s``. ``speedup`` is the ratio of medians over unpatched; ``extra["speedup_text"]`` says
whether the rounds' min-max ranges are apart (``core.speedup_text``).

The weights are random (seed 0): the deviation shows that a setting changes the output and how much
beside the others, not image quality; ``tools/tome_quality.py`` measures that with real weights.

Peak memory: on CUDA the allocated peak above what was live before the call; on a CPU the process's
resident set size, sampled every 10 ms, above its size when the call began (``extra["peak_kind"]``).

DiTs (Flux, SD3, Wan, HunyuanVideo): a ToMe/ToDo setting runs where fastgen's patch merges some block
of the model (``handle.merging`` lists it); otherwise its row says "not supported yet", untimed.

Matching micro-benchmark: fastgen's ``bipartite_match`` (backend "auto": Triton on CUDA, PyTorch on a
CPU) against tomesd's ``bipartite_soft_matching_random2d`` on (2, N, 320) tokens of a square grid,
r = N / 2, no randomness; alone, and followed by merge and unmerge (tomesd's closures do later part
of what fastgen's matching does up front), whose outputs are compared.

Sizes: on a GPU the released configs with random weights in bf16 (SD 1.5 at 512, 1024 and 2048 px,
SDXL at 1024 px, Flux-dev at 1024^2 and 2048^2, Wan 2.1 1.3B at 480p, 33 frames); on a CPU SD 1.5 at
512 px in fp32 (ToMe 0.5 only: a few minutes on 2 cores) and small stand-ins at every ratio.

``python -m fastgen.benchmarks.merging`` runs the suite and prints its own table (``merging_table``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import fastgen
from fastgen import models
from fastgen._warnings import FastgenFallbackWarning
from fastgen.benchmarks.core import (PeakMemory, Result, call_ms, free_memory, measured_speedup, range_text,
                                     register_table, run_once, speedup_text, synced, time_ms)

SUITE = "merging"
RATIOS = (0.3, 0.5, 0.7)
TODO_FACTOR = 2
ROUNDS = 3
MATCH_CHANNELS = 320  # SD 1.5's width at level 1
MATCH_BATCH = 2  # a CFG batch

def sd15(px: int) -> models.DenoiserSpec:
    """SD 1.5's UNet at ``px`` x ``px`` pixels (latent px / 8), CFG batch of 2, 77 text tokens."""
    return models.DenoiserSpec(f"sd15 {px}px cfg", "UNet2DConditionModel", models.SD15_UNET,
                               models.unet_inputs(2, px // 8, 4, 77, 768, False))


@dataclass(frozen=True)
class MergingCase:
    """A model at one size and the ToMe ratios it runs; every case also runs unpatched, fastgen
    without merging and (``todo`` not None) ToDo with that factor."""

    model: models.DenoiserSpec
    ratios: tuple[float, ...] = RATIOS
    todo: int | None = TODO_FACTOR

    @property
    def name(self) -> str:
        return f"{self.model.name} ({self.model.forwards_per_step} fwd/step)"


def _real(cls: str) -> models.DenoiserSpec:
    return next(spec for spec in models.real_denoisers() if spec.cls == cls)


def merging_cases(device: torch.device | str) -> list[MergingCase]:
    """The issue's sizes on a GPU; SD 1.5 at 512 px (ToMe 0.5) and ``small_cases()`` on a CPU."""
    if torch.device(device).type != "cuda":
        return [MergingCase(sd15(512), ratios=(0.5,))] + small_cases()
    flux = _real("FluxTransformer2DModel")
    flux_2048 = models.DenoiserSpec("flux-dev 2048^2", flux.cls, flux.config,
                                    models.flux_inputs(1, 16384, 512, 64, 4096, 768, True))
    return ([MergingCase(sd15(px)) for px in (512, 1024, 2048)]
            + [MergingCase(spec) for spec in (_real("UNet2DConditionModel"), flux, flux_2048,
                                              _real("WanTransformer3DModel"))])


def small_cases() -> list[MergingCase]:
    """The CPU stand-ins of ``fastgen.models.small_denoisers`` (SD 1.5's layout, Flux, Wan,
    HunyuanVideo), every ratio: seconds in all."""
    return [MergingCase(spec) for spec in models.small_denoisers()]


def match_sizes(device: torch.device | str) -> tuple[int, ...]:
    """Token counts of the matching micro-benchmark: 64^2, 128^2 and 256^2 grids (SD 1.5's level 1
    at 512, 1024 and 2048 px); the last only on a GPU (tomesd's score matrix alone is 6 GiB)."""
    return (4096, 16384, 65536) if torch.device(device).type == "cuda" else (4096, 16384)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row's configuration: ``tool`` "none" (unpatched), "fastgen" or "tomesd"; a ToMe ``ratio``
    and / or a ToDo ``factor``."""

    label: str
    tool: str
    ratio: float | None = None
    factor: int | None = None

    @property
    def merges(self) -> bool:
        return self.ratio is not None or self.factor is not None

    def patch_kwargs(self) -> dict:
        """``fastgen.patch`` keywords of a fastgen setting (ToMe without random dst: tomesd's merges)."""
        return dict(tome=fastgen.ToMeConfig(self.ratio, use_rand=False) if self.ratio is not None else None,
                    todo=fastgen.ToDoConfig(self.factor) if self.factor is not None else None)


def settings(case: MergingCase, unet: bool) -> list[Setting]:
    """The case's rows in order: unpatched, fastgen without merging, (tomesd and) fastgen ToMe per
    ratio, fastgen ToDo."""
    out = [Setting("unpatched", "none"), Setting("fastgen (no merging)", "fastgen")]
    for ratio in case.ratios:
        if unet:
            out.append(Setting(f"tomesd ToMe {ratio:g}", "tomesd", ratio=ratio))
        out.append(Setting(f"fastgen ToMe {ratio:g}", "fastgen", ratio=ratio))
    if case.todo is not None:
        out.append(Setting(f"fastgen ToDo x{case.todo}", "fastgen", factor=case.todo))
    return out


def first_attention_level(unet) -> int:
    """The highest-resolution level of a UNet that has attention (what fastgen's default
    ``max_downsample`` merges at, and so tomesd's ``max_downsample`` for the same merges)."""
    from fastgen.merging.unet import unet_blocks

    return min((level for _, level, _ in unet_blocks(unet)), default=1)


@contextlib.contextmanager
def applied(model, setting: Setting, tomesd_level: int | None) -> Iterator[None]:
    """``model`` with ``setting`` on inside the ``with`` block, as it was after it."""
    if setting.tool == "fastgen":
        with fastgen.patch(model, **setting.patch_kwargs()):
            yield
    elif setting.tool == "tomesd":
        import tomesd

        tomesd.apply_patch(model, ratio=setting.ratio, max_downsample=tomesd_level, use_rand=False)
        try:
            yield
        finally:
            tomesd.remove_patch(model)
    else:
        yield


def merging_report(handle) -> str:
    """``handle.merging`` where the patch merges or downsamples in some block, else "" (a model the
    merging does not reach yet reports "no block merges")."""
    patches = handle.state.model_patches + handle.state.shared
    return handle.merging if any(mp.merging is not None and mp.merging.rows for mp in patches) else ""


def fastgen_merges(model, setting: Setting) -> str:
    """What a fastgen setting merges in ``model`` ("" where nothing), patching and unpatching it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastgenFallbackWarning)  # "merges nothing": reported as a row
        with fastgen.patch(model, **setting.patch_kwargs()) as handle:
            return merging_report(handle)


def merging_step(model, inputs: dict, forwards: int) -> Callable:
    """One denoising step: ``forwards`` calls of the model. A UNet's sample and timestep go first and
    positional: tomesd reads the latent size from the first positional argument."""
    kwargs = dict(inputs)
    args = (kwargs.pop("sample"), kwargs.pop("timestep")) if "sample" in kwargs else ()

    def step():
        with torch.no_grad():
            out = None
            for _ in range(forwards):
                out = model(*args, **kwargs, return_dict=False)[0]
            return out

    return step


# --------------------------------------------------------------------------------------------
# Interleaved timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """One run's first call (output, peak MB or None, ms) and its timed rounds (ms each)."""

    out: object
    peak_mb: float | None
    first_ms: float
    round_ms: list[float]

    @property
    def ms(self) -> float:
        return statistics.median(self.round_ms)


def peak_kind(device: torch.device) -> str:
    return "CUDA allocated above live" if device.type == "cuda" else "host RSS above the call's start"


def first_call(fn: Callable, device: torch.device) -> tuple[object, float | None, float]:
    """(output, peak MB above what was in use before, ms) of one synced call (see ``peak_kind``)."""
    if device.type == "cuda":
        t0 = time.perf_counter()
        out, peak = run_once(fn, device)
        return out, peak, (time.perf_counter() - t0) * 1e3
    with PeakMemory(device) as start:
        pass
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - t0) * 1e3
    peak = memory.mb - start.mb if memory.mb is not None and start.mb is not None else None
    return out, peak, ms


def interleaved(runs: dict[str, tuple[Callable, Callable]], device: torch.device, budget_s: float, rounds: int,
                progress=None) -> dict[str, Timing]:
    """{label: Timing} of ``runs`` ({label: (fn, around)}, ``around()`` a context manager entered for
    every call of its run, outside the timed part): a first call of each, then ``rounds`` rounds of
    every run in turn (module doc: long calls once per round, short ones with ``time_ms``)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    timings: dict[str, Timing] = {}
    for label, (fn, around) in runs.items():
        with around():
            out, peak, ms = first_call(fn, device)
        long = ms * 3 > budget_s * 1e3
        timings[label] = Timing(out, peak, ms, [ms] if long and device.type != "cuda" else [])
        if progress:
            progress()
    for _ in range(rounds):
        for label, (fn, around) in runs.items():
            t = timings[label]
            if len(t.round_ms) >= rounds:
                continue  # its first call was its first round
            with around():
                long = t.first_ms * 3 > budget_s * 1e3
                t.round_ms.append(call_ms(fn, device) if long else time_ms(synced(fn, device), device, budget_s))
            if progress:
                progress()
    return timings


def deviation(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 ||out - ref|| / ||ref||, max |out - ref|), in float64."""
    d = out.double() - ref.double()
    return float(d.norm() / ref.double().norm().clamp_min(1e-300)), float(d.abs().max())


def _speed(base: list[float], this: list[float]) -> dict:
    return dict(measured_speedup=measured_speedup(base, this), speedup_text=speedup_text(base, this))


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def case_rows(case: MergingCase, device: torch.device, dtype: torch.dtype, budget_s: float = 1.0,
              rounds: int = ROUNDS, progress=None) -> list[Result]:
    """The rows of one model case (module doc)."""
    torch.manual_seed(0)  # the same random weights in every run, so deviations compare across runs
    model = case.model.build(device, dtype)
    inputs = case.model.inputs(device, dtype)
    unet = type(model).__name__ == "UNet2DConditionModel"
    level = first_attention_level(model) if unet else None
    step = merging_step(model, inputs, case.model.forwards_per_step)
    runs, reports, rows, wanted = {}, {}, [], settings(case, unet)
    for s in wanted:
        if s.tool == "fastgen" and s.merges:
            reports[s.label] = fastgen_merges(model, s)
            if not reports[s.label]:
                continue
        runs[s.label] = (step, functools.partial(applied, model, s, level))
    timed = {}
    if any(s.merges for s in wanted if s.label in runs):  # else nothing here merges yet: no timing
        timed = interleaved(runs, device, budget_s, rounds, progress)
    base = timed.get("unpatched")
    for s in wanted:
        if s.label not in timed:
            rows.append(Result(SUITE, case.name, s.label, float("nan"), extra=dict(
                kind="step", status="not supported yet",
                note=f"fastgen.patch merges nothing in {type(model).__name__} with {s.label.split(' ', 1)[1]}")))
            continue
        t = timed[s.label]
        rel, mx = deviation(t.out, base.out)
        extra = dict(kind="step", rel_l2=rel, round_ms=t.round_ms, reference="unpatched, same run, same inputs",
                     peak_kind=peak_kind(device), merging=reports.get(s.label, ""), **_speed(base.round_ms, t.round_ms))
        if s.tool == "tomesd":
            extra["tomesd_max_downsample"] = level
        twin = timed.get(f"tomesd ToMe {s.ratio:g}") if s.tool == "fastgen" and s.ratio is not None else None
        if twin is not None:
            extra.update(vs_tomesd=twin.ms / t.ms, vs_tomesd_measured=measured_speedup(twin.round_ms, t.round_ms),
                         vs_tomesd_text=speedup_text(twin.round_ms, t.round_ms))
        rows.append(Result(SUITE, case.name, s.label, t.ms, speedup=base.ms / t.ms, max_diff=mx, peak_mb=t.peak_mb,
                           extra=extra))
    del model, inputs, step, runs, timed, base
    free_memory(device)
    return rows


def matching_runs(x: torch.Tensor, side: int, r: int) -> dict[str, Callable]:
    """{label: fn} of the micro-benchmark on (B, side * side, C) tokens ``x``, merging ``r``: tomesd's and
    fastgen's matching alone, then each with merge and unmerge (returning ``unmerge(merge(x))``), in
    that order (each fastgen run follows the tomesd run it is compared with)."""
    from tomesd.merge import bipartite_soft_matching_random2d as tomesd_match

    from fastgen.merging.matching import bipartite_match, merge, unmerge
    from fastgen.ops.merging import choose

    backend = choose("auto", x, "tome_match")

    def tomesd_full():
        m, u = tomesd_match(x, side, side, 2, 2, r, no_rand=True)
        return u(m(x))

    def fastgen_full():
        m = bipartite_match(x, side, side, 2, 2, r, use_rand=False)
        return unmerge(merge(x, m), m)

    return {"tomesd match": lambda: tomesd_match(x, side, side, 2, 2, r, no_rand=True),
            f"fastgen match ({backend})": lambda: bipartite_match(x, side, side, 2, 2, r, use_rand=False),
            "tomesd match+merge+unmerge": tomesd_full, f"fastgen match+merge+unmerge ({backend})": fastgen_full}


def matching_tokens(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """((MATCH_BATCH, n, MATCH_CHANNELS) random tokens, grid side) for the micro-benchmark at n tokens.

    Raises:
        ValueError: for an n that is no square grid.
    """
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"matching sizes must be square token grids, got {n}")
    x = torch.randn(MATCH_BATCH, n, MATCH_CHANNELS, generator=torch.Generator().manual_seed(n))
    return x.to(device, dtype), side


def matching_rows(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], budget_s: float = 1.0,
                  rounds: int = ROUNDS, progress=None) -> list[Result]:
    """The micro-benchmark's rows (``matching_runs``) at each token count of ``sizes``, r = N // 2:
    fastgen's speed-up over tomesd on the same op, and its deviation from tomesd's unmerge(merge(x))."""
    rows = []
    for n in sizes:
        x, side = matching_tokens(n, device, dtype)
        runs = matching_runs(x, side, n // 2)
        timed = interleaved({k: (fn, contextlib.nullcontext) for k, fn in runs.items()}, device, budget_s, rounds,
                            progress)
        case = f"matching N={n} C={MATCH_CHANNELS} B={MATCH_BATCH} r=N/2"
        labels = list(timed)
        for i, label in enumerate(labels):
            t = timed[label]
            fast = label.startswith("fastgen")
            twin = timed[labels[i - 1]] if fast else t
            extra = dict(kind="matching", round_ms=t.round_ms, peak_kind=peak_kind(device),
                         **_speed(twin.round_ms, t.round_ms))
            mx = None
            if fast and "merge" in label:
                extra["rel_l2"], mx = deviation(t.out, twin.out)
                extra["reference"] = "tomesd's unmerge(merge(x)), same tokens"
            rows.append(Result(SUITE, case, label, t.ms, speedup=twin.ms / t.ms, max_diff=mx, peak_mb=t.peak_mb,
                               extra=extra))
        del x, timed, runs
        free_memory(device)
    return rows


def run(device: torch.device, budget_s: float = 1.0, progress=None, *, cases: list[MergingCase] | None = None,
        sizes: tuple[int, ...] | None = None, rounds: int = ROUNDS) -> list[Result]:
    """Rows of every case (``merging_cases(device)`` unless given) and of the matching micro-benchmark
    (``match_sizes(device)`` unless given; ``()`` for none). bf16 on CUDA, fp32 elsewhere."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for case in merging_cases(device) if cases is None else cases:
        results += case_rows(case, device, dtype, budget_s, rounds, progress)
    results += matching_rows(device, dtype, match_sizes(device) if sizes is None else sizes, budget_s, rounds, progress)
    return results


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def _speedup_cell(ratio: float | None, measured: float | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio:.3f}x" + ("" if measured is not None else " (ranges overlap)")


def merging_table(rows: list[Result]) -> list[str]:
    """Lines of this suite's tables (a blank line and a heading before each; empty without rows): per
    model, ms per step with the rounds' range, speed-up over unpatched (and over tomesd at the same
    ratio), deviation from unpatched, peak memory; then the matching micro-benchmark."""
    steps = [r for r in rows if r.extra.get("kind") == "step"]
    matching = [r for r in rows if r.extra.get("kind") == "matching"]
    lines = []
    if steps:
        kind = next((r.extra["peak_kind"] for r in steps if "peak_kind" in r.extra), "")
        lines += ["", "Token merging: ms per denoising step (median, min-max of interleaved rounds), speed-up = ratio "
                  "of medians (\"ranges overlap\": not measurably different), output deviation from unpatched "
                  f"(same inputs), peak MB ({kind}).", "",
                  "| case | setting | ms / step | min-max | speed-up vs unpatched | vs tomesd | rel. L2 vs unpatched "
                  "| max abs diff | peak MB | merges |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in steps:
            e = r.extra
            if e.get("status"):
                lines.append(f"| {r.case} | {r.provider} | {e['status']} |  |  |  |  |  |  | {e.get('note', '')} |")
                continue
            vs_t = _speedup_cell(e.get("vs_tomesd"), e.get("vs_tomesd_measured"))
            lines.append(f"| {r.case} | {r.provider} | {r.ms:.1f} | {range_text(e['round_ms'], '.1f')} | "
                         f"{_speedup_cell(r.speedup, e['measured_speedup']) if r.provider != 'unpatched' else ''} | "
                         f"{vs_t} | {_fmt(e['rel_l2'], '.3e')} | {_fmt(r.max_diff, '.2e')} | "
                         f"{_fmt(r.peak_mb, '.0f')} | "
                         f"{e.get('merging', '').replace(chr(10), '; ')} |")
    if matching:
        lines += ["", "Matching: fastgen bipartite_match vs tomesd bipartite_soft_matching_random2d (no randomness), "
                  "ms median of interleaved rounds, speed-up of fastgen over tomesd on the same op.", "",
                  "| case | op | ms | min-max | speed-up vs tomesd | max abs diff vs tomesd | peak MB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in matching:
            e = r.extra
            fast = r.provider.startswith("fastgen")
            speed = _speedup_cell(r.speedup, e["measured_speedup"]) if fast else ""
            lines.append(f"| {r.case} | {r.provider} | {r.ms:.2f} | {range_text(e['round_ms'], '.2f')} | {speed} | "
                         f"{_fmt(r.max_diff, '.2e')} | "
                         f"{_fmt(r.peak_mb, '.0f')} |")
    return lines


register_table(SUITE, merging_table)  # fastgen bench / bench/ tables show this suite's own columns


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.benchmarks.merging``: run the suite, print its tables, save with --out."""
    import argparse
    from pathlib import Path

    from fastgen.benchmarks.core import default_device, environment, save

    p = argparse.ArgumentParser(prog="python -m fastgen.benchmarks.merging", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where present)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per setting and round (default 1)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (default {ROUNDS})")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    p.add_argument("--no-matching", action="store_true", help="skip the matching micro-benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="folder for merging-<device>.json/.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    cases = [c for c in merging_cases(device) if args.only is None or args.only in c.name]
    env = environment(device)
    rows = run(device, args.budget, cases=cases, sizes=() if args.no_matching else None, rounds=args.rounds)
    text = "\n".join([f"Device: {env['device']} | torch {env['torch']} | threads {torch.get_num_threads()} | "
                      f"fastgen {env['fastgen']} commit {env['commit']} | {env['date']}"] + merging_table(rows)) + "\n"
    print(text)
    if args.out:
        j, _ = save(rows, env, args.out, f"merging-{device.type}")
        m = Path(args.out) / f"merging-{device.type}.md"
        m.write_text(text)
        print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

