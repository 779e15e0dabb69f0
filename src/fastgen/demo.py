"""``fastgen demo``: run a pipeline unpatched and patched with the same seed, print what changed.

By default the pipeline is built in code with random weights (no download), in a family's
architecture at a small size; ``--model PATH`` loads a local diffusers checkpoint instead. Timing
does not depend on weight values, and the difference between the two runs is what fastgen's
kernels change, so random weights make an honest demo of speed and exactness.

The built-in pipelines take fixed random prompt embeddings: text encoders are not what fastgen
patches (a checkpoint brings its own and uses the prompt).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

import fastgen

FAMILIES = ("flux", "sd3", "sd15", "sdxl", "wan", "hunyuan")

# Width knobs and image side per size. The VAE downsamples 8x like the real ones, so token counts
# are real: Flux at 1024^2 attends over 4096 image tokens. "tiny" is for tests on a CPU, "small"
# the CPU default, "large" (Flux-dev's width, fewer layers) the GPU default.
SIZES = {
    "tiny": dict(heads=2, head_dim=16, layers=1, side=64),
    "small": dict(heads=4, head_dim=32, layers=1, side=256),
    "medium": dict(heads=8, head_dim=128, layers=2, side=512),
    "large": dict(heads=24, head_dim=128, layers=4, side=1024),
}


def _vae(latent_channels: int, flux_style: bool = False):
    from diffusers import AutoencoderKL

    kw = dict(shift_factor=0.0, scaling_factor=1.0) if flux_style else {}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, **kw)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def build_pipeline(family: str = "flux", size: str = "small"):
    """(pipeline, call kwargs) of a ``family`` pipeline built in code with random weights."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    s = SIZES[size]
    heads, hd, layers, side = s["heads"], s["head_dim"], s["layers"], s["side"]
    n_txt = 8 if size == "tiny" else 77  # prompt tokens (Flux takes 512 at full size; the cost is in the image)
    torch.manual_seed(0)
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        axes = (hd // 4, 3 * hd // 8, 3 * hd // 8) if hd >= 32 else (4, 4, 8)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=2 * layers,
                                    attention_head_dim=hd, num_attention_heads=heads, joint_attention_dim=128,
                                    pooled_projection_dim=64, axes_dims_rope=axes)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, flux_style=True),
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                    guidance_scale=3.5)
    elif family == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        tr = SD3Transformer2DModel(sample_size=side // 8, patch_size=2, in_channels=4, num_layers=2 * layers,
                                   attention_head_dim=hd, num_attention_heads=heads, caption_projection_dim=heads * hd,
                                   joint_attention_dim=128, pooled_projection_dim=64, out_channels=4,
                                   pos_embed_max_size=max(8, side // 16), qk_norm="rms_norm", dual_attention_layers=(0,))
        pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
                                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        text_encoder_3=None, tokenizer_3=None)
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                    negative_prompt_embeds=_rand(1, n_txt, 128, seed=3), negative_pooled_prompt_embeds=_rand(1, 64, seed=4),
                    guidance_scale=5.0)
    elif family == "wan":
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=hd, in_channels=4,
                                   out_channels=4, text_dim=128, freq_dim=256, ffn_dim=4 * heads * hd, num_layers=2 * layers,
                                   rope_max_seq_len=1024)
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        # Wan runs CFG as two calls with separate embeddings, each reused at every step
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), negative_prompt_embeds=_rand(1, n_txt, 128, seed=3),
                    guidance_scale=5.0, num_frames=5 if size == "tiny" else 17)
    elif family == "hunyuan":
        from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                               HunyuanVideoTransformer3DModel)

        vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                        layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
                                        temporal_compression_ratio=4, mid_block_add_attention=False)
        axes = (hd // 4, 3 * hd // 8, 3 * hd // 8) if hd >= 32 else (4, 4, 8)
        tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=hd,
                                            num_layers=layers, num_single_layers=2 * layers, num_refiner_layers=1,
                                            mlp_ratio=4.0, patch_size=1 if size == "tiny" else 2, patch_size_t=1,
                                            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=128,
                                            pooled_projection_dim=64, rope_axes_dim=axes)
        pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae, text_encoder_2=None,
                                    tokenizer_2=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
        mask = torch.ones(1, n_txt, dtype=torch.long)
        mask[:, n_txt * 5 // 8 :] = 0  # a padded prompt, as the LLaMA encoder hands it over
        call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                    prompt_attention_mask=mask, num_frames=5 if size == "tiny" else 17)
        if size == "tiny":  # video multiplies tokens: keep the interpreter's per-token programs few in tests
            side = 32
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

        xl = family == "sdxl"
        width = heads * hd // 2
        unet = UNet2DConditionModel(
            sample_size=side // 8, block_out_channels=(width, 2 * width), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # UNet's legacy `attention_head_dim` is the number of heads: head dim = channels / heads = hd
            cross_attention_dim=128, attention_head_dim=(heads // 2, heads),
            norm_num_groups=8, **(dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                                       projection_class_embeddings_input_dim=64 + 6 * 8) if xl else {}),
        )
        sched = EulerDiscreteScheduler(steps_offset=1)  # as released SD checkpoints configure it (0 is deprecated)
        if xl:
            pipe = StableDiffusionXLPipeline(vae=_vae(4), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                             tokenizer_2=None, unet=unet, scheduler=sched)
            call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), pooled_prompt_embeds=_rand(1, 64, seed=2),
                        negative_prompt_embeds=_rand(1, n_txt, 128, seed=3),
                        negative_pooled_prompt_embeds=_rand(1, 64, seed=4), guidance_scale=5.0)
        else:
            pipe = StableDiffusionPipeline(vae=_vae(4), text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            call = dict(prompt_embeds=_rand(1, n_txt, 128, seed=1), negative_prompt_embeds=_rand(1, n_txt, 128, seed=3),
                        guidance_scale=7.5)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    call.update(height=side, width=side)
    return pipe, call


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


@dataclass
class Run:
    label: str
    ms_per_step: float
    peak_mb: float | None
    latents: torch.Tensor


def _output(result) -> torch.Tensor:
    return result.frames if hasattr(result, "frames") else result.images  # video pipelines return frames


def _time_run(pipe, call, steps, device, repeats, label, progress) -> Run:
    kwargs = dict(call, num_inference_steps=steps, output_type="latent")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pipe(**dict(kwargs, num_inference_steps=min(2, steps)), generator=torch.Generator("cpu").manual_seed(0))  # warm-up
    times, peak, out = [], None, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        out = _output(pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)))
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / steps)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        progress()
    return Run(label, statistics.median(times), peak, out.detach().float().cpu())


def compare(pipe, call, *, steps=4, repeats=3, device="cpu", config=None, progress=lambda: None) -> dict:
    """Baseline then fastgen, same seed, same device: per-step time, speed-up, output differences,
    peak memory; then the baseline once more after unpatch, which must match it bit for bit."""
    device = torch.device(device)
    pipe.set_progress_bar_config(disable=True)
    base = _time_run(pipe, call, steps, device, repeats, "baseline (diffusers)", progress)
    with fastgen.patch(pipe, config) as handle:
        fast = _time_run(pipe, call, steps, device, repeats, "fastgen.patch", progress)
        summary = handle.state.summary()
        config = handle.config
    restored = _time_run(pipe, call, steps, device, 1, "after unpatch", progress)
    diff = (fast.latents - base.latents).abs()
    return dict(baseline=base, fastgen=fast, speedup=base.ms_per_step / fast.ms_per_step,
                max_diff=float(diff.max()), mean_diff=float(diff.mean()), patched=summary, config=config,
                unpatch_bit_exact=torch.equal(restored.latents, base.latents))


def report(result: dict, env: dict, what: str) -> str:
    b, f = result["baseline"], result["fastgen"]
    mem = lambda r: "n/a (CUDA only)" if r.peak_mb is None else f"{r.peak_mb:.0f} MB"  # noqa: E731
    lines = [
        f"fastgen demo: {what}",
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | fastgen {env['fastgen']} "
        f"({env['commit']})",
        f"patched: {result['patched']} | {result['config']}",
        "",
        "| run | ms / step | peak memory |",
        "| --- | ---: | ---: |",
        f"| {b.label} | {b.ms_per_step:.2f} | {mem(b)} |",
        f"| {f.label} | {f.ms_per_step:.2f} | {mem(f)} |",
        "",
        f"speed-up: {result['speedup']:.3f}x",
        f"output difference (final latents): max {result['max_diff']:.3e}, mean {result['mean_diff']:.3e}",
        f"unpatch restores bit-identical output: {result['unpatch_bit_exact']}",
    ]
    if env.get("compute_capability") is None:
        lines.append("(no GPU: fastgen's kernels do not run here; patched pipelines run upstream's own attention "
                     "code plus the exact K/V reuse, so on a CPU this ratio is ~1.0 within timing noise, which on a "
                     "busy 2-core machine is tens of percent. Kernel speed needs a GPU.)")
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
    asymmetric attention without the cache (the exact baseline), and fastgen's K/V cache."""
    from fastgen.condition import Condition, ConditionConfig, FluxConditionPipeline

    if conditions < 1:
        raise ValueError(f"conditions must be >= 1, got {conditions}")
    device = torch.device(device)
    cp = FluxConditionPipeline.from_pipe(pipe)
    cp.set_progress_bar_config(disable=True)
    h, w = call["height"], call["width"]
    conds = [Condition(torch.rand(3, h, w, generator=torch.Generator().manual_seed(40 + i)),
                       position_delta=(0, -(w // 16) * (i + 1))) for i in range(conditions)]
    variants = {"OminiControl: symmetric, every step": ConditionConfig(attention="symmetric"),
                "asymmetric, no cache (baseline)": ConditionConfig(kv_cache=False),
                "fastgen: asymmetric + K/V cache": ConditionConfig()}
    runs, stats = {}, {}
    for label, cfg in variants.items():
        runs[label] = _time_run(cp, dict(call, conditions=conds, condition_config=cfg), steps, device, repeats, label,
                                progress)
        stats[label] = dict(cp.last_condition_stats)
    sym, base, fast = runs.values()
    diff = (fast.latents - base.latents).abs()
    return dict(runs=runs, stats=stats, conditions=conditions, speedup=base.ms_per_step / fast.ms_per_step,
                speedup_vs_symmetric=sym.ms_per_step / fast.ms_per_step, max_diff=float(diff.max()),
                mean_diff=float(diff.mean()))


def compare_edit(pipe, call, *, steps=4, repeats=3, device="cpu", mask_fraction=0.25, progress=lambda: None) -> dict:
    """KV-Edit of the centre ``mask_fraction`` of an image the pipeline generates, against a full
    generation at the same size: edit time (foreground only, from one inversion), inversion time,
    cache size, peak memory, background bit-exact."""
    from fastgen import benchmarks as B
    from fastgen.edit import KVEditor

    if not 0 < mask_fraction <= 1:
        raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
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
    case = B.EditCase(f"{side}^2, {mask_fraction:.0%} mask", None, side, mask_fraction, steps, max(1, round(steps / 7)))
    bench = B.EditBench(case, pipe, text, image, B.centre_mask(side, mask_fraction), KVEditor(pipe), target)
    rows = [B.edit_baseline_result(bench, "full generation (diffusers)", device, repeats)]
    progress()
    rows.append(B.edit_path_result(bench, "kv-edit, device cache", device, repeats)[0])
    progress()
    B.add_speedups(rows, lambda p: p.startswith("full generation"))
    return dict(rows=rows, case=case, speedup=rows[1].speedup, background_exact=rows[1].extra["background_exact"])


def _header(env: dict, what: str) -> list[str]:
    return [f"fastgen demo: {what}",
            f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | fastgen {env['fastgen']} "
            f"({env['commit']})"]


def _mem(run) -> str:
    return "n/a (CUDA only)" if run.peak_mb is None else f"{run.peak_mb:.0f} MB"


def report_conditions(result: dict, env: dict, what: str) -> str:
    lines = _header(env, f"{what}, {result['conditions']} image condition(s)") + [
        "", "| run | ms / step | condition forwards | cache MB | peak memory |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, run in result["runs"].items():
        s = result["stats"][label]
        lines.append(f"| {label} | {run.ms_per_step:.2f} | {s['branch_forwards']} | {s['cache_bytes'] / 2**20:.1f} "
                     f"| {_mem(run)} |")
    lines += ["", f"speed-up of the K/V cache: {result['speedup']:.3f}x over asymmetric without it, "
              f"{result['speedup_vs_symmetric']:.3f}x over symmetric (OminiControl)",
              f"output difference, cache vs no cache (final latents): max {result['max_diff']:.3e}, "
              f"mean {result['mean_diff']:.3e}"]
    return "\n".join(lines)


def report_edit(result: dict, env: dict, what: str) -> str:
    from fastgen import benchmarks as B

    c = result["case"]
    lines = _header(env, f"{what}; KV-Edit of a generated image, {c.steps} steps, {c.skip_steps} skipped")
    lines += B._edit_table(result["rows"])[2:]  # the table, without its heading line
    lines += ["", f"edit speed-up over a full generation: {result['speedup']:.3f}x (edit only; one inversion serves "
              "many edits)", f"background latents bit-exact: {result['background_exact']}"]
    return "\n".join(lines)
