"""Token merging: what each ToMe / ToDo setting costs in image quality, and what it saves in time, on a
real pipeline with real weights.

For every prompt, the pipeline generates one image unpatched and one with each setting
(``fastgen.patch(pipe, tome=ToMeConfig(ratio))``, ``todo=ToDoConfig(factor)``), all from the same seed
(prompt i: ``--seed + i``), the settings running in turn for each prompt so that a change in the
machine's load hits all alike. Per setting it reports the median time per image (the whole pipeline
call: text encoding, denoising, decoding), the speed-up over unpatched (ratio of medians; "ranges
overlap" where the per-image min-max ranges are not apart) and how far its images are from the
unpatched ones:

- PSNR (dB): ``10 * log10(1 / MSE)`` over every pixel and channel in [0, 1], computed here (the
  definition needs no library); identical images give inf. Averaged over prompts.
- SSIM: torchmetrics' ``structural_similarity_index_measure`` where torchmetrics is installed, else
  scikit-image's ``structural_similarity`` (Gaussian window, sigma 1.5, population covariances: the
  same definition, Wang et al. 2004), data range 1; "n/a" where neither is installed
  (``pip install torchmetrics`` or ``scikit-image``).
- LPIPS (AlexNet), where the ``lpips`` package is installed and its backbone weights load.

It writes ``report.md`` (the table), ``results.json``, ``grid.png`` (a row per prompt, a column per
setting) and every image under ``images/``.

    python tools/tome_quality.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out build/tome-quality
    python tools/tome_quality.py --model ./sdxl-base --ratios 0.5 --todo 2 --steps 30 --prompts prompts.txt
    python tools/tome_quality.py --model tiny-sd15 --steps 2 --out /tmp/tome-quality   # smoke test, no weights

``--model tiny-FAMILY`` (``tiny-sd15``, ``tiny-sdxl``, ``tiny-flux``, ...) runs
``fastgen.models.build_pipeline(FAMILY, "tiny")``: random weights and fixed random prompt embeddings
(no text encoder, so the prompts only name the images), for testing this script.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastgen
from fastgen.benchmarks.core import environment, measured_speedup
from fastgen.demo import merging_label, pipeline_output

DEFAULT_PROMPTS = (
    "a photograph of a red fox in fresh snow, golden hour",
    "a bowl of ramen on a wooden table, studio lighting, high detail",
    "an aerial view of a coastal town with white houses and a blue sea",
    "a portrait of an old fisherman with a grey beard, 85mm photograph",
)


@dataclass
class Setting:
    """One column: a label, the ``fastgen.PatchConfig`` (None: unpatched), and what it gave."""

    label: str
    config: fastgen.PatchConfig | None
    ms: list[float] = field(default_factory=list)  # per image, in prompt order
    images: list[torch.Tensor] = field(default_factory=list)  # (C, H, W) float in [0, 1], CPU
    merging: str = ""


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (any shape): ``10 log10(1 / MSE)``; inf when equal."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim_function():
    """(ssim(a, b) for (C, H, W) images in [0, 1], its source) or (None, why not)."""
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim
    except ImportError:
        tm_ssim = None
    if tm_ssim is not None:
        return (lambda a, b: float(tm_ssim(a[None].float(), b[None].float(), data_range=1.0))), "torchmetrics"
    try:
        from skimage.metrics import structural_similarity as sk_ssim
    except ImportError:
        return None, "n/a (pip install torchmetrics or scikit-image)"

    def ssim(a, b):
        return float(sk_ssim(a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(), channel_axis=-1,
                             data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))

    return ssim, "scikit-image"


def lpips_function(device: torch.device):
    """(lpips(a, b) for (C, H, W) images in [0, 1], its source) or (None, why not)."""
    try:
        import lpips
    except ImportError:
        return None, "n/a (pip install lpips)"
    try:
        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except (OSError, RuntimeError) as e:  # the AlexNet backbone is downloaded on first use
        return None, f"n/a (lpips weights did not load: {type(e).__name__})"

    def distance(a, b):
        with torch.no_grad():
            return float(net(a[None].to(device) * 2 - 1, b[None].to(device) * 2 - 1))

    return distance, "lpips (AlexNet)"


# --------------------------------------------------------------------------------------------
# Pipelines and generation
# --------------------------------------------------------------------------------------------


def load(model: str, device: torch.device, dtype: torch.dtype):
    """(pipeline on ``device``, base call kwargs, whether prompts reach it) of ``--model``."""
    if model.startswith("tiny-"):
        from fastgen.models import FAMILIES, build_pipeline

        family = model[len("tiny-"):]
        if family not in FAMILIES:
            raise SystemExit(f"--model tiny-FAMILY: FAMILY must be one of {', '.join(FAMILIES)}, got {family!r}")
        pipe, call = build_pipeline(family, "tiny")
        pipe.to(device)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                torch.nn.Module.to(module, dtype=dtype)
        call = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in call.items()}
        return pipe, call, False
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.to(device)
    return pipe, {}, True


def to_images(out) -> torch.Tensor:
    """A pipeline's output (``output_type="pt"``: (B, C, H, W), or (B, F, C, H, W) frames) as
    (N, C, H, W) float in [0, 1] on the CPU, frames as images."""
    x = pipeline_output(out)
    if isinstance(x, (list, tuple)):
        x = torch.stack([torch.as_tensor(i) for i in x])
    x = torch.as_tensor(x).detach().float().cpu()
    if x.dim() == 5:
        x = x.flatten(0, 1)
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):  # channels last
        x = x.permute(0, 3, 1, 2)
    return x.clamp(0, 1)


def generate(pipe, call: dict, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """(images, ms) of one pipeline call from ``seed``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = pipe(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return to_images(out), (time.perf_counter() - t0) * 1e3


def run_setting(pipe, setting: Setting, call: dict, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """One generation under ``setting`` (patched around the call, unpatched after it)."""
    if setting.config is None:
        return generate(pipe, call, seed, device)
    with fastgen.patch(pipe, setting.config) as handle:
        setting.merging = handle.merging
        return generate(pipe, call, seed, device)


def settings_of(args) -> list[Setting]:
    """Unpatched, then ToMe at each ratio, then ToDo at each factor."""
    out = [Setting("unpatched", None)]
    level = args.max_downsample
    out += [Setting("", fastgen.PatchConfig(tome=fastgen.ToMeConfig(r, max_downsample=level))) for r in args.ratios]
    out += [Setting("", fastgen.PatchConfig(todo=fastgen.ToDoConfig(f, max_downsample=level))) for f in args.todo]
    for s in out[1:]:
        s.label = f"fastgen {merging_label(s.config)}"
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _speedup(base: list[float], ms: list[float]) -> str:
    ratio = statistics.median(base) / statistics.median(ms)
    if len(ms) < 2:
        return f"{ratio:.2f}x (one image: no spread to compare)"
    return f"{ratio:.2f}x" + ("" if measured_speedup(base, ms) is not None else " (ranges overlap)")


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def scores(settings: list[Setting], device: torch.device) -> tuple[list[dict], dict]:
    """(per-setting rows: ms, speed-up, mean PSNR / SSIM / LPIPS vs unpatched; the metrics' sources)."""
    ssim, ssim_src = ssim_function()
    lp, lp_src = lpips_function(device)
    base = settings[0]
    rows = []
    for s in settings:
        pairs = [(a, b) for x, y in zip(s.images, base.images) for a, b in zip(x, y)]  # per frame / image
        rows.append(dict(setting=s.label, ms_median=statistics.median(s.ms), ms=s.ms,
                         speedup=statistics.median(base.ms) / statistics.median(s.ms),
                         speedup_text=_speedup(base.ms, s.ms) if s is not base else "",
                         psnr=_mean([psnr(a, b) for a, b in pairs]),
                         ssim=_mean([ssim(a, b) for a, b in pairs]) if ssim else None,
                         lpips=_mean([lp(a, b) for a, b in pairs]) if lp else None, merging=s.merging))
    return rows, dict(psnr="computed here", ssim=ssim_src, lpips=lp_src)


def _cell(x, spec: str) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:{spec}}"


def markdown(rows: list[dict], sources: dict, meta: dict) -> str:
    env = meta["environment"]
    lines = [f"# Token merging quality: {meta['model']}", "",
             f"{meta['images']} image(s) per setting ({meta['prompts_note']}), {meta['steps']} steps, "
             f"seed {meta['seed']} (+ image index), {meta['size']}; device {env['device']}, {meta['dtype']}, "
             f"torch {env['torch']}, fastgen {env['fastgen']} ({env['commit']}), {env['date']}.", "",
             "Time per image: the whole pipeline call, median over images, settings run in turn per image. Quality: "
             "against the unpatched image of the same prompt and seed, mean over images "
             f"(PSNR {sources['psnr']}; SSIM {sources['ssim']}; LPIPS {sources['lpips']}).", "",
             "| setting | s / image | min-max | speed-up vs unpatched | PSNR dB | SSIM | LPIPS | merges |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        seconds = [ms / 1e3 for ms in r["ms"]]
        lines.append(f"| {r['setting']} | {statistics.median(seconds):.3f} | {min(seconds):.3f}-{max(seconds):.3f} | "
                     f"{r['speedup_text']} | {_cell(r['psnr'], '.2f')} | {_cell(r['ssim'], '.4f')} | "
                     f"{_cell(r['lpips'], '.4f')} | {r['merging'].replace(chr(10), '; ')} |")
    lines += ["", "Images: grid.png (a row per prompt, a column per setting, in the table's order) and images/."]
    return "\n".join(lines) + "\n"


def save_images(settings: list[Setting], prompts: list[str], out: Path) -> Path:
    """Every image as PNG under ``out/images`` and the grid (first frame of videos) as ``out/grid.png``."""
    from PIL import Image, ImageDraw

    def pil(t: torch.Tensor) -> Image.Image:
        return Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype("uint8").squeeze())

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for j, s in enumerate(settings):
        for i, images in enumerate(s.images):
            for k, image in enumerate(images):
                pil(image).save(folder / f"p{i:02d}-{j:02d}-{s.label.replace(' ', '_')}-{k}.png")
    h, w = settings[0].images[0].shape[-2:]
    scale = min(1.0, 256 / max(h, w)) if max(h, w) >= 128 else 128 / max(h, w)  # cells 128-256 px: labels fit
    ch, cw, head = max(1, round(h * scale)), max(1, round(w * scale)), 16
    grid = Image.new("RGB", (cw * len(settings), head + ch * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, s in enumerate(settings):
        draw.text((j * cw + 2, 2), s.label.replace("fastgen ", ""), fill="black")
        for i, images in enumerate(s.images):
            grid.paste(pil(images[0]).convert("RGB").resize((cw, ch)), (j * cw, head + i * ch))
    grid.save(out / "grid.png")
    return out / "grid.png"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [] if text.strip().lower() in ("", "none") else [int(v) for v in text.split(",") if v.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tome_quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a diffusers pipeline folder or hub id, or tiny-FAMILY (tiny-sd15)")
    p.add_argument("--prompts", default=None, help="a text file, one prompt a line (default: 4 built-in prompts)")
    p.add_argument("--ratios", type=_floats, default=[0.3, 0.5, 0.7], help="ToMe ratios, comma-separated (0.3,0.5,0.7)")
    p.add_argument("--todo", type=_ints, default=[2], help="ToDo factors, comma-separated, or none (default 2)")
    p.add_argument("--max-downsample", type=int, default=None, help="ToMe/ToDo max_downsample (default: fastgen's)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda where present, else cpu")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: float16 on CUDA, float32 on a CPU")
    p.add_argument("--out", default="tome-quality", help="output folder (default ./tome-quality)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    try:
        settings_of(args)
    except ValueError as e:  # a ratio or factor fastgen refuses: its message says which
        p.error(str(e))
    return args


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SystemExit(f"--prompts {path}: no prompt in the file (one a line; # starts a comment)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    prompts = read_prompts(args.prompts)
    pipe, base_call, takes_prompts = load(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    settings = settings_of(args)

    def call(prompt: str, steps: int) -> dict:
        return dict(base_call, **size, num_inference_steps=steps, **({"prompt": prompt} if takes_prompts else {}))

    for s in settings:  # warm-up (compilation, autotuning, allocator), untimed
        run_setting(pipe, s, call(prompts[0], min(2, args.steps)), args.seed, device)
    for i, prompt in enumerate(prompts):
        for s in settings:
            images, ms = run_setting(pipe, s, call(prompt, args.steps), args.seed + i, device)
            s.images.append(images)
            s.ms.append(ms)
            print(f"[{i + 1}/{len(prompts)}] {s.label}: {ms / 1e3:.2f} s", file=sys.stderr)
    rows, sources = scores(settings, device)
    first = settings[0].images[0]
    meta = dict(model=args.model, steps=args.steps, seed=args.seed, dtype=str(dtype).replace("torch.", ""),
                images=len(prompts), size=f"{first.shape[-1]}x{first.shape[-2]} px", environment=environment(device),
                prompts_note="prompts" if takes_prompts else "built-in tiny pipeline: fixed random prompt embeddings",
                prompts=prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = save_images(settings, prompts, out)
    (out / "report.md").write_text(markdown(rows, sources, meta))
    (out / "results.json").write_text(json.dumps(dict(meta, metrics=sources, rows=rows), indent=2, default=str))
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}, {grid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
