"""``fastgen.export.plan``: weight bytes are the parameters at the precision's bytes (tiny models built
for real; Flux-dev's 11.9B counted on the meta device without memory), the activation estimate (a
meta-device trace of the forward with fused attention) is within ``FACTOR`` of the peak the CPU
allocator measures on real forwards, attention counts O(N) not O(N^2), the budget arithmetic at each
boundary, and the errors.

Measured peak: torch's profiler with ``profile_memory=True`` records every allocation and free of the
CPU allocator during one forward; their running sum's maximum, plus the inputs (live before the call
and counted by the estimate too), is the forward's peak working memory. ``FACTOR`` 1.1: on these
shapes the estimate and the measurement agree to 0-6 % (the CPU's flash attention and oneDNN's
convolutions allocate a little scratch the estimate does not count); at the tiny UNet's own 8 x 8
latents oneDNN's per-call reorder of a convolution's weights (a weight-sized buffer) is as large as
the activations, so the UNets are measured at larger latents.
"""

from __future__ import annotations

import dataclasses
import json
import resource

import pytest
import torch

from fastgen.export.plan import (FAMILIES, GIB, PRECISIONS, Shape, activation_peak, build, meta_inputs, parse_bytes,
                                 plan, weight_bytes)

FACTOR = 1.1
FLUX_DEV_PARAMS = 11_901_408_320  # black-forest-labs/FLUX.1-dev's transformer: 11.9B


def _fp8_bytes(model) -> int:
    # independent of plan.weight_bytes: GEMM weights in 1 byte, every other parameter in 2
    gemm = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return sum(p.numel() * (1 if id(p) in gemm else 2) for p in model.parameters())


@pytest.mark.parametrize("family", ["flux:tiny", "sd15:tiny"])
def test_weight_bytes_are_parameters_times_bytes(family):
    model = FAMILIES[family].build()
    params = sum(p.numel() for p in model.parameters())
    for precision, per in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        p = plan(family, precision=precision, vram_gib=8)
        assert p.params == params and p.weight_bytes == params * per
        assert p.largest_weight_bytes == max(q.numel() for q in model.parameters()) * per
    assert plan(family, precision="fp8", vram_gib=8).weight_bytes == _fp8_bytes(model)
    # a model given as itself: its own parameters, the same numbers
    assert plan(model, precision="bf16", vram_gib=8).weight_bytes == params * 2


def test_modules_kept_in_float32_count_4_bytes():
    model = FAMILIES["wan:tiny"].build()
    keep = type(model)._keep_in_fp32_modules
    kept = sum(p.numel() for n, p in model.named_parameters() if any(k in n.split(".") for k in keep))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < kept < total
    assert weight_bytes(model, "bf16")[1] == 2 * total + 2 * kept


def test_flux_dev_weights_counted_on_meta_without_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    p = plan("flux-dev", precision="bf16", vram_gib=24)
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert p.params == FLUX_DEV_PARAMS and p.weight_bytes == 2 * FLUX_DEV_PARAMS  # 22.2 GiB, never allocated
    assert grown_gib < 2, grown_gib
    assert p.largest_weight_bytes == 6 * 3072 * 3072 * 2  # a double block's modulation (3072 -> 6 x 3072)
    assert plan("flux-dev", precision="fp8", vram_gib=24).weight_bytes < 0.51 * p.weight_bytes
    profile = p.profiles[0]
    assert profile.shape == Shape(1, 1024, 1024, 512) and profile.tokens == 4096
    # one single-stream block at 4608 tokens x 3072: tens of [N, D] bf16 tensors, well under a GiB
    nd = 4608 * 3072 * 2
    assert 10 * nd < profile.activation_bytes < 30 * nd
    assert profile.peak_at.startswith("single_transformer_blocks.")


@pytest.mark.parametrize("family, params, tokens", [
    ("sd15", 859_520_964, 64 * 64),  # the released UNet: 860M; 512^2 -> 64^2 latents
    ("sdxl", 2_567_463_684, 128 * 128),  # 2.6B; 1024^2
    ("sd3.5-medium", None, 64 * 64),  # 1024^2 in 2x2 patches
    ("wan2.1-1.3b", None, 21 * 30 * 52),  # 480x832, 81 frames -> 21 latent frames, 2x2 patches
    ("hunyuanvideo", None, 33 * 45 * 80),  # 720x1280, 129 frames
])
def test_released_families_plan_at_their_pipeline_defaults(family, params, tokens):
    p = plan(family, precision="bf16", vram_gib=24)
    assert params is None or p.params == params
    profile = p.profiles[0]
    assert profile.tokens == tokens and profile.activation_bytes > 0
    assert "blocks." in profile.peak_at  # inside a transformer / UNet block, not the embeddings
    assert p.weight_bytes >= 2 * p.params  # Wan keeps some modules in float32


def _measured_peak(model, inputs) -> int:
    """The CPU allocator's peak during one forward (profiler memory events), plus the inputs."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(**inputs, return_dict=False)  # warm-up: lazily built caches are not the forward's
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(**inputs, return_dict=False)
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    leaves = torch.utils._pytree.tree_leaves(inputs)
    return peak + sum(t.untyped_storage().nbytes() for t in leaves if isinstance(t, torch.Tensor))


def _materialize(meta: dict) -> dict:
    g = torch.Generator().manual_seed(0)

    def real(t):
        if not isinstance(t, torch.Tensor):
            return t
        if not t.dtype.is_floating_point:
            return torch.ones(t.shape, dtype=t.dtype)  # masks: every token real
        return torch.randn(t.shape, generator=g).to(t.dtype)

    return torch.utils._pytree.tree_map(real, meta)


@pytest.mark.parametrize("family, shape", [
    ("flux:tiny", Shape(2, 64, 64, 7)),
    ("flux:small", Shape(2, 512, 384, 77)),  # non-square, a CFG batch
    ("sd15:tiny", Shape(2, 256, 192, 77)),
    ("sd15:small", Shape(1, 456, 328, 77)),  # latents of 57 x 41: the UNet pads its odd sides
])
def test_activation_estimate_within_factor_of_measured_peak(family, shape):
    model = FAMILIES[family].build()
    estimate = plan(family, precision="fp32", vram_gib=8, shapes=[shape]).profiles[0].activation_bytes
    measured = _measured_peak(model, _materialize(meta_inputs(FAMILIES[family].cls, model.config, shape)))
    assert 1 / FACTOR <= estimate / measured <= FACTOR, (estimate, measured)


def test_attention_counts_as_fused():
    family = FAMILIES["flux:small"]
    meta = build(family.cls, family.config(), "meta", torch.float32)

    def peak(side, fused=True):
        inputs = meta_inputs(family.cls, meta.config, Shape(1, side, side, 32))
        return activation_peak(meta, inputs, fused_attention=fused).bytes

    # 4096 -> 16384 image tokens: 4x the activations (O(N d)), not 16x
    assert 3.5 < peak(2048) / peak(1024) < 4.5
    # the math path would hold the scores: 4 heads x 4128^2 float32 and their softmax
    scores = 4 * 4128**2 * 4
    assert peak(1024, fused=False) > peak(1024) + scores


def test_budget_at_each_boundary():
    p = dataclasses.replace(plan("flux:tiny", precision="fp32", vram_gib=8, workspace_bytes=0, reserve_bytes=0),
                            workspace_bytes=1000, reserve_bytes=500)
    act, weights, largest = p.activation_bytes, p.weight_bytes, p.largest_weight_bytes
    fixed = act + 1000 + 500

    def on(vram):
        return dataclasses.replace(p, vram_bytes=vram)

    everything = on(fixed + weights)  # exactly enough: no streaming
    assert everything.budget_bytes == weights and everything.fits and not everything.streaming
    assert everything.streamed_bytes == 0 and "no streaming" in everything.verdict
    half = on(fixed + weights // 2)
    assert half.budget_bytes == weights // 2 == half.available_bytes and half.streaming
    assert half.streamed_bytes == weights - weights // 2 and "weight streaming" in half.verdict
    assert on(fixed + largest).budget_bytes == largest  # the least that can stream
    short = on(fixed + largest - 1)
    assert short.budget_bytes is None and not short.fits and "largest weight tensor" in short.verdict
    alone = on(fixed)  # the activations, workspace and reserve alone take the card
    assert alone.budget_bytes is None and "alone exceed the card" in alone.verdict
    assert "Plan: flux:tiny" in half.table() and "weight_streaming_budget_v2 = " in half.table()


def test_profiles_from_ranges_and_the_largest_decides():
    p = plan("flux:tiny", precision="bf16", vram_bytes=3 * GIB, height=(32, 128), width=(32, 96), batch=(1, 3))
    small, large = p.profiles
    assert (small.shape, large.shape) == (Shape(1, 32, 32, 7), Shape(3, 128, 96, 7))
    assert (small.tokens, large.tokens) == (4, 48)
    assert small.activation_bytes < large.activation_bytes == p.activation_bytes
    assert p.available_bytes == 3 * GIB - large.activation_bytes - p.workspace_bytes - p.reserve_bytes
    assert p.budget_for(large)[0] == p.budget_bytes and p.budget_for(small)[0] >= p.budget_bytes
    table = p.table()
    assert table.count("| batch ") == 2 and "One engine with these profiles" in table


def test_video_shapes_and_frames():
    p = plan("wan:tiny", precision="bf16", vram_gib=4, frames=9, height=64, width=32)
    # latent frames (9 - 1) / 4 + 1 = 3, patches of 2 x 2 over 8 x 4 latents: 3 * 4 * 2 tokens
    assert p.profiles[0].tokens == 24
    assert plan("hunyuan:tiny", precision="fp16", vram_gib=4).profiles[0].activation_bytes > 0


def test_config_folders(tmp_path):
    model = FAMILIES["flux:tiny"].build()
    model.save_config(tmp_path / "model")
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    model.save_config(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": [None, None]}))
    reference = plan("flux:tiny", vram_gib=8, height=64, width=64)
    for source in (tmp_path / "model", tmp_path / "pipe", dict(model.config)):
        p = plan(source, vram_gib=8, height=64, width=64, batch=2, text_tokens=7)
        assert (p.cls, p.params, p.activation_bytes) == (reference.cls, reference.params, reference.activation_bytes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="flux-schnell"), "unknown family 'flux-schnell'"),
    (dict(precision="int4"), "precision must be one of fp32, bf16, fp16, fp8"),
    (dict(vram_gib=None), "exactly one of vram_bytes and vram_gib"),
    (dict(vram_bytes=8 * GIB), "exactly one of vram_bytes and vram_gib"),
    (dict(vram_gib=0), "must be positive"),
    (dict(vram_gib=-8), "must be positive"),
    (dict(height=0), "height must be a positive int"),
    (dict(batch=-1), "batch must be a positive int"),
    (dict(height=40), "multiple of 16 pixels"),
    (dict(height=(64, 32)), "min <= max"),
    (dict(frames=5), "frames applies to video models"),
    (dict(shapes=[Shape(1, 64, 64, 7)], height=64), "not both"),
    (dict(workspace_bytes=-1), "workspace_bytes must be an int >= 0"),
    (dict(source=dict(_class_name="AutoencoderKL")), "plan supports FluxTransformer2DModel"),
    (dict(source=dict(in_channels=4)), "_class_name"),
    (dict(source=torch.nn.Linear(2, 2)), "diffusers model"),
    (dict(source="wan:tiny", frames=6), "4k \\+ 1"),
])
def test_errors(kwargs, match):
    source = kwargs.pop("source", "flux:tiny")
    kwargs.setdefault("vram_gib", 8)
    if kwargs["vram_gib"] is None:
        del kwargs["vram_gib"]
    with pytest.raises(ValueError, match=match):
        plan(source, **kwargs)


def test_parse_bytes():
    assert parse_bytes("8GiB") == parse_bytes("8") == parse_bytes("8 g") == 8 * GIB
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 2**29 and parse_bytes("4096B") == 4096
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("0", allow_zero=True) == 0
    for bad in ("lots", "8XB", "-1GiB", "0", ""):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16", "fp8"}
