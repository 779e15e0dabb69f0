"""FractalGen suite (issue #15): images per second of the reference sampler and the block sampler
(``fastgen.fractal.sample(..., sampler=...)``), same model, same plan, same run, at several batch sizes.

Providers: "reference" (depth first, one patch's subtree at a time) and "block" (every patch of a parent
iteration in one call; static caches; CUDA graphs on a GPU). Both draw the same keyed random numbers,
so the rows also say how many of the block sampler's uint8 values equal the reference's (all of them in
float32 on a CPU; in bf16 on a GPU the two part where a draw's logits round differently).

Cases: on a GPU the published ImageNet 64 MAR and ImageNet 256 MAR-B / L / H configs (random weights,
bf16, the published CFG scale and temperature) at batch 1, 16 and 256; on a CPU a small MAR over MAR
config (32 px: 64 tokens of 4 x 4 in 16 iterations, then 16 pixels in 16) at batch 1, 4, 16 and 64.

Timing: each provider once untimed (warm-up: allocations, autotuning, graph capture), then ``rounds``
timed calls, the providers interleaved (a change in the machine's load hits both); medians. A full
ImageNet 256 sample with the reference sampler takes minutes per batch, so a case may time a subset of
the top level's iterations (``top_iterations``: the middle iteration of each of that many equal spans,
so that the subset's share of the tokens is close to its share of the iterations; 4 of 64 cover 16 of
256 tokens, 2 of 64 cover 7) and scale the time to a whole image, said so in the table ("estimated").
The reference's time is scaled by the tokens (its cost is each token's subtree); the block sampler's by
whichever of tokens or iterations gives the longer time (its cost is per iteration at small batches,
per token at large), so an estimated speed-up is never inflated by the scaling.

``python -m fastgen.benchmarks.fractal`` runs it with its knobs (``--presets``, ``--batches``, ...).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

import torch

from fastgen.benchmarks.core import PeakMemory, Result, call_ms, free_memory, register_table

SUITE = "fractal"
REFERENCE, BLOCK = "reference", "block"
PROVIDERS = (REFERENCE, BLOCK)
ROUNDS = 3
GPU_PRESETS = ("fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256", "fractalmar_huge_in256")
GPU_BATCHES = (1, 16, 256)
CPU_BATCHES = (1, 4, 16, 64)
# Top-level iterations timed on a GPU (of 64): the reference's whole ImageNet 256 image is minutes.
# The reference spends ~1,100 forwards per top-level token of a 256 px model (16 level-1 iterations, each
# a 16-iteration level-2 node with its pixel and guiding-pixel heads): seconds per token even on an H100.
GPU_TOP_ITERATIONS = {"fractalmar_in64": 4, "fractalmar_base_in256": 2, "fractalmar_large_in256": 2,
                      "fractalmar_huge_in256": 2}
CPU_CASE = "cpu-small-mar (32 px: MAR 64 tok / 16 it, MAR 16 px / 16 it, width 32)"


@dataclass(frozen=True)
class FractalCase:
    """One model at one batch size.

    Attributes:
        name: the case's name in the tables (a preset or ``CPU_CASE``).
        config: a ``FractalConfig``, or the preset's name.
        batch: images per call.
        dtype: "bfloat16" or "float32".
        cfg, temperature: sampling settings (CFG doubles the rows when > 1).
        top_iterations: the top level's iterations timed (``subset_plan``), or None for whole images.
    """

    name: str
    config: object
    batch: int
    dtype: str = "float32"
    cfg: float = 2.0
    temperature: float = 1.0
    top_iterations: int | None = None

    def __post_init__(self):
        for name in ("batch",) + (("top_iterations",) if self.top_iterations is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FractalCase.{name} must be a positive int, got {value!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"FractalCase.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def cpu_config():
    """The CPU case's config: the ImageNet 64 MAR model's shape shrunk (32 px; 64 tokens in 16 iterations
    over 16 pixels in 16), width 32, depth 1."""
    from fastgen.fractal import FractalConfig, LevelConfig, PixelHeadConfig

    levels = (LevelConfig(kind="mar", image_size=32, patch_size=4, width=32, depth=1, heads=2, num_iter=16),
              LevelConfig(kind="mar", image_size=4, patch_size=1, width=32, depth=1, heads=2, num_iter=16))
    head = PixelHeadConfig(width=16, depth=1, heads=2)
    return FractalConfig(levels=levels, pixel_head=head, num_classes=10, guide_head=head)


def fractal_cases(device: torch.device | str, batches=None, presets=None,
                  top_iterations: int | None = None) -> list[FractalCase]:
    """GPU: ``presets`` (default ``GPU_PRESETS``) at ``batches`` (default 1, 16, 256), bf16, the published
    CFG and temperature, ``GPU_TOP_ITERATIONS``; CPU: ``CPU_CASE`` at ``batches`` (default 1, 4, 16, 64), whole
    images. ``top_iterations`` overrides the iterations timed (0: whole images)."""
    from fastgen.fractal import PRESET_SAMPLING

    device = torch.device(device)
    if device.type == "cuda" or presets:
        cases = []
        for preset in presets or GPU_PRESETS:
            s = PRESET_SAMPLING[preset]
            top = GPU_TOP_ITERATIONS.get(preset) if top_iterations is None else (top_iterations or None)
            cases += [FractalCase(preset, preset, b, "bfloat16" if device.type == "cuda" else "float32", s["cfg"],
                                  s["temperature"], top) for b in batches or GPU_BATCHES]
        return cases
    return [FractalCase(CPU_CASE, cpu_config(), b, top_iterations=top_iterations or None)
            for b in batches or CPU_BATCHES]


def subset_plan(plan, top_iterations: int | None):
    """``plan`` whose top level runs ``top_iterations`` of its iterations, the middle one of each of that
    many equal spans (the cosine schedule's token counts rise over the iterations: midpoints keep the
    subset's token share close to its iteration share), or ``plan`` itself for None: for timing (each
    iteration costs what its token count costs, whatever is masked). An AR top level runs its first
    ``top_iterations`` tokens (it decodes in order; each token costs the same)."""
    from fastgen.fractal.schedule import LevelSchedule

    top = plan.levels[0]
    if top_iterations is None or top_iterations >= top.num_iter:
        return plan
    step = top.num_iter / top_iterations
    keep = sorted({min(top.num_iter - 1, int((i + 0.5) * step)) for i in range(top_iterations)})
    sub = LevelSchedule(top.kind, top.seq_len, tuple(top.bounds[i] for i in keep),
                        tuple(top.masked_after[i] for i in keep))
    return replace(plan, levels=(sub,) + plan.levels[1:])


def generated_pixels(model, plan) -> torch.Tensor:
    """``(B, 3, H, W)`` bool: the values ``plan`` generates (all of them, unless its top level runs a subset of
    its iterations: ``subset_plan``; the rest keep their initial value in every sampler, so comparing
    them would say nothing)."""
    from fastgen.fractal import rng
    from fastgen.fractal.config import MAR
    from fastgen.fractal.model import unpatchify

    top, lv = plan.levels[0], model.config.levels[0]
    b, device = plan.batch, plan.labels.device
    picked = torch.zeros(b, lv.seq_len, dtype=torch.bool, device=device)
    if lv.kind == MAR:
        order = rng.permutation(plan.seed, torch.arange(b, device=device), torch.zeros(b, dtype=torch.int64,
                                                                                          device=device),
                                level=0, length=lv.seq_len)
        for start, stop in top.bounds:
            picked.scatter_(1, order[:, start:stop], True)
    else:  # AR: the s-th iteration run predicts token s (a subset is a prefix; every token costs the same)
        picked[:, : len(top.bounds)] = True
    return unpatchify(picked[..., None].expand(-1, -1, lv.token_dim), lv.grid, lv.patch_size)


def build_model(case: FractalCase, device: torch.device):
    """The case's model with random weights (the initialisation) on ``device`` in its dtype."""
    from fastgen.fractal import FractalGen

    torch.manual_seed(0)
    with torch.device(device):
        model = FractalGen(case.config)
    return model.to(getattr(torch, case.dtype)).eval()


def _sampler_call(model, plan, provider: str):
    from fastgen.fractal.block import sample_block
    from fastgen.fractal.model import values_to_uint8
    from fastgen.fractal.sampler import ReferenceSampler

    def run():
        with torch.inference_mode():
            images = ReferenceSampler(model, plan)() if provider == REFERENCE else sample_block(model, plan)
            return values_to_uint8(images)

    return run


def run_case(model, case: FractalCase, device: torch.device, rounds: int = ROUNDS, progress=None,
             budget_s: float | None = None) -> list[Result]:
    """Rows of both providers for ``case`` on ``model``: median ms per call over ``rounds`` interleaved
    timed calls after one untimed call each; images per second (scaled to whole images where
    ``top_iterations`` is set); peak memory of the timed calls; the share of equal uint8 values.

    ``budget_s``: seconds the timed rounds may take, judged by the warm-up calls (which include
    allocation, autotuning and graph capture, so they overestimate): fewer rounds, at least one, where
    ``rounds`` would not fit (a whole GPU phase has minutes for every case). None: ``rounds``."""
    import time

    from fastgen.fractal import make_plan

    labels = [(7 * i) % model.config.num_classes for i in range(case.batch)]
    plan = make_plan(model, labels, cfg=case.cfg, temperature=case.temperature, seed=0, progress=False)
    timed = subset_plan(plan, case.top_iterations)
    total, done = plan.levels[0].num_iter, timed.levels[0].num_iter
    tokens, timed_tokens = plan.levels[0].seq_len, sum(timed.levels[0].counts)
    # to a whole image (module docstring): the reference by tokens, the block by the larger of the two
    scale = {REFERENCE: tokens / timed_tokens, BLOCK: max(tokens / timed_tokens, total / done)}
    calls = {p: _sampler_call(model, timed, p) for p in PROVIDERS}
    start = time.perf_counter()
    images = {p: calls[p]() for p in PROVIDERS}  # warm-up
    if budget_s is not None:
        rounds = max(1, min(rounds, int(budget_s / max(time.perf_counter() - start, 1e-9))))
    ms: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    peaks: dict[str, list] = {p: [] for p in PROVIDERS}
    for _ in range(rounds):
        for p in PROVIDERS:
            with PeakMemory(device) as peak:
                ms[p].append(call_ms(calls[p], device))
            peaks[p].append(peak.mb)
            if progress:
                progress()
    # over the values the timed subset generates (the others are equal in both, whatever the samplers do)
    equal = float((images[BLOCK] == images[REFERENCE])[generated_pixels(model, timed)].float().mean())
    rows = []
    for p in PROVIDERS:
        median = statistics.median(ms[p]) * scale[p]
        known = [m for m in peaks[p] if m is not None]
        rows.append(Result(SUITE, f"{case.name} b{case.batch}", p, median, peak_mb=max(known) if known else None,
                           extra=dict(model=case.name, batch=case.batch, images_per_s=case.batch / median * 1e3,
                                      round_ms=ms[p], top_iterations=done, iterations=total,
                                      top_tokens=timed_tokens, tokens=tokens, scale=scale[p],
                                      estimated=done < total, dtype=case.dtype, cfg=case.cfg,
                                      temperature=case.temperature, equal_fraction=equal,
                                      peak_kind=PeakMemory(device).kind)))
    rows[1].speedup = rows[0].ms / rows[1].ms
    return rows


def run(device: torch.device, budget_s: float | None = None, progress=None, *,
        cases: list[FractalCase] | None = None, rounds: int = ROUNDS) -> list[Result]:
    """Rows of both samplers for every case (default ``fractal_cases(device)``); models built once per
    config. ``budget_s``: each case's timed rounds' budget (``run_case``), None for ``rounds`` each."""
    device = torch.device(device)
    rows: list[Result] = []
    models: dict = {}
    for case in cases or fractal_cases(device):
        key = (str(case.config), case.dtype)
        if key not in models:
            models.clear()
            free_memory(device)
            models[key] = build_model(case, device)
        rows += run_case(models[key], case, device, rounds, progress, budget_s)
    models.clear()
    free_memory(device)
    return rows


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def fractal_table(rows: list[Result]) -> list[str]:
    """Lines of this suite's table (a blank line and a heading first; empty without rows)."""
    if not rows:
        return []
    lines = ["", "FractalGen: images per second, reference (depth first) vs block sampler (one batched call per "
             "parent iteration), same model and plan, interleaved rounds, medians. 'estimated': timed over a "
             "subset of the top level's iterations (and tokens) and scaled to the whole image: the reference by "
             "tokens, the block sampler by the larger of the token and iteration ratios ('x' column).", "",
             "| model | batch | sampler | ms / batch | images / s | speed-up | timed top iterations | equal uint8 "
             "values | peak MB |", "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        e = r.extra
        timed = f"{e['top_iterations']} of {e['iterations']}"
        if e["estimated"]:
            timed += f" ({e['top_tokens']} of {e['tokens']} tokens; estimated, x{e['scale']:.3g})"
        lines.append(f"| {e['model']} ({e['dtype']}) | {e['batch']} | {r.provider} | {r.ms:.1f} | "
                     f"{e['images_per_s']:.3g} | {_fmt(r.speedup, '.2f', 'x')} | {timed} | "
                     f"{e['equal_fraction'] * 100:.1f}% | {_fmt(r.peak_mb, '.0f')} |")
    return lines


register_table(SUITE, fractal_table)


def _int_arg(low: int, listed: bool = False):
    """An argparse type: an int >= ``low`` (``listed``: a comma-separated list of them)."""
    import argparse

    def parse(text: str):
        try:
            values = [int(v) for v in text.split(",")] if listed else [int(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'comma-separated integers' if listed else 'an integer'} expected, "
                                             f"got {text!r}") from None
        if min(values) < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text!r}")
        return values if listed else values[0]

    return parse


def _presets_arg(text: str) -> list[str]:
    import argparse

    from fastgen.fractal import PRESET_SAMPLING

    unknown = [name for name in text.split(",") if name not in PRESET_SAMPLING]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {', '.join(map(repr, unknown))}; the presets are "
                                         f"{', '.join(PRESET_SAMPLING)}")
    return text.split(",")


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.benchmarks.fractal``: run the suite, print its table, save with --out. Bad arguments:
    one line and exit status 2 (argparse's)."""
    import argparse

    from fastgen.benchmarks.core import environment, parse_device, report

    p = argparse.ArgumentParser(prog="python -m fastgen.benchmarks.fractal", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where present)")
    p.add_argument("--presets", type=_presets_arg, default=None, help="comma-separated presets of "
                   "fastgen.fractal.PRESETS (default: the GPU set on a GPU, the small config on a CPU)")
    p.add_argument("--batches", type=_int_arg(1, listed=True), default=None,
                   help="comma-separated batch sizes, each >= 1")
    p.add_argument("--top-iterations", type=_int_arg(0), default=None, help="top-level iterations timed (0: all)")
    p.add_argument("--rounds", type=_int_arg(1), default=ROUNDS, help=f"timed rounds, >= 1 (default {ROUNDS})")
    p.add_argument("--threads", type=_int_arg(1), default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="folder for fractal-<device>.json/.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = parse_device(args.device)  # default: cuda where present
    except ValueError as exc:
        p.error(str(exc))
    rows = run(device, cases=fractal_cases(device, args.batches, args.presets, args.top_iterations),
               rounds=args.rounds)
    report(rows, environment(device), args.out, f"fractal-{device.type}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
