"""``fastgen demo``: run a pipeline unpatched and patched with the same seed, print what changed.

By default the pipeline is built in code with random weights (no download), in a family's
architecture at a small size (``fastgen.models.build_pipeline``); ``--model PATH`` loads a local
diffusers checkpoint instead. Timing does not depend on weight values, and the difference between
the two runs is what fastgen's kernels change, so random weights make an honest demo of speed and
exactness.

The built-in pipelines take fixed random prompt embeddings: text encoders are not what fastgen
patches (a checkpoint brings its own and uses the prompt).

Timing: after one warm-up of each, the runs compared alternate in rounds (baseline, fastgen,
baseline, fastgen, ...), so a change in the machine's load hits both alike. Every round's time is
kept; the report gives each run's median and min-max range, and a speed-up (ratio of medians) only
where the ranges are apart, else "no measurable difference". Peak memory is CUDA's allocated peak
on a GPU, the process's sampled resident set size (host RSS) elsewhere.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fastgen
from fastgen.benchmarks.core import PeakMemory, measured_speedup, range_text, speedup_text
from fastgen.ops import autotune as tuning
from fastgen.models import build_pipeline

__all__ = ["Run", "Variant", "build_pipeline", "compare", "compare_conditions", "compare_edit", "load_pipeline",
           "measured_speedup", "pipeline_output", "place", "report", "report_conditions", "report_edit",
           "speedup_text"]


def load_pipeline(path: str, dtype: torch.dtype = torch.float32):
    """A local diffusers checkpoint (no download) in ``dtype`` (modules the checkpoint keeps in
    float32 stay so); the call uses a fixed prompt."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return pipe, dict(prompt="a photograph of a red fox in fresh snow, golden hour")


def place(pipe, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Move a pipeline to ``device``, and its models built in code to ``dtype``. Cast as torch casts
    a module: diffusers' ``ModelMixin.to(dtype)`` warns about modules to keep in float32 even when a
    model has none (these have none); a checkpoint gets its dtype from ``load_pipeline`` instead."""
    pipe.to(device)
    if dtype is not None:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                torch.nn.Module.to(module, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Interleaved timing
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One configuration's timed rounds."""

    label: str
    round_ms: list[float]  # ms per denoising step of each timed round, in the order they ran
    peak_mb: float | None  # the highest ``PeakMemory`` over the rounds; None where it cannot be read
    memory: str  # what ``peak_mb`` measures: "CUDA allocated" or "host RSS"
    latents: torch.Tensor  # the last round's output latents (float32, CPU)
    repeatable: bool  # every timed round's latents equal the warm-up's, bit for bit

    @property
    def ms_per_step(self) -> float:
        """Median ms per denoising step over the rounds."""
        return statistics.median(self.round_ms)


@dataclass
class Variant:
    """One configuration of a comparison: its label, the pipeline call's kwargs, and a context
    entered around each of its runs, outside the timed part (e.g. ``fastgen.patch``)."""

    label: str
    call: dict
    around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def pipeline_output(result) -> torch.Tensor:
    """The images of an image pipeline's output, the frames of a video pipeline's (FramePack's latent
    output, a list of the history after each section: the last one, every latent frame made)."""
    out = result.frames if hasattr(result, "frames") else result.images
    return out[-1] if isinstance(out, list) and out and torch.is_tensor(out[-1]) else out


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (timed rounds of each run), got {repeats}")


def _timed(fn: Callable, device: torch.device) -> tuple[float, PeakMemory, object]:
    """(ms, peak memory, output) of one synced call of ``fn``."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with PeakMemory(device) as memory:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        ms = (time.perf_counter() - t0) * 1e3
    return ms, memory, out


def _generate(pipe, kwargs: dict) -> Callable:
    return lambda: pipeline_output(pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)))


def _warm_up(pipe, variant: Variant, steps: int) -> torch.Tensor:
    """One untimed run of ``variant`` (compilation, autotuning, allocator): its latents."""
    with variant.around():
        return _generate(pipe, dict(variant.call, num_inference_steps=steps, output_type="latent"))().float().cpu()


def _rounds(pipe, variants: list[Variant], warm: dict[str, torch.Tensor], steps: int, device: torch.device,
            rounds: int, progress) -> dict[str, Run]:
    """``rounds`` rounds, each running every variant once in turn; ``warm`` holds each variant's
    warm-up latents, which its rounds are checked against bit for bit."""
    runs = {v.label: _generate(pipe, dict(v.call, num_inference_steps=steps, output_type="latent")) for v in variants}
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    peaks: dict[str, list[float]] = {v.label: [] for v in variants}
    last: dict[str, torch.Tensor] = {}
    same = {v.label: True for v in variants}
    kind = PeakMemory(device).kind
    for _ in range(rounds):
        for v in variants:
            with v.around():
                ms, memory, out = _timed(runs[v.label], device)
            times[v.label].append(ms / steps)
            if memory.mb is not None:
                peaks[v.label].append(memory.mb)
            last[v.label] = out.detach().float().cpu()
            same[v.label] &= torch.equal(last[v.label], warm[v.label])
            progress()
    return {v.label: Run(v.label, times[v.label], max(peaks[v.label], default=None), kind, last[v.label],
                         same[v.label]) for v in variants}


# --------------------------------------------------------------------------------------------
# --task patch
# --------------------------------------------------------------------------------------------


def compare(pipe, call, *, steps=4, repeats=3, device="cpu", config=None, approximate=(),
            progress=lambda: None) -> dict:
    """Baseline (diffusers) and ``fastgen.patch`` with ``config``, same seed, same device: a warm-up
    of each, then ``repeats`` interleaved rounds (patched and unpatched around each fastgen round).
    Returns the two ``Run`` s (ms per step of every round, peak memory, latents), the measured
    speed-up (None: no measurable difference), the output differences, what was patched, and whether
    every unpatched round (each after an unpatch) reproduced the output from before any patch bit
    for bit. ``progress`` is called after the warm-ups and after each round's run
    ((2 + len(approximate)) * repeats + 1).

    ``approximate``: more ``PatchConfig`` s (token merging: ``tome=``, ``todo=``) run in the same
    rounds; each comes back in ``result["approximate"]`` as a dict with its ``Run``, speed-up,
    deviation from the baseline (relative L2 and max of the final latents) and merging report."""
    _check_repeats(repeats)
    device = torch.device(device)
    pipe.set_progress_bar_config(disable=True)
    patched: dict = {}

    @contextlib.contextmanager
    def patch():
        with fastgen.patch(pipe, config) as handle:
            patched.update(summary=handle.state.summary(), config=handle.config)
            yield

    base, fast = Variant("baseline (diffusers)", call), Variant("fastgen.patch", call, patch)
    merged, reports = [], {}
    for extra in approximate:
        label = f"fastgen.patch + {merging_label(extra)}"

        @contextlib.contextmanager
        def patch_extra(extra=extra, label=label):
            with fastgen.patch(pipe, extra) as handle:
                reports[label] = handle.merging
                yield

        merged.append(Variant(label, call, patch_extra))
    decided = len(tuning.TUNER.log)
    # The baseline's warm-up runs before any patch: the output every later unpatched round must equal
    warm = {v.label: _warm_up(pipe, v, steps) for v in [base, fast, *merged]}
    progress()
    runs = _rounds(pipe, [base, fast, *merged], warm, steps, device, repeats, progress)
    b, f = runs[base.label], runs[fast.label]
    diff = (f.latents - b.latents).abs()
    extras = [dict(run=runs[v.label], speedup=measured_speedup(b.round_ms, runs[v.label].round_ms),
                   rel_l2=float((runs[v.label].latents - b.latents).norm() / b.latents.norm().clamp_min(1e-30)),
                   max_diff=float((runs[v.label].latents - b.latents).abs().max()), merging=reports.get(v.label, ""))
              for v in merged]
    return dict(baseline=b, fastgen=f, speedup=measured_speedup(b.round_ms, f.round_ms), max_diff=float(diff.max()),
                mean_diff=float(diff.mean()), patched=patched["summary"], config=patched["config"],
                unpatch_bit_exact=b.repeatable, decisions=tuning.TUNER.log[decided:], approximate=extras)


def merging_label(config) -> str:
    """"ToMe 0.5", "ToDo x2", "ToMe 0.5 + ToDo x2" for a ``PatchConfig`` with token merging."""
    parts = ([f"ToMe {config.tome.ratio:g}"] if config.tome is not None else []) + (
        [f"ToDo x{config.todo.factor}"] if config.todo is not None else [])
    return " + ".join(parts) or "no merging"


def _header(env: dict, what: str) -> list[str]:
    return [f"fastgen demo: {what}",
            f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | fastgen {env['fastgen']} "
            f"({env['commit']})"]


def _mem(run: Run) -> str:
    if run.peak_mb is None:
        return "n/a (RSS unreadable here: install psutil)" if run.memory == "host RSS" else "n/a"
    return f"{run.peak_mb:.0f} MB"


def _rounds_text(n: int) -> str:
    return "1 round" if n == 1 else f"{n} rounds"


def _time_columns(runs: Sequence[Run]) -> tuple[str, str, Callable[[Run], str]]:
    """(header cells, alignment cells, row cells of a run) of the time and memory columns."""
    n, kind = min(len(r.round_ms) for r in runs), runs[0].memory
    head = f"ms / step, median | min-max of {_rounds_text(n)} | peak memory ({kind})"
    return head, "---: | ---: | ---:", lambda r: f"{r.ms_per_step:.2f} | {range_text(r.round_ms, '.2f')} | {_mem(r)}"


def _memory_note(runs: Sequence[Run]) -> list[str]:
    if runs[0].memory != "host RSS":
        return []
    return ["(peak memory: resident set size of the whole process - weights, libraries, allocator cache - "
            "sampled every 10 ms during the rounds)"]


def decisions_text(decisions, config, env: dict, limit: int = 8) -> list[str]:
    """What ``auto`` chose during the run and why (``fastgen.ops.autotune``), one line each."""
    if config is not None and config.attention_backend != "auto" and config.prologue_backend != "auto":
        return []  # nothing automatic to report
    if not decisions:
        if env.get("compute_capability") is None:
            where = "on a CPU PyTorch runs attention and the prologue"
        elif not tuning.enabled():
            where = "autotuning is off (FASTGEN_AUTOTUNE=0): the fixed table"
        else:
            where = "every key was decided earlier in this process"
        return [f"automatic backends: nothing decided in this run ({where})"]
    lines = [f"automatic backends ({len(decisions)} keys):"] + [f"  {tuning.describe(d)}" for d in decisions[:limit]]
    if len(decisions) > limit:
        lines.append(f"  ... and {len(decisions) - limit} more (fastgen info lists them all)")
    return lines


def report(result: dict, env: dict, what: str) -> str:
    """The demo's printout: device and versions, what was patched, the per-step time table (median,
    min-max, peak memory), the speed-up or "no measurable difference", output differences, unpatch."""
    b, f = result["baseline"], result["fastgen"]
    extras = result.get("approximate", [])
    head, align, cells = _time_columns([b, f] + [e["run"] for e in extras])
    lines = _header(env, what) + [
        f"patched: {result['patched']} | {result['config']}",
        "",
        f"| run | {head} |",
        f"| --- | {align} |",
        f"| {b.label} | {cells(b)} |",
        f"| {f.label} | {cells(f)} |",
        *[f"| {e['run'].label} (approximate) | {cells(e['run'])} |" for e in extras],
        *_memory_note([b, f]),
        "",
        f"speed-up: {speedup_text(b.round_ms, f.round_ms)}",
        f"output difference (final latents): max {result['max_diff']:.3e}, mean {result['mean_diff']:.3e}",
        f"unpatch restores bit-identical output: {result['unpatch_bit_exact']}",
    ]
    for e in extras:
        lines += [f"{e['run'].label}: speed-up {speedup_text(b.round_ms, e['run'].round_ms)}; its cost: final latents "
                  f"deviate by {e['rel_l2']:.2%} (relative L2), max {e['max_diff']:.3e}"
                  + (f"; merges in {e['merging']}" if e["merging"] else "")]
    lines += decisions_text(result.get("decisions", []), result["config"], env)
    if env.get("compute_capability") is None:
        lines.append("(no GPU: fastgen's kernels do not run here; the exactly patched pipeline runs upstream's "
                     "attention plus the exact K/V reuse, so expect no measurable difference there. Kernel speed "
                     "needs a GPU; token merging saves work on any device.)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# --task condition and --task edit (Flux)
# --------------------------------------------------------------------------------------------

TASKS = ("patch", "condition", "edit")


def _text(pipe, call: dict, prompt_key: str = "prompt") -> dict:
    """prompt_embeds / pooled_prompt_embeds of the call (encoded once when it holds a prompt)."""
    if "prompt_embeds" in call:
        return dict(prompt_embeds=call["prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"])
    e, p, _ = pipe.encode_prompt(prompt=call[prompt_key], prompt_2=None, device=pipe._execution_device)
    return dict(prompt_embeds=e, pooled_prompt_embeds=p)


def compare_conditions(pipe, call, *, steps=4, repeats=3, device="cpu", conditions=1, progress=lambda: None) -> dict:
    """Image conditions three ways, same seed: OminiControl's symmetric extra tokens every step,
    asymmetric attention without the cache (the exact baseline), and fastgen's K/V cache; a warm-up
    of each, then ``repeats`` interleaved rounds. ``progress`` is called after each round's run."""
    from fastgen.condition import Condition, ConditionConfig, FluxConditionPipeline

    if conditions < 1:
        raise ValueError(f"conditions must be >= 1, got {conditions}")
    _check_repeats(repeats)
    device = torch.device(device)
    cp = FluxConditionPipeline.from_pipe(pipe)
    cp.set_progress_bar_config(disable=True)
    h, w = call["height"], call["width"]
    conds = [Condition(torch.rand(3, h, w, generator=torch.Generator().manual_seed(40 + i)),
                       position_delta=(0, -(w // 16) * (i + 1))) for i in range(conditions)]
    configs = {"OminiControl: symmetric, every step": ConditionConfig(attention="symmetric"),
               "asymmetric, no cache (baseline)": ConditionConfig(kv_cache=False),
               "fastgen: asymmetric + K/V cache": ConditionConfig()}
    variants = [Variant(label, dict(call, conditions=conds, condition_config=cfg)) for label, cfg in configs.items()]
    warm, stats = {}, {}
    for v in variants:
        warm[v.label] = _warm_up(cp, v, steps)
        stats[v.label] = dict(cp.last_condition_stats)
    runs = _rounds(cp, variants, warm, steps, device, repeats, progress)
    sym, base, fast = runs.values()
    diff = (fast.latents - base.latents).abs()
    return dict(runs=runs, stats=stats, conditions=conditions, speedup=measured_speedup(base.round_ms, fast.round_ms),
                speedup_vs_symmetric=measured_speedup(sym.round_ms, fast.round_ms), max_diff=float(diff.max()),
                mean_diff=float(diff.mean()))


def report_conditions(result: dict, env: dict, what: str) -> str:
    runs = list(result["runs"].values())
    head, align, cells = _time_columns(runs)
    lines = _header(env, f"{what}, {result['conditions']} image condition(s)") + [
        "", f"| run | {head} | condition forwards | cache MB |", f"| --- | {align} | ---: | ---: |"]
    for run in runs:
        s = result["stats"][run.label]
        lines.append(f"| {run.label} | {cells(run)} | {s['branch_forwards']} | {s['cache_bytes'] / 2**20:.1f} |")
    sym, base, fast = runs
    lines += [*_memory_note(runs), "", "speed-up of the K/V cache:",
              f"  over asymmetric without it: {speedup_text(base.round_ms, fast.round_ms)}",
              f"  over symmetric (OminiControl): {speedup_text(sym.round_ms, fast.round_ms)}",
              f"output difference, cache vs no cache (final latents): max {result['max_diff']:.3e}, "
              f"mean {result['mean_diff']:.3e}"]
    return "\n".join(lines)


FULL_GENERATION, KV_EDIT = "full generation (diffusers)", "kv-edit, device cache"


def compare_edit(pipe, call, *, steps=4, repeats=3, device="cpu", mask_fraction=0.25, progress=lambda: None) -> dict:
    """KV-Edit of the centre ``mask_fraction`` of an image the pipeline generates, against a full
    generation at the same size: edit time (foreground only, from one inversion) and full generation
    time in ``repeats`` interleaved rounds, inversion time, cache size, peak memory, background
    bit-exact. ``progress`` is called 3 times (source image, rounds, full generation's row)."""
    from fastgen.benchmarks import edit as E
    from fastgen.benchmarks.core import add_speedups
    from fastgen.edit import KVEditor

    if not 0 < mask_fraction <= 1:
        raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
    _check_repeats(repeats)
    device = torch.device(device)
    side = call["height"]
    if call["width"] != side:
        raise ValueError(f"the edit demo takes a square image, got {call['height']}x{call['width']}")
    pipe.set_progress_bar_config(disable=True)
    text = _text(pipe, call)
    target = None
    if "prompt" in call:  # a real checkpoint: a real target prompt
        t = _text(pipe, dict(prompt=call["prompt"].replace("red fox", "grey wolf")))
        target = dict(target_prompt_embeds=t["prompt_embeds"], target_pooled_prompt_embeds=t["pooled_prompt_embeds"])
    image = pipe(**text, height=side, width=side, num_inference_steps=steps, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images[0].float().cpu()  # the source
    progress()
    case = E.EditCase(f"{side}^2, {mask_fraction:.0%} mask", None, side, mask_fraction, steps, max(1, round(steps / 7)))
    bench = E.EditBench(case, pipe, text, image, E.centre_mask(side, mask_fraction), KVEditor(pipe), target)
    times: dict[str, list[float]] = {FULL_GENERATION: [], KV_EDIT: []}
    peaks: dict[str, list[float]] = {FULL_GENERATION: [], KV_EDIT: []}

    def interleaved(edit):  # the edit's timer (it runs while the inversion lives): rounds of both in turn
        bench.generate()  # the full generation's warm-up; the edit has just run once
        for _ in range(repeats):
            for label, fn in ((FULL_GENERATION, bench.generate), (KV_EDIT, edit)):
                ms, memory, _ = _timed(fn, device)
                times[label].append(ms)
                if memory.mb is not None:
                    peaks[label].append(memory.mb)
        return statistics.median(times[KV_EDIT])

    edit_row = E.edit_path_result(bench, KV_EDIT, device, repeats, edit_timer=interleaved)[0]
    progress()
    rows = [E.edit_baseline_result(bench, FULL_GENERATION, device, repeats,
                                   timer=lambda fn: statistics.median(times[FULL_GENERATION])), edit_row]
    progress()
    speedup = measured_speedup(times[FULL_GENERATION], times[KV_EDIT])
    if speedup is not None:  # the table shows a speed-up only where it is measurable
        add_speedups(rows, lambda p: p == FULL_GENERATION)
    return dict(rows=rows, case=case, speedup=speedup, round_ms=times,
                peak_mb={k: max(v, default=None) for k, v in peaks.items()}, memory=PeakMemory(device).kind,
                background_exact=edit_row.extra["background_exact"])


def report_edit(result: dict, env: dict, what: str) -> str:
    from fastgen.benchmarks.core import edit_table

    c, times = result["case"], result["round_ms"]
    full, edit = times[FULL_GENERATION], times[KV_EDIT]
    lines = _header(env, f"{what}; KV-Edit of a generated image, {c.steps} steps, {c.skip_steps} skipped")
    lines += edit_table(result["rows"])[2:]  # the table, without its heading line
    lines += ["", f"ms over {_rounds_text(len(edit))}, interleaved, median (min-max): full generation "
              f"{statistics.median(full):.1f} ({range_text(full, '.1f')}), edit {statistics.median(edit):.1f} "
              f"({range_text(edit, '.1f')})"]
    if result["memory"] == "host RSS":
        mb = {k: "n/a" if v is None else f"{v:.0f} MB" for k, v in result["peak_mb"].items()}
        lines.append(f"peak memory (host RSS of the whole process, sampled every 10 ms): full generation "
                     f"{mb[FULL_GENERATION]}, edit {mb[KV_EDIT]}")
    lines += [f"edit speed-up over a full generation (edit only; one inversion serves many edits): "
              f"{speedup_text(full, edit)}", f"background latents bit-exact: {result['background_exact']}"]
    return "\n".join(lines)
