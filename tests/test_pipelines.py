"""Whole tiny pipelines (built in code, random weights) for 2 steps: fastgen.patch == unpatched
within attention tolerance, through fastgen's Triton kernels; unpatch bit-exact; and the demo."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import fastgen
from fastgen import demo
from fastgen.benchmarks.core import PeakMemory, environment
from fastgen.models import FAMILIES, build_pipeline
from helpers import DEVICE


def _latents(pipe, call, steps=2):
    return demo.pipeline_output(pipe(**call, num_inference_steps=steps, output_type="latent",
                                     generator=torch.Generator("cpu").manual_seed(0)))


def _rel_err(out, ref) -> float:
    """Max difference relative to the output's scale (random tiny models give latents of ~1e2)."""
    return (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_patched_matches_unpatched(family):
    pipe, call = build_pipeline(family, "tiny")
    pipe.to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    call = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in call.items()}
    ref = _latents(pipe, call)
    with fastgen.patch(pipe, attention_backend="triton", prologue_backend="triton") as handle:
        assert handle.state.replaced and fastgen.is_patched(pipe)
        assert fastgen.is_patched(pipe.transformer if hasattr(pipe, "transformer") else pipe.unet)
        out = _latents(pipe, call)
        if family in ("sd15", "sdxl", "wan"):
            assert handle.state.kv_cache.hits > 0, "step 2 reuses the cross-attention K/V"
    assert not fastgen.is_patched(pipe)
    assert _rel_err(out, ref) <= 1e-4, f"{family}: {_rel_err(out, ref):.3e}"
    assert torch.equal(_latents(pipe, call), ref)


def test_generation_end_frees_the_kv_cache():
    pipe, call = build_pipeline("sd15", "tiny")
    pipe.set_progress_bar_config(disable=True)
    handle = fastgen.patch(pipe)
    _latents(pipe, call)
    assert handle.state.kv_cache.hits > 0
    assert len(handle.state.kv_cache) == 0, "the pipeline's end-of-generation hook empties the cache"
    handle.remove()
    assert "maybe_free_model_hooks" not in pipe.__dict__


def test_patching_one_pipeline_leaves_another_alone():
    a, call = build_pipeline("flux", "tiny")
    b, _ = build_pipeline("flux", "tiny")
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    ref = _latents(b, call)
    with fastgen.patch(a, attention_backend="triton"):
        assert not fastgen.is_patched(b)
        assert torch.equal(_latents(b, call), ref)
        assert not any("Fastgen" in type(m).__name__ for m in b.transformer.modules())


def test_demo_compare_reports_speed_difference_and_reversibility():
    pipe, call = build_pipeline("flux", "tiny")
    ticks = []
    result = demo.compare(pipe, call, steps=2, repeats=2, device=DEVICE,
                          config=fastgen.PatchConfig(attention_backend="triton"), progress=lambda: ticks.append(1))
    b, f = result["baseline"], result["fastgen"]
    assert len(ticks) == 2 * 2 + 1, "the CLI's progress bar counts the warm-ups and each round's run"
    assert len(b.round_ms) == len(f.round_ms) == 2 and min(b.round_ms + f.round_ms) > 0
    if result["speedup"] is not None:
        assert result["speedup"] == pytest.approx(b.ms_per_step / f.ms_per_step)
    assert result["max_diff"] < 1e-4 and result["unpatch_bit_exact"] and b.repeatable
    assert b.peak_mb > 0 and b.memory == ("CUDA allocated" if DEVICE.type == "cuda" else "host RSS")
    text = demo.report(result, environment(DEVICE), "tiny flux")
    for needle in ("ms / step, median", "min-max of 2 rounds", f"peak memory ({b.memory})", "speed-up: ", "max",
                   "mean", "device:", "unpatch restores bit-identical output: True"):
        assert needle in text, needle
    assert "n/a" not in text


def _run(label, round_ms, peak_mb=100.0) -> demo.Run:
    return demo.Run(label, round_ms, peak_mb, "host RSS", torch.zeros(1), True)


def test_demo_says_no_measurable_difference_when_the_ranges_overlap():
    base, fast = [10.0, 12.5, 11.0], [10.4, 9.8, 11.9]  # medians 11.0 and 10.4: a "1.06x" that is noise
    assert demo.measured_speedup(base, fast) is None
    assert demo.measured_speedup([10.0], [5.0]) is None, "one round has no range to compare"
    result = dict(baseline=_run("baseline (diffusers)", base), fastgen=_run("fastgen.patch", fast), speedup=None,
                  max_diff=0.0, mean_diff=0.0, patched={}, config=None, unpatch_bit_exact=True)
    text = demo.report(result, environment("cpu"), "injected timings")
    assert "speed-up: no measurable difference (min-max ranges of 3 interleaved rounds overlap)" in text
    assert "x (ratio of medians" not in text
    assert "| baseline (diffusers) | 11.00 | 10.00-12.50 | 100 MB |" in text


def test_demo_prints_a_speedup_when_the_ranges_are_apart():
    base, fast = [20.0, 22.0, 21.0], [10.0, 11.5, 11.0]
    assert demo.measured_speedup(base, fast) == pytest.approx(21.0 / 11.0)
    assert demo.measured_speedup(fast, base) == pytest.approx(11.0 / 21.0), "a slow-down is measured too"
    result = dict(baseline=_run("baseline (diffusers)", base), fastgen=_run("fastgen.patch", fast),
                  speedup=demo.measured_speedup(base, fast), max_diff=0.0, mean_diff=0.0, patched={}, config=None,
                  unpatch_bit_exact=True)
    text = demo.report(result, environment("cpu"), "injected timings")
    assert "speed-up: 1.909x (ratio of medians; min-max ranges of 3 interleaved rounds apart)" in text


def test_peak_memory_off_cuda_samples_the_host_rss_during_the_block():
    with PeakMemory("cpu") as idle:
        pass
    with PeakMemory("cpu") as busy:
        x = torch.ones(256 * 2**20 // 4)  # 256 MB, freed before the block ends: only the sampler sees it
        time.sleep(0.1)
        del x
    assert busy.kind == "host RSS" and idle.mb > 0
    assert busy.mb - idle.mb > 200, (idle.mb, busy.mb)


def test_demo_condition_task_cache_matches_and_skips_branches():
    pipe, call = build_pipeline("flux", "tiny")
    result = demo.compare_conditions(pipe, call, steps=3, repeats=1, device=DEVICE, conditions=2)
    labels = list(result["runs"])
    assert [result["stats"][k]["branch_forwards"] for k in labels] == [3, 3, 1], "only the cache skips branches"
    assert result["stats"][labels[2]]["cache_bytes"] > 0 == result["stats"][labels[1]]["cache_bytes"]
    assert result["max_diff"] <= 1e-4 * max(1.0, float(result["runs"][labels[1]].latents.abs().max()))
    sym = result["runs"][labels[0]].latents
    assert (sym - result["runs"][labels[1]].latents).abs().max() > 1e-4, "symmetric attention is another model"
    assert result["speedup"] is None and result["speedup_vs_symmetric"] is None, "1 round: nothing measured"
    text = demo.report_conditions(result, environment(DEVICE), "tiny flux")
    for needle in ("2 image condition(s)", "speed-up of the K/V cache", "OminiControl", "max", "min-max of 1 round |",
                   "over asymmetric without it: no measurable difference (1 round each"):
        assert needle in text, needle
    with pytest.raises(ValueError, match="conditions must be"):
        demo.compare_conditions(pipe, call, conditions=0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        demo.compare(pipe, call, repeats=0)


def test_demo_edit_task_reports_speedup_and_exact_background():
    pipe, call = build_pipeline("flux", "tiny")
    result = demo.compare_edit(pipe, call, steps=3, repeats=2, device=DEVICE)
    full, edit = result["rows"]
    assert result["background_exact"] and edit.extra["edited_tokens"] == 4 and edit.extra["tokens"] == 16
    assert [len(v) for v in result["round_ms"].values()] == [2, 2]
    assert full.ms == pytest.approx(statistics.median(result["round_ms"]["full generation (diffusers)"]))
    assert edit.speedup == result["speedup"] and (result["speedup"] is None
                                                  or result["speedup"] == pytest.approx(full.ms / edit.ms))
    assert edit.extra["inversion_ms"] > 0 and edit.extra["forwards"] == 2 * (3 - 1)
    text = demo.report_edit(result, environment(DEVICE), "tiny flux")
    for needle in ("full generation (diffusers)", "kv-edit, device cache", "edit speed-up", "bit-exact: True",
                   "ms over 2 rounds, interleaved, median (min-max)"):
        assert needle in text, needle
    if DEVICE.type != "cuda":
        assert "peak memory (host RSS" in text and "n/a" not in text
    with pytest.raises(ValueError, match="mask_fraction"):
        demo.compare_edit(pipe, call, mask_fraction=0)


def test_demo_cli_tasks_need_flux():
    from fastgen.cli import main

    with pytest.raises(SystemExit, match="runs on Flux"):
        main(["demo", "--task", "edit", "--family", "sd15", "--device", "cpu"])


def test_demo_rejects_unknown_family_and_size():
    with pytest.raises(ValueError, match="family must be one of"):
        build_pipeline("dalle")
    with pytest.raises(ValueError, match="size must be one of"):
        build_pipeline("flux", "huge")


def test_composes_with_diffusers_first_block_cache():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, call = build_pipeline("flux", "tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    ref = _latents(pipe, call, steps=3)
    with fastgen.patch(pipe, attention_backend="triton", prologue_backend="triton"):
        out = _latents(pipe, call, steps=3)
    assert _rel_err(out, ref) <= 1e-4
    assert torch.equal(_latents(pipe, call, steps=3), ref)
    pipe.transformer.disable_cache()


@pytest.mark.parametrize("order", ["offload then patch", "patch then offload"])
def test_composes_with_model_cpu_offload(order):
    # accelerate's offload hooks wrap the models' forward; fastgen's processors sit inside them.
    pipe, call = build_pipeline("sd15", "tiny")
    pipe.set_progress_bar_config(disable=True)
    ref = _latents(pipe, call)
    device = "cuda" if DEVICE.type == "cuda" else "cpu"
    if order == "offload then patch":
        pipe.enable_model_cpu_offload(device=device)
        handle = fastgen.patch(pipe, attention_backend="triton")
    else:
        handle = fastgen.patch(pipe, attention_backend="triton")
        pipe.enable_model_cpu_offload(device=device)
    out = _latents(pipe, call)
    if device == "cuda":
        assert handle.state.kv_cache.hits > 0
    else:
        # offloading "to" cpu:0 makes accelerate copy every input at every step (cpu:0 != cpu), so the
        # embeddings are a new tensor each step: the cache must (and does) recompute
        assert handle.state.kv_cache.misses > 0
    assert _rel_err(out.cpu(), ref.cpu()) <= 1e-4
    handle.remove()
    assert torch.equal(_latents(pipe, call).cpu(), ref.cpu())


@pytest.mark.parametrize("offload_type", ["leaf_level", "block_level"])
def test_composes_with_diffusers_group_offload(offload_type):
    # Leaf-level offload hooks every leaf, QK norms included: fastgen must call those norms (their
    # weights sit on the offload device, or are in flight on the onload stream) rather than read them.
    from fastgen._hooks import places_own_weights

    pipe, call = build_pipeline("flux", "tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(DEVICE)
    ref = _latents(pipe, call)
    handle = fastgen.patch(pipe, attention_backend="triton", prologue_backend="triton")
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.transformer.enable_group_offload(onload_device=DEVICE, offload_device=torch.device("cpu"),
                                          offload_type=offload_type, **extra)
    norms = [m for name, m in pipe.transformer.named_modules() if name.endswith((".norm_q", ".norm_k"))]
    assert norms and all(places_own_weights(m) == (offload_type == "leaf_level") for m in norms)
    out = _latents(pipe, call)
    assert _rel_err(out.cpu(), ref.cpu()) <= 1e-4
    handle.remove()
    assert torch.equal(_latents(pipe, call).cpu(), ref.cpu())
