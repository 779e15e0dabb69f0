"""KV-Edit suite on Flux: time of the edit (foreground-only denoising from one inversion) and of the
inversion, peak memory and cache sizes for each cache option (device, device fp8, pinned CPU, CPU
fp8, inversion-free), against a full re-generation at the same size, same run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastgen
from fastgen import models
from fastgen.benchmarks.core import Result, add_speedups, free_memory, max_diff, run_once, time_runs_ms
from fastgen.benchmarks.denoisers import denoiser_cases

SUITE = "edit"
EDIT_BASELINES = ("full generation (diffusers)", "full generation (fastgen.patch)")
# KVEditor.edit options per path; the first is the exact reference of the others' foreground.
EDIT_PATHS = {
    "kv-edit, device cache": {},
    "kv-edit, device fp8 cache": dict(cache_dtype="fp8"),
    "kv-edit, cpu cache (pinned)": dict(cache_device="cpu"),
    "kv-edit, cpu fp8 cache": dict(cache_device="cpu", cache_dtype="fp8"),
    "kv-edit, inversion-free": dict(inversion_free=True),
}


@dataclass(frozen=True)
class EditCase:
    """A Flux model, an image side in pixels, a centred square mask of ``mask_fraction``."""

    name: str
    model: models.DenoiserSpec | None  # None: the pipeline is built elsewhere (``fastgen demo --task edit``)
    side: int
    mask_fraction: float = 0.25
    steps: int = 28
    skip_steps: int = 4


def edit_cases(device: torch.device | str) -> list[EditCase]:
    """Flux-dev at 1024^2 on a GPU (issue #4); a small Flux at 256^2 on a CPU."""
    flux = denoiser_cases(device)[0]
    if torch.device(device).type == "cuda":
        return [EditCase("flux-dev 1024^2, 25% mask", flux, 1024)]
    return [EditCase("flux small 256^2, 25% mask", flux, 256)]


@dataclass
class EditBench:
    """A Flux pipeline around the case's transformer (a small VAE: timing is the transformer's),
    its text inputs, a source image and mask, and the KVEditor."""

    case: EditCase
    pipe: object
    text: dict  # prompt_embeds, pooled_prompt_embeds
    image: torch.Tensor  # (3, side, side) in [0, 1]
    mask: torch.Tensor  # (side, side) bool
    editor: object
    target_text: dict | None = None  # target_prompt_embeds, target_pooled_prompt_embeds (default: reversed source)

    def generate(self):
        """A full ``steps``-step generation at the image's size: what an edit replaces."""
        with torch.no_grad():
            return self.pipe(**self.text, num_inference_steps=self.case.steps, height=self.case.side,
                             width=self.case.side, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    @property
    def source(self) -> dict:
        return dict(source_prompt_embeds=self.text["prompt_embeds"],
                    source_pooled_prompt_embeds=self.text["pooled_prompt_embeds"])

    @property
    def target(self) -> dict:
        if self.target_text is not None:
            return self.target_text
        return dict(target_prompt_embeds=self.text["prompt_embeds"].flip(1),  # the same tokens, reversed
                    target_pooled_prompt_embeds=self.text["pooled_prompt_embeds"])

    @property
    def schedule(self) -> dict:
        return dict(num_inference_steps=self.case.steps, skip_steps=self.case.skip_steps)

    def invert(self, options: dict):
        cache = {k: v for k, v in options.items() if k.startswith("cache_")}
        return self.editor.invert(self.image, self.mask, **self.source, **self.schedule, **cache)

    def denoise(self, inversion):
        return self.editor.denoise(inversion, **self.target, output_type="latent")

    def edit(self, options: dict):
        return self.editor.edit(self.image, self.mask, **self.source, **self.target, **self.schedule, **options,
                                output_type="latent", generator=torch.Generator().manual_seed(0))

    @functools.cached_property
    def source_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (1, N, C) the encoded source, fg (N,) bool the edited tokens); encoded once per bench."""
        from fastgen import flux_latents as fl

        x0, _ = fl.encode_image(self.pipe, self.image)
        return x0, fl.token_mask(self.mask, self.case.side, self.case.side, fl.pixels_per_token(self.pipe)).to(x0.device)


def edit_bench(case: EditCase, device, dtype) -> EditBench:
    """The case's bench: its Flux transformer with a small Flux-style VAE in a ``FluxPipeline``, a
    random (3, side, side) image, the centred mask, a ``KVEditor``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from fastgen.edit import KVEditor

    model = case.model.build(device, dtype)
    vae = models.autoencoder_kl(case.model.config["in_channels"] // 4, flux_style=True).eval().to(device, dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    inputs = case.model.inputs(device, dtype)
    text = dict(prompt_embeds=inputs["encoder_hidden_states"], pooled_prompt_embeds=inputs["pooled_projections"])
    image = torch.rand(3, case.side, case.side, generator=torch.Generator().manual_seed(5))
    return EditBench(case, pipe, text, image, centre_mask(case.side, case.mask_fraction), KVEditor(pipe))


def centre_mask(side: int, fraction: float) -> torch.Tensor:
    """(side, side) bool: a centred square of ``fraction`` of the image, on the 16-px token grid."""
    mask = torch.zeros(side, side, dtype=torch.bool)
    half = round(side * fraction**0.5 / 32) * 16
    mask[side // 2 - half : side // 2 + half, side // 2 - half : side // 2 + half] = True
    return mask


def edit_path_result(bench: EditBench, path: str, device, repeats: int, reference=None,
                     edit_timer: Callable | None = None) -> tuple[Result, object]:
    """One path's row: edit ms (without inversion), inversion ms, peak memory, cache sizes, whether
    the background is bit-exact, foreground difference from ``reference`` = (path, latents) of
    an exact path; and its output latents. ``edit_timer(fn) -> ms`` times the edit (default:
    ``repeats`` synced runs; bench/ hands in pytest-benchmark's)."""
    options = EDIT_PATHS[path]
    edit_timer = edit_timer or (lambda fn: time_runs_ms(fn, device, repeats))
    if options.get("inversion_free"):  # no separate inversion: the whole edit is the time
        out, peak = run_once(lambda: bench.edit(options), device)
        ms = edit_timer(lambda: bench.edit(options))
        inv_ms, total = None, ms
    else:
        (inv, out), peak = run_once(lambda: (lambda i: (i, bench.denoise(i)))(bench.invert(options)), device)
        ms = edit_timer(lambda: bench.denoise(inv))  # one inversion serves many edits
        inv.release()
        del inv
        free_memory(device)
        inv_ms = time_runs_ms(lambda: bench.invert(options).release(), device, repeats)
        total = inv_ms + ms
    x0, fg = bench.source_latents
    diff = None  # inversion-free is another method; fp8 and offload are compared with the exact cache
    if reference is not None and not options.get("inversion_free"):
        diff = max_diff(out.latents, reference[1])
    stats = out.stats
    free_memory(device)
    return Result(SUITE, bench.case.name, path, ms, max_diff=diff, peak_mb=peak, extra={
        "reference": f"{reference[0]} (same run)" if diff is not None else None,
        "inversion_ms": inv_ms, "total_ms": total, "cache_mb": stats["cache_bytes"] / 2**20,
        "host_mb": stats["host_cache_bytes"] / 2**20, "max_resident_layers": stats["max_resident_layers"],
        "forwards": stats["forwards"], "edited_tokens": stats["edited_tokens"], "tokens": stats["tokens"],
        "background_exact": torch.equal(out.latents[:, ~fg], x0[:, ~fg])}), out.latents


def edit_baseline_result(bench: EditBench, provider: str, device, repeats: int,
                         timer: Callable | None = None) -> Result:
    """A full generation's row, diffusers' own or under ``fastgen.patch``."""
    handle = fastgen.patch(bench.pipe) if "fastgen" in provider else None
    try:
        out, peak = run_once(bench.generate, device)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{provider}: non-finite latents")
        ms = (timer or (lambda fn: time_runs_ms(fn, device, repeats)))(bench.generate)
    finally:
        if handle is not None:
            handle.remove()
    free_memory(device)
    return Result(SUITE, bench.case.name, provider, ms, peak_mb=peak,
                  extra={"inversion_ms": None, "total_ms": ms, "forwards": bench.case.steps})


def _oom_result(case: EditCase, path: str, err: Exception) -> Result:
    return Result(SUITE, case.name, path, float("nan"), extra={"error": f"{type(err).__name__}: {str(err)[:120]}"})


def run(device: torch.device, budget_s: float = 1.0, progress=None) -> list[Result]:
    """KV-Edit per cache option vs a full generation: edit ms, inversion ms, peak memory, cache."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = 2 if device.type == "cuda" else 3
    results = []
    for case in edit_cases(device):
        bench = edit_bench(case, device, dtype)
        for provider in EDIT_BASELINES:
            results.append(edit_baseline_result(bench, provider, device, repeats))
            if progress:
                progress()
        reference = None  # the first exact path that fits: the device cache, else the offloaded one
        for path in EDIT_PATHS:
            try:
                row, latents = edit_path_result(bench, path, device, repeats, reference)
                if reference is None and set(EDIT_PATHS[path]) <= {"cache_device"}:
                    reference = (path, latents)
            except torch.cuda.OutOfMemoryError as err:  # a 28-step device cache may not fit: say so
                row = _oom_result(case, path, err)
                free_memory(device)
            results.append(row)
            if progress:
                progress()
        del bench
        free_memory(device)
    add_speedups(results, lambda p: p.startswith("full generation"))
    return results
