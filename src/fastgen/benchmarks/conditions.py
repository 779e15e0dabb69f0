"""Conditions suite (OminiControl2) on Flux: per-image cost of conditioning, four ways: (a) symmetric
extra tokens every step (the original OminiControl cost), (b) asymmetric attention without the
cache, (c) with the K/V cache, (d) with the cache and compact (half-resolution) conditions.
Per image = first forward + (steps - 1) later forwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastgen import models
from fastgen.benchmarks.core import Result, add_speedups, max_diff, run_once, synced, time_ms
from fastgen.benchmarks.denoisers import denoiser_cases

SUITE = "condition"
CONDITION_VARIANTS = ("(a) symmetric", "(b) asymmetric", "(c) cached", "(d) cached+compact")


@dataclass(frozen=True)
class ConditionCase:
    """A Flux model, an output size and conditions (token grids, full and compact), 28 steps."""

    name: str
    model: models.DenoiserSpec
    grid: int  # output token grid side (1024^2 -> 64)
    conditions: int
    compact_grid: int  # condition token grid side in the compact variant (512^2 -> 32)
    steps: int = 28


def condition_cases(device: torch.device | str) -> list[ConditionCase]:
    """Flux-dev at 1024^2 with 1 and 3 conditions of 1024^2 (compact: 512^2) on a GPU; a small
    Flux at 256^2 on a CPU, where the times show the work saved, not kernel speed."""
    flux = denoiser_cases(device)[0]
    if torch.device(device).type == "cuda":
        return [ConditionCase(f"flux-dev 1024^2, {n} x 1024^2 cond", flux, 64, n, 32) for n in (1, 3)]
    return [ConditionCase(f"flux small 256^2, {n} x 256^2 cond", flux, 16, n, 8) for n in (1, 3)]


def condition_setup(case: ConditionCase, variant: str, device, dtype):
    """(branches, ConditionConfig) of ``variant`` (one of ``CONDITION_VARIANTS``): the case's
    conditions as random token grids placed beside the image, and the variant's config."""
    from fastgen.condition import ConditionConfig
    from fastgen.condition.branches import Branch
    from fastgen.flux_latents import grid_ids

    side = case.compact_grid if variant.startswith("(d)") else case.grid
    ch = case.model.config["in_channels"]
    branches = []
    for i in range(case.conditions):
        tokens = torch.randn(1, side * side, ch, generator=torch.Generator().manual_seed(100 + i)).to(device, dtype)
        ids = grid_ids(side, side, scale=case.grid / side, delta=(0, -case.grid * (i + 1)), device=device)
        branches.append(Branch(tokens, ids))
    config = {"(a)": ConditionConfig(attention="symmetric"), "(b)": ConditionConfig(kv_cache=False)}.get(
        variant[:3], ConditionConfig())
    return branches, config


def condition_runs(model, inputs: dict, branches, config) -> tuple[Callable, Callable, Callable]:
    """(first, step, state_of): ``first`` runs a generation's first forward (it fills the cache
    where there is one), ``step`` a later forward, each returning the model output."""
    from fastgen.condition.branches import BranchState, branch_forward

    warm = BranchState.create(model, branches, config)

    def first():
        with torch.no_grad():
            return branch_forward(model, BranchState.create(model, branches, config), **inputs, return_dict=False)[0]

    def step():
        with torch.no_grad():
            return branch_forward(model, warm, **inputs, return_dict=False)[0]

    step()  # the first call of ``warm``: later calls are steady-state steps
    return first, step, lambda: warm


def run(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    """Per-image time (first forward + (steps - 1) later ones) and peak memory of each variant."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    model = None
    for case in condition_cases(device):
        if model is None:
            model = case.model.build(device, dtype)
        inputs = case.model.inputs(device, dtype)
        ref_step = None
        for variant in CONDITION_VARIANTS:  # warm-up of every path (allocator, kernels, autotuning)
            run_once(condition_runs(model, inputs, *condition_setup(case, variant, device, dtype))[0], device)
        for variant in CONDITION_VARIANTS:
            branches, config = condition_setup(case, variant, device, dtype)
            first, step, state_of = condition_runs(model, inputs, branches, config)
            out, peak = run_once(first, device)
            step_out = step()
            first_ms = time_ms(synced(first, device), device, budget_s)
            step_ms = first_ms if not config.use_cache else time_ms(synced(step, device), device, budget_s)
            per_image = first_ms + (case.steps - 1) * step_ms
            main = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
            cond = sum(b.tokens.shape[1] for b in branches)
            tokens = (main + cond) * (1 if config.use_cache else case.steps) + main * (case.steps - 1) * config.use_cache
            diff = None
            if variant.startswith("(b)"):
                ref_step = step_out
            elif ref_step is not None:
                diff = max_diff(step_out, ref_step)
            cache = state_of().cache
            results.append(Result(
                SUITE, case.name, variant, per_image, max_diff=diff, peak_mb=peak,
                extra={"reference": "(b) asymmetric, same inputs" if diff is not None else None, "steps": case.steps,
                       "first_forward_ms": first_ms, "later_forward_ms": step_ms, "tokens_per_image": tokens,
                       "cache_mb": cache.nbytes / 2**20 if cache is not None else 0.0},
            ))
            if progress:
                progress()
            del first, step, out, step_out
        del inputs
    add_speedups(results, lambda p: p.startswith("(a)"))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results
