"""FramePack suite (issue #14): wall time and peak memory of every section of one long video, diffusers'
``HunyuanVideoFramepackPipeline`` against fastgen, in the same run, and FramePack's low-VRAM mode.

Providers, on one pipeline (same weights, same inputs, same random draws):

- "diffusers": the unpatched pipeline's own ``__call__``;
- "fastgen": the pipeline under ``fastgen.patch`` through ``fastgen.framepack.sections`` (fused and
  per-section-reused history packing, fastgen's attention, history kept bounded);
- "fastgen low-VRAM": the same after ``fastgen.framepack.enable_low_vram`` (block-level group
  offloading with CUDA streams, tiled VAE); measured last, as offloading is not undone.

Sections are told apart by a forward-pre-hook on the transformer (``SectionMeter``): a section begins
at its first denoising forward and ends where the next one begins (the last where the run returns),
so both providers are cut at the same points and each section carries the work between its steps
(scheduler, history bookkeeping, decoding when ``output_type`` decodes). Per section: wall time
(after a device sync) and peak memory (``core.PeakMemory``: CUDA allocated, weights included, reset
per section; on a CPU the process's resident set size).

Rounds: diffusers then fastgen, ``rounds`` times (per-section medians over the rounds), each run
after a 1-section, 1-step warm-up video under the same patch (compilation, autotuning). Rows, per
provider: the median ms per section, the ratio section N / section 2 (flatness of time) and peak N /
peak 2 (of memory), the max peak, and per-section lists in ``extra``; the fastgen row's ``max_diff``
is max |patched - unpatched| of the transformer's output on section 2's first-step inputs as
diffusers' pipeline made them (``extra["ref_max_abs"]``: the output's own scale).

Sizes: on a GPU FramePackI2V_HY's 13B transformer (``models.FRAMEPACK_I2V_HY``, random weights,
bf16) at 640x608 (13680 noisy, 3040 clean, 380 2x, 400 4x tokens per step), window 9, 20 sections of
2 steps (released: 25 steps; fewer keep the run inside a short GPU window), latents out (no VAE
decode); a one-layer SigLIP of the released width and the narrow HunyuanVideo VAE stand-in
(``models.framepack_i2v_pipeline``). On a CPU the "small" stand-in pipeline (256^2, 4 sections).

``python -m fastgen.benchmarks.framepack`` runs it with its knobs (``--sections``, ``--steps``, ...).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

import fastgen
from fastgen import models
from fastgen.benchmarks.core import PeakMemory, Result, free_memory, max_diff, register_table

SUITE = "framepack"
DIFFUSERS, FASTGEN, LOW_VRAM = "diffusers", "fastgen", "fastgen low-VRAM"
ROUNDS = 1
OUTPUT_TYPES = ("latent", "pt")


@dataclass(frozen=True)
class FramePackCase:
    """One video: ``sections`` sections of ``steps`` denoising steps each.

    Attributes:
        size: "released" (FramePackI2V_HY's transformer, ``models.framepack_i2v_pipeline``) or a key
            of ``models.SIZES`` (``models.build_pipeline("framepack", size)``, CPU stand-ins).
        height, width: pixels (None: the stand-in's own side).
        output_type: "latent" (no decoding: the sections' cost is the transformer's and the history's)
            or "pt" (each section decoded by the pipeline's VAE).
        low_vram_sections: sections of the low-VRAM row (0: no low-VRAM row).
    """

    name: str
    size: str
    sections: int
    steps: int
    height: int | None = None
    width: int | None = None
    window: int = 9
    output_type: str = "latent"
    low_vram_sections: int = 2

    def __post_init__(self):
        for name in ("sections", "steps", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FramePackCase.{name} must be a positive int, got {value!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"FramePackCase.output_type must be one of {OUTPUT_TYPES}, got {self.output_type!r}")
        if self.size != "released" and self.size not in models.SIZES:
            raise ValueError(f"FramePackCase.size must be 'released' or one of {tuple(models.SIZES)}, got {self.size!r}")


def framepack_cases(device: torch.device | str, sections: int | None = None, steps: int | None = None,
                    size: str | None = None) -> list[FramePackCase]:
    """The released transformer at 640x608, 20 sections of 2 steps, on a GPU (issue #14); the "small"
    stand-in at 256^2, 4 sections of 2 steps, on a CPU. ``sections``, ``steps`` and ``size`` override."""
    size = size or ("released" if torch.device(device).type == "cuda" else "small")
    if size == "released":
        case = FramePackCase("framepack-i2v-hy 13B 640x608, window 9", "released", 20, 2, height=608, width=640)
    else:
        case = FramePackCase(f"framepack {size} stand-in, window 9", size, 4, 2)
    return [replace(case, sections=sections or case.sections, steps=steps or case.steps)]


@dataclass
class FramePackBench:
    """A case's pipeline (unpatched) and call kwargs (image, prompt embeddings, height, width, ...)."""

    case: FramePackCase
    pipe: object
    call: dict
    device: torch.device
    about: dict = field(default_factory=dict)  # what was built: model, VAE, image encoder, packed tokens
    inputs: dict | None = None  # section 2's first transformer inputs in diffusers' pipeline (matching check)
    reference: torch.Tensor | None = None  # the unpatched transformer's output on ``inputs``


def framepack_bench(case: FramePackCase, device: torch.device | str) -> FramePackBench:
    """Build the case's pipeline on ``device``: bf16 on CUDA, float32 elsewhere."""
    from fastgen.framepack import FramePackConfig, packed_tokens

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if case.size == "released":
        pipe, call = models.framepack_i2v_pipeline(device, dtype, case.height, case.width)
        about = dict(model=f"HunyuanVideoFramepackTransformer3DModel, FramePackI2V_HY config "
                           f"({sum(p.numel() for p in pipe.transformer.parameters()) / 1e9:.2f}B, random weights, "
                           f"{str(dtype).removeprefix('torch.')})",
                     vae="narrow HunyuanVideo VAE stand-in (8 channels wide, real 8x/4x compression)",
                     image_encoder="SigLIP stand-in (1 layer, 1152 wide, 729 tokens)")
    else:
        pipe, call = models.build_pipeline("framepack", case.size)
        for module in pipe.components.values():  # torch's Module.to: diffusers' warns of fp32 modules it has none of
            if isinstance(module, torch.nn.Module):
                torch.nn.Module.to(module, device=device, dtype=dtype)
        call = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.items()}
        call.pop("num_frames", None)
        if case.height is not None:
            call.update(height=case.height, width=case.width)
        about = dict(model=f"HunyuanVideoFramepackTransformer3DModel, '{case.size}' stand-in (random weights, "
                           f"{str(dtype).removeprefix('torch.')})",
                     vae="narrow HunyuanVideo VAE stand-in", image_encoder="SigLIP stand-in")
    pipe.set_progress_bar_config(disable=True)
    patch = pipe.transformer.config.patch_size
    tokens = packed_tokens(FramePackConfig(latent_window_size=case.window), call["height"] // pipe.vae_scale_factor_spatial,
                           call["width"] // pipe.vae_scale_factor_spatial, (1, patch, patch))
    about["tokens"] = tokens
    return FramePackBench(case, pipe, call, device, about)


class SectionMeter:
    """Wall time and peak memory of each section of one run, told apart by a forward-pre-hook on
    ``transformer``: every ``forwards`` calls (one section's denoising steps) a section ends and the
    next begins. The first section begins at its first forward (the prompt and image encoding before
    it are no section's); the last ends when the ``with`` block does. ``capture``: the section index
    whose first forward's inputs are kept (cloned) in ``inputs``.

    After the block: ``ms`` and ``peak_mb`` (lists, one per section) and ``peak_kind``."""

    def __init__(self, transformer: torch.nn.Module, forwards: int, device: torch.device, capture: int | None = None):
        self.transformer, self.forwards, self.device, self.capture = transformer, forwards, device, capture
        self.ms: list[float] = []
        self.peak_mb: list[float | None] = []
        self.inputs: dict | None = None
        self.peak_kind = PeakMemory(device).kind
        self._calls = 0
        self._memory: PeakMemory | None = None
        self._t0 = 0.0
        self._handle = None

    def _begin(self) -> None:
        self._memory = PeakMemory(self.device)
        self._memory.__enter__()  # syncs the device first on CUDA
        self._t0 = time.perf_counter()

    def _end(self) -> None:
        self._memory.__exit__(None, None, None)  # syncs the device first on CUDA
        self.ms.append((time.perf_counter() - self._t0) * 1e3)
        self.peak_mb.append(self._memory.mb)
        self._memory = None

    def _pre_hook(self, module, args, kwargs):
        if self._calls % self.forwards == 0:
            if self._memory is not None:
                self._end()
            if self.capture == len(self.ms):
                self.inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            self._begin()
        self._calls += 1

    def __enter__(self) -> SectionMeter:
        self._handle = self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        if self._memory is not None:
            self._end()


def _call(bench: FramePackBench, sections: int, steps: int) -> dict:
    from fastgen.framepack import window_num_frames

    window = bench.case.window
    return dict(bench.call, num_frames=sections * window_num_frames(window, bench.pipe.vae_scale_factor_temporal),
                num_inference_steps=steps, latent_window_size=window, output_type=bench.case.output_type,
                generator=torch.Generator().manual_seed(0))


def run_sections(bench: FramePackBench, provider: str, sections: int, steps: int,
                 capture: int | None = None) -> SectionMeter:
    """One video of ``sections`` sections: diffusers' own call for "diffusers" (the pipeline must be
    unpatched), ``fastgen.framepack.sections`` otherwise (patched). Returns the run's meter."""
    from fastgen.framepack import sections as stream

    pipe, call = bench.pipe, _call(bench, sections, steps)
    meter = SectionMeter(pipe.transformer, steps, bench.device, capture)
    last = None
    with torch.no_grad(), meter:
        if provider == DIFFUSERS:
            last = pipe(**call).frames
            last = last[-1] if isinstance(last, list) else last
        else:
            image = call.pop("image")
            for section in stream(pipe, image, progress=False, **call):
                last = section.latents
    made = len(meter.ms)
    if made != sections:
        raise RuntimeError(f"{provider}: the transformer ran {made} sections' worth of forwards, not {sections}")
    if not torch.isfinite(last).all():
        raise RuntimeError(f"{provider}: non-finite output in the last section")
    return meter


def _patched(bench: FramePackBench, provider: str):
    if provider == DIFFUSERS:
        fastgen.unpatch(bench.pipe)
        return None
    return fastgen.patch(bench.pipe)


def timed_run(bench: FramePackBench, provider: str) -> SectionMeter:
    """The case's video with ``provider`` after a 1-section, 1-step warm-up video under the same patch
    (compilation, autotuning, first allocations). Diffusers' first run keeps section 2's first
    transformer inputs (``bench.inputs``) and the unpatched transformer's output on them
    (``bench.reference``)."""
    case = bench.case
    capture = min(1, case.sections - 1) if provider == DIFFUSERS and bench.inputs is None else None
    handle = _patched(bench, provider)
    try:
        run_sections(bench, provider, 1, 1)
        free_memory(bench.device)
        meter = run_sections(bench, provider, case.sections, case.steps, capture)
        if meter.inputs is not None:
            bench.inputs = meter.inputs
            with torch.no_grad():
                bench.reference = bench.pipe.transformer(**bench.inputs)[0]
    finally:
        if handle is not None:
            handle.remove()
    free_memory(bench.device)
    return meter


def transformer_difference(bench: FramePackBench) -> float | None:
    """max |patched - unpatched| of the transformer's output on ``bench.inputs`` (None before them)."""
    if bench.inputs is None:
        return None
    with torch.no_grad(), fastgen.patch(bench.pipe.transformer):
        out = bench.pipe.transformer(**bench.inputs)[0]
    return max_diff(out, bench.reference)


def low_vram_run(bench: FramePackBench, sections: int) -> SectionMeter:
    """``sections`` sections through ``fastgen.framepack.sections`` after ``enable_low_vram`` (patched;
    every model moved to the host first, as offloading starts from there). Not undone: run it last."""
    from fastgen.framepack import enable_low_vram

    pipe = bench.pipe
    if bench.device.type == "cuda":
        pipe.to("cpu")
        free_memory(bench.device)
    fastgen.patch(pipe)
    enable_low_vram(pipe, bench.device)
    run_sections(bench, LOW_VRAM, 1, 1)  # warm-up: the first onloads
    meter = run_sections(bench, LOW_VRAM, sections, bench.case.steps)
    free_memory(bench.device)
    return meter


def _ratio(values: list, a: int, b: int) -> float | None:
    if len(values) <= max(a, b) or values[a] is None or values[b] is None or not values[b]:
        return None
    return values[a] / values[b]


def provider_row(bench: FramePackBench, provider: str, meters: list[SectionMeter], sections: int | None = None) -> Result:
    """The row of ``provider`` from its runs' meters: per-section medians over the runs."""
    case = bench.case
    ms = [statistics.median(m.ms[i] for m in meters) for i in range(len(meters[0].ms))]
    peaks = [None if meters[0].peak_mb[i] is None else statistics.median(m.peak_mb[i] for m in meters)
             for i in range(len(ms))]
    known = [p for p in peaks if p is not None]
    extra = dict(section_ms=ms, section_peak_mb=peaks, round_section_ms=[m.ms for m in meters],
                 sections=len(ms), steps=case.steps, window=case.window, output_type=case.output_type,
                 rounds=len(meters), peak_kind=meters[0].peak_kind, total_ms=sum(ms),
                 flatness=_ratio(ms, len(ms) - 1, 1), memory_flatness=_ratio(peaks, len(peaks) - 1, 1),
                 **bench.about)
    if provider == LOW_VRAM and bench.device.type != "cuda":
        extra["note"] = "enable_low_vram on the CPU (onload device cpu): the code path, no GPU memory to measure"
    return Result(SUITE, case.name, provider, statistics.median(ms), peak_mb=max(known) if known else None, extra=extra)


def add_comparison(rows: list[Result], diff: float | None, reference: torch.Tensor | None) -> None:
    """Speed-ups over the diffusers row of the same case (ratio of medians of per-section ms) and the
    transformer-output check on the fastgen row."""
    base = {r.case: r for r in rows if r.provider == DIFFUSERS}
    for r in rows:
        b = base.get(r.case)
        if b is not None and r.ms and not math.isnan(r.ms):
            r.speedup = b.ms / r.ms
            pairs = list(zip(b.extra["section_ms"], r.extra["section_ms"]))
            if r.provider != DIFFUSERS and pairs:
                r.extra["section_speedup"] = [x / y for x, y in pairs]
        if r.provider == FASTGEN and diff is not None:
            r.max_diff = diff
            r.extra["reference"] = "unpatched transformer, section 2's first-step inputs from diffusers' pipeline"
            r.extra["ref_max_abs"] = float(reference.abs().max())


def run(device: torch.device, budget_s: float = 1.0, progress=None, *, case: FramePackCase | None = None,
        rounds: int = ROUNDS, low_vram: bool = True) -> list[Result]:
    """Rows of diffusers, fastgen and (unless ``low_vram`` is False or the case has no low-VRAM
    sections) fastgen low-VRAM for ``case`` (default ``framepack_cases(device)[0]``). ``budget_s`` is
    not used: a run is sized by its sections and steps."""
    device = torch.device(device)
    case = case or framepack_cases(device)[0]
    bench = framepack_bench(case, device)
    meters: dict[str, list[SectionMeter]] = {DIFFUSERS: [], FASTGEN: []}
    for _ in range(rounds):
        for provider in meters:  # interleaved: a change in the machine's load hits both
            meters[provider].append(timed_run(bench, provider))
            if progress:
                progress()
    rows = [provider_row(bench, p, m) for p, m in meters.items()]
    diff = transformer_difference(bench)
    if low_vram and case.low_vram_sections:
        rows.append(provider_row(bench, LOW_VRAM, [low_vram_run(bench, case.low_vram_sections)]))
        if progress:
            progress()
    add_comparison(rows, diff, bench.reference)
    del bench
    free_memory(device)
    return rows


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def framepack_table(rows: list[Result]) -> list[str]:
    """Lines of this suite's tables (a blank line and a heading before each; empty without rows): per
    provider the median ms per section, flatness of time and memory, speed-up, peak and the
    transformer-output check; then per case every section side by side."""
    if not rows:
        return []
    e0 = rows[0].extra
    lines = ["", f"FramePack: one video, per section (a section = its denoising steps and what follows them up to "
             f"the next section's first step); {e0['steps']} steps per section (released: 25), output_type "
             f"'{e0['output_type']}', {e0['rounds']} round(s) interleaved, per-section medians. Model: {e0['model']}; "
             f"VAE: {e0['vae']}; image encoder: {e0['image_encoder']}. Packed tokens per step: "
             + ", ".join(f"{k} {v}" for k, v in e0["tokens"].items()) + f". Peak MB: {e0['peak_kind']}, per section.",
             "", "| case | provider | sections | median ms / section | section N / section 2 ms | speed-up vs diffusers "
             "| max peak MB | peak N / peak 2 | max abs diff (transformer) | output max abs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        e = r.extra
        lines.append(f"| {r.case} | {r.provider} | {e['sections']} | {_fmt(r.ms, '.1f')} | {_fmt(e['flatness'], '.3f')} "
                     f"| {_fmt(r.speedup, '.3f', 'x') if r.provider != DIFFUSERS else ''} | {_fmt(r.peak_mb, '.0f')} "
                     f"| {_fmt(e['memory_flatness'], '.3f')} | {_fmt(r.max_diff, '.2e')} | {_fmt(e.get('ref_max_abs'), '.3g')} |")
    notes = [f"- {r.provider}: {r.extra['note']}" for r in rows if r.extra.get("note")]
    if notes:
        lines += [""] + notes
    for case in dict.fromkeys(r.case for r in rows):
        by = {r.provider: r for r in rows if r.case == case}
        providers = [p for p in (DIFFUSERS, FASTGEN, LOW_VRAM) if p in by]
        n = max(r.extra["sections"] for r in by.values())
        head = " | ".join(f"{p} ms" for p in providers)
        peaks = " | ".join(f"{p} peak MB" for p in providers)
        ratio = DIFFUSERS in by and FASTGEN in by
        lines += ["", f"Per section, {case}:", "",
                  f"| section | {head} | {'diffusers / fastgen | ' if ratio else ''}{peaks} |",
                  "|" + " ---: |" * (1 + 2 * len(providers) + ratio)]
        for i in range(n):
            cells = []
            for key in ("section_ms", "section_peak_mb"):
                for p in providers:
                    values = by[p].extra[key]
                    cells.append(_fmt(values[i] if i < len(values) else None, ".1f" if key == "section_ms" else ".0f"))
                if key == "section_ms" and ratio:
                    d, f = by[DIFFUSERS].extra["section_ms"], by[FASTGEN].extra["section_ms"]
                    cells.append(_fmt(d[i] / f[i] if i < min(len(d), len(f)) else None, ".3f", "x"))
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


register_table(SUITE, framepack_table)  # fastgen bench / bench/ tables show this suite's own columns


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.benchmarks.framepack``: run the suite, print its tables, save with --out."""
    import argparse

    from fastgen.benchmarks.core import default_device, environment, markdown_table, save

    p = argparse.ArgumentParser(prog="python -m fastgen.benchmarks.framepack", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where present)")
    p.add_argument("--size", default=None, help="'released' (default on a GPU) or a stand-in size: tiny, small (CPU default)")
    p.add_argument("--sections", type=int, default=None, help="sections per video (default 20 on a GPU, 4 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per section (default 2)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (default {ROUNDS})")
    p.add_argument("--output-type", default="latent", choices=OUTPUT_TYPES, help="latent (default) or pt (decode)")
    p.add_argument("--low-vram-sections", type=int, default=2, help="sections of the low-VRAM row (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="folder for framepack-<device>.json/.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    case = replace(framepack_cases(device, args.sections, args.steps, args.size)[0], output_type=args.output_type,
                   low_vram_sections=args.low_vram_sections)
    env = environment(device)
    rows = run(device, case=case, rounds=args.rounds)
    print(markdown_table(rows, env))
    if args.out:
        j, m = save(rows, env, args.out, f"framepack-{device.type}")
        print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

