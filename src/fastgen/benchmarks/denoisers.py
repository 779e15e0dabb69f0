"""Denoiser suite: time per denoising step and peak memory of each supported denoiser, diffusers vs
``fastgen.patch`` (default, exact settings), in the same run. The released configs with random
weights on a GPU (timing does not depend on weight values); small stand-ins on a CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastgen
from fastgen import models
from fastgen.benchmarks.core import Result, add_speedups, max_diff, run_once, synced, time_ms

SUITE = "denoiser"


def denoiser_cases(device: torch.device | str) -> list[models.DenoiserSpec]:
    """Real configs on a GPU (issue #3: Flux-dev, SDXL, SD3.5-medium at 1024^2, Wan 1.3B 480p 33
    frames, HunyuanVideo 544x960 33 frames); small ones on a CPU, where the suite shows only that
    patching costs nothing. The first is Flux (the conditions and KV-Edit suites use it)."""
    return models.real_denoisers() if torch.device(device).type == "cuda" else models.small_denoisers()


def denoiser_step(model, inputs: dict, forwards: int) -> Callable:
    """One denoising step: ``forwards`` calls of the model (CFG as separate calls when 2)."""

    def step():
        with torch.no_grad():
            out = None
            for _ in range(forwards):
                out = model(**inputs, return_dict=False)[0]
            return out

    return step


def run(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    """Per-step time and peak memory of each denoiser, diffusers vs fastgen.patch, same run."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for case in denoiser_cases(device):
        model = case.build(device, dtype)
        inputs = case.inputs(device, dtype)
        step = denoiser_step(model, inputs, case.forwards_per_step)
        ref = None
        for provider in ("diffusers", "fastgen"):
            if provider == "fastgen":
                fastgen.patch(model)
            run_once(step, device)  # warm-up: compilation, autotuning, first K/V cache fill
            out, peak = run_once(step, device)
            ref = out if ref is None else ref
            ms = time_ms(synced(step, device), device, budget_s)
            results.append(Result(SUITE, f"{case.name} ({case.forwards_per_step} fwd/step)", provider, ms,
                                  max_diff=max_diff(out, ref), peak_mb=peak, extra={"reference": "diffusers, same run"}))
            if progress:
                progress()
        fastgen.unpatch(model)
        del model, inputs, step, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(results, lambda p: p == "diffusers")
    return results
