"""KV-Edit on a tiny Flux: the sharp test, background bit-exact, masks, cache options."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch

import fastgen.edit
import fastgen.ops
from fastgen import flux_latents as fl
from fastgen.condition import ConditionConfig
from fastgen.edit import BackgroundKV, EditConfig, InversionMask, KVEditor, PinnedArena
from fastgen.flux_branches import branch_forward
from helpers import DEVICE
from test_condition import (SIDE, ModelRuns, _forward_inputs, _image, _record_forwards, _rel, _sd_pipeline,
                            _tiny_flux_pipeline, _with_lora, dynamic_scheduler)


@pytest.fixture(scope="module")
def editor():
    return KVEditor(_tiny_flux_pipeline(), EditConfig(attention_backend="triton", prologue_backend="triton"))


@pytest.fixture(scope="module")
def fast_editor():
    """Default settings (SDPA on a CPU): for checks that are not about the kernels."""
    return KVEditor(_tiny_flux_pipeline())


def _prompts():
    g = torch.Generator().manual_seed(11)
    return dict(source_prompt_embeds=torch.randn(1, 7, 32, generator=g).to(DEVICE),
                source_pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(DEVICE),
                target_prompt_embeds=torch.randn(1, 7, 32, generator=g).to(DEVICE),
                target_pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(DEVICE))


def _source():
    return {k: v for k, v in _prompts().items() if k.startswith("source")}


def _target():
    return {k: v for k, v in _prompts().items() if k.startswith("target")}


def _mask(kind="quarter"):
    m = np.zeros((SIDE, SIDE), dtype=np.float32)
    if kind == "quarter":
        m[:32, :32] = 1.0  # 4 of 16 tokens
    elif kind == "full":
        m[:] = 1.0
    return m


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_sharp_foreground_forward_equals_full_forward(editor, backend):
    # ALGORITHMS.md: fill the cache from a full forward on x; the foreground-only forward on the
    # same x with attn_scale 0 equals the full forward's foreground outputs.
    model = editor.pipe.transformer
    inputs = _forward_inputs(None, batch=1)
    fg = fl.token_mask(_mask(), SIDE, SIDE).to(DEVICE)
    fg_idx, bg_idx = fg.nonzero().flatten(), (~fg).nonzero().flatten()
    for offload in (False, True):
        # offload forced where storage == compute (a CPU): the arena, copies, prefetch, residency
        bg = BackgroundKV(bg_idx, torch.device("cpu"), DEVICE, offload=offload)
        config = EditConfig(attention_backend=backend).patch_config()
        with torch.no_grad():
            bg.begin("capture", 0)
            full = branch_forward(model, [bg], config=config, **inputs).sample
            bg.begin("use", 0, 0.0)
            part = dict(inputs, hidden_states=inputs["hidden_states"][:, fg_idx], img_ids=inputs["img_ids"][fg_idx])
            out = branch_forward(model, [bg], config=config, **part).sample
        assert _rel(out, full[:, fg_idx]) <= 1e-5, (offload, _rel(out, full[:, fg_idx]))
        if offload:
            assert 1 <= bg.max_resident <= 2, "at most the layer in use and the next one"
            assert bg.host_bytes == PinnedArena.CHUNK, "every layer's entry in one arena chunk"
        layers = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        assert len(bg._entries) == layers


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_inversion_mask_forward_equals_masked_reference(editor, backend):
    # KV-Edit's optional inversion mask against diffusers' own forward with the same boolean mask
    # (text sees all; foreground sees text + foreground; background text + background).
    model = editor.pipe.transformer
    inputs = _forward_inputs(None, batch=1)
    fg = fl.token_mask(_mask(), SIDE, SIDE).to(DEVICE)
    n_txt = inputs["encoder_hidden_states"].shape[1]
    txt = torch.zeros(n_txt, dtype=torch.bool, device=DEVICE)
    is_fg, is_bg = torch.cat([txt, fg]), torch.cat([txt, ~fg])
    allow = ~((is_fg[:, None] & is_bg[None, :]) | (is_bg[:, None] & is_fg[None, :]))
    order = torch.cat([fg.nonzero().flatten(), (~fg).nonzero().flatten()])
    with torch.no_grad():
        ref = model(**inputs, joint_attention_kwargs={"attention_mask": allow[None, None]}).sample
        plain = model(**inputs).sample
        mask, config = InversionMask(int(fg.sum())), EditConfig(attention_backend=backend).patch_config()
        ordered = dict(inputs, hidden_states=inputs["hidden_states"][:, order], img_ids=inputs["img_ids"][order])
        out = branch_forward(model, [mask], config=config, **ordered).sample
    assert _rel(out, ref[:, order]) <= 1e-5, _rel(out, ref[:, order])
    assert _rel(plain, ref) > 1e-4, "the mask changes the forward"


def test_attn_scale_changes_the_foreground(editor):
    a = editor.edit(_image(), _mask(), num_inference_steps=3, skip_steps=1, output_type="latent", **_prompts())
    b = editor.edit(_image(), _mask(), num_inference_steps=3, skip_steps=1, attn_scale=0.0, output_type="latent",
                    **_prompts())
    assert _rel(a.latents, b.latents) > 1e-5


@pytest.mark.parametrize("variant", ["inversion", "re_init", "inversion_free", "attention_mask"])
def test_background_is_bit_exact_after_an_edit(editor, variant):
    kw = dict(re_init=variant == "re_init", inversion_free=variant == "inversion_free",
              attention_mask=variant == "attention_mask", generator=torch.Generator().manual_seed(3))
    out = editor.edit(_image(), _mask(), num_inference_steps=4, skip_steps=1, output_type="latent", **kw, **_prompts())
    x0, _ = fl.encode_image(editor.pipe, _image())
    fg = fl.token_mask(_mask(), SIDE, SIDE)
    assert torch.equal(out.latents[:, ~fg], x0[:, ~fg]), "background latents copied from the source"
    assert not torch.equal(out.latents[:, fg], x0[:, fg]) and torch.isfinite(out.latents).all()
    steps = 3
    assert out.stats["forwards"] == 2 * steps, out.stats  # inversion + edit, or source + target per step
    per_layer = 12 * 2 * 16 * 2 * 4  # 12 background tokens, 2 heads x 16, k and v, fp32
    assert out.stats["cache_bytes"] == (1 if variant == "inversion_free" else steps) * 3 * per_layer
    if variant == "attention_mask":  # the masked inversion is another trajectory
        plain = editor.edit(_image(), _mask(), num_inference_steps=4, skip_steps=1, output_type="latent", **_prompts())
        assert _rel(out.latents, plain.latents) > 1e-5


def test_empty_mask_returns_the_input(editor):
    img = _image()
    out = editor.edit(img, np.zeros((SIDE, SIDE)), output_type="pt", **_prompts())
    assert out.stats["forwards"] == 0
    assert torch.allclose(out.images[0].cpu(), img, atol=1e-6)


def test_full_mask_edits_everything(editor):
    out = editor.edit(_image(), _mask("full"), num_inference_steps=3, skip_steps=1, output_type="np", **_prompts())
    assert out.images.shape == (1, SIDE, SIDE, 3) and np.isfinite(out.images).all()
    assert out.stats["edited_tokens"] == 16


def test_one_inversion_serves_several_edits(editor):
    kw = dict(num_inference_steps=4, skip_steps=1)
    p = _prompts()
    src = {k: v for k, v in p.items() if k.startswith("source")}
    tar = {k: v for k, v in p.items() if k.startswith("target")}
    other = dict(target_prompt_embeds=tar["target_prompt_embeds"] * -1.0,
                 target_pooled_prompt_embeds=tar["target_pooled_prompt_embeds"])
    with editor.invert(_image(), _mask(), **src, **kw) as inv:
        assert inv.stats["forwards"] == 3 and inv.stats["cache_bytes"] > 0
        a = editor.denoise(inv, **tar, output_type="latent")
        b = editor.denoise(inv, **other, output_type="latent")
        a2 = editor.denoise(inv, **tar, output_type="latent")
    assert torch.equal(a.latents, a2.latents), "denoising leaves the inversion as it was"
    assert torch.equal(a.latents, editor.edit(_image(), _mask(), **p, **kw, output_type="latent").latents)
    assert not torch.equal(a.latents[:, inv.fg], b.latents[:, inv.fg])
    assert a.stats["forwards"] == 6 and a.stats["max_resident_layers"] == 0  # device cache: nothing moves
    assert inv.released
    with pytest.raises(ValueError, match="released"):
        editor.denoise(inv, **tar)


def test_pinned_arena_packs_views_into_chunks():
    arena = PinnedArena(pin=False)
    a = arena.empty((2, 3, 5), torch.float32)
    b = arena.empty((7,), torch.float8_e4m3fn)
    c = arena.empty((4, 4), torch.bfloat16)
    a.copy_(torch.arange(30.0).view(2, 3, 5))
    b.copy_(torch.linspace(-2, 2, 7).to(torch.float8_e4m3fn))
    c.fill_(1.5)
    assert a.shape == (2, 3, 5) and a.dtype == torch.float32 and torch.equal(a.flatten(), torch.arange(30.0))
    assert torch.equal(b.float(), torch.linspace(-2, 2, 7).to(torch.float8_e4m3fn).float()) and (c == 1.5).all()
    assert len(arena.chunks) == 1 and arena.nbytes == PinnedArena.CHUNK
    big = arena.empty((PinnedArena.CHUNK // 4 + 1,), torch.float32)  # more than a chunk: its own power of two
    assert len(arena.chunks) == 2 and arena.chunks[1].numel() == 2 * PinnedArena.CHUNK and big.numel() > 0
    arena.reset()
    again = arena.empty((2, 3, 5), torch.float32)
    assert len(arena.chunks) == 2 and again.data_ptr() == a.data_ptr(), "reset reuses the chunks"


@pytest.mark.parametrize("opt", [dict(cache_device="cpu"), dict(cache_dtype="fp8")])
def test_cache_options_within_their_error(editor, opt):
    ref = editor.edit(_image(), _mask(), num_inference_steps=3, skip_steps=1, output_type="latent", **_prompts())
    out = editor.edit(_image(), _mask(), num_inference_steps=3, skip_steps=1, output_type="latent", **opt, **_prompts())
    err = _rel(out.latents, ref.latents)
    if "cache_device" in opt:
        assert err <= 1e-6, err  # where the cache lives changes nothing
    else:
        assert 0 < err <= 5e-2, err  # e4m3: a few percent per element, less after attention
        assert out.stats["cache_bytes"] < 0.6 * ref.stats["cache_bytes"]


def test_bad_input_raises(editor):
    with pytest.raises(ValueError, match="mask is 32x32"):
        editor.edit(_image(), np.ones((32, 32)), **_prompts())
    with pytest.raises(ValueError, match="skip_steps"):
        editor.edit(_image(), _mask(), num_inference_steps=4, skip_steps=4, **_prompts())
    with pytest.raises(ValueError, match="cache_dtype"):
        editor.edit(_image(), _mask(), cache_dtype="int8", **_prompts())
    with pytest.raises(ValueError, match="inversion_free has none"):
        editor.edit(_image(), _mask(), inversion_free=True, attention_mask=True, **_prompts())
    with pytest.raises(ValueError, match="source_prompt"):
        editor.edit(_image(), _mask())
    src = {k: v for k, v in _prompts().items() if k.startswith("source")}
    with pytest.raises(ValueError, match="target_prompt"):
        editor.edit(_image(), _mask(), **src)
    half = {k: v.half() if k.startswith("source") else v for k, v in _prompts().items()}
    with pytest.raises(ValueError, match="source_prompt_embeds is torch.float16 but the transformer computes in"):
        editor.edit(_image(), _mask(), **half)


def test_a_diffusers_attention_backend_is_refused_not_ignored(fast_editor, monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from fastgen.condition import Condition, FluxConditionPipeline

    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    pipe = fast_editor.pipe
    pipe.transformer.set_attention_backend("native")
    try:
        with pytest.raises(ValueError, match="reset_attention_backend"):
            fast_editor.edit(_image(), _mask(), **_prompts())
        with pytest.raises(ValueError, match="reset_attention_backend"):
            FluxConditionPipeline.from_pipe(pipe)(prompt_embeds=_prompts()["source_prompt_embeds"],
                                                  pooled_prompt_embeds=_prompts()["source_pooled_prompt_embeds"],
                                                  conditions=[Condition(_image())], num_inference_steps=1)
    finally:
        pipe.transformer.reset_attention_backend()
    with pytest.raises(ValueError, match="conditions must be a list"):
        FluxConditionPipeline.from_pipe(pipe)(prompt_embeds=_prompts()["source_prompt_embeds"],
                                              pooled_prompt_embeds=_prompts()["source_pooled_prompt_embeds"],
                                              conditions=torch.zeros(1, 3, 32, 32), num_inference_steps=1)


def _edit(editor, steps, **opt):
    return editor.edit(_image(), _mask(), num_inference_steps=steps, skip_steps=1, output_type="latent", **opt,
                       **_prompts())


def _offloaded_edit(editor, steps, monkeypatch):
    with monkeypatch.context() as m:
        if DEVICE.type != "cuda":  # the CPU is the compute device here: force the offload path anyway
            m.setattr(fastgen.edit, "BackgroundKV", functools.partial(BackgroundKV, offload=True))
        return _edit(editor, steps, cache_device="cpu")


def test_offloaded_cache_is_the_device_cache_moved(fast_editor, monkeypatch):
    # Everything of the GPU test below that needs no CUDA: the offloaded path (arena, copies out
    # and in, the next layer's prefetch) gives the device cache's result with at most two layers
    # resident. On a CPU it runs forced (storage == compute), without streams or pinned memory.
    dev = _edit(fast_editor, 3)
    off = _offloaded_edit(fast_editor, 3, monkeypatch)
    assert torch.equal(off.latents, dev.latents), "the offloaded cache is the device cache, moved"
    assert 1 <= off.stats["max_resident_layers"] <= 2 and dev.stats["max_resident_layers"] == 0
    assert off.stats["host_cache_bytes"] >= off.stats["cache_bytes"] == dev.stats["cache_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak GPU memory readings need a CUDA GPU (the rest "
                    "of this check runs in test_offloaded_cache_is_the_device_cache_moved)")
def test_offloaded_cache_peak_gpu_memory_does_not_grow_with_steps(fast_editor, monkeypatch):
    def peak(steps, offload):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = _offloaded_edit(fast_editor, steps, monkeypatch) if offload else _edit(fast_editor, steps)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out

    (short, _), (long, b) = peak(3, True), peak(9, True)
    (dev_short, _), (dev_long, c) = peak(3, False), peak(9, False)
    assert torch.equal(b.latents, c.latents)
    per_step = c.stats["cache_bytes"] // 8
    assert dev_long - dev_short >= 5 * per_step, "the device cache grows with the steps"
    assert long - short < per_step, f"offloaded: {short} -> {long} bytes of peak GPU memory"


# --------------------------------------------------------------------------------------------
# The schedule and the noise: FluxPipeline's
# --------------------------------------------------------------------------------------------


def _pipe_with(scheduler):
    pipe = _tiny_flux_pipeline()
    pipe.scheduler = scheduler
    return pipe


def test_schedule_is_flux_pipeline_at_the_image_size(monkeypatch):
    from diffusers import FluxPipeline

    pipe = _pipe_with(dynamic_scheduler())
    plain = FluxPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    ref_seen = []
    handle = _record_forwards(pipe.transformer, ref_seen)
    try:
        p = _prompts()
        plain(prompt_embeds=p["source_prompt_embeds"], pooled_prompt_embeds=p["source_pooled_prompt_embeds"],
              height=SIDE, width=SIDE, num_inference_steps=4, output_type="latent")
    finally:
        handle.remove()
    ref_sigmas, ref_t = plain.scheduler.sigmas.clone(), [t for t, _ in ref_seen]
    seen = []

    def spy(model, state, **kw):
        seen.append(kw["timestep"].clone())
        return branch_forward(model, state, **kw)

    monkeypatch.setattr(fastgen.edit, "branch_forward", spy)
    editor = KVEditor(pipe)
    with editor.invert(_image(), _mask(), num_inference_steps=4, skip_steps=1, **_source()) as inv:
        assert torch.equal(inv.sigmas, ref_sigmas), "a FluxPipeline's sigmas at 64x64 (mu from all 16 tokens)"
        inverted, seen[:] = list(seen), []
        editor.denoise(inv, output_type="latent", **_target())
    zero = torch.zeros_like(ref_t[0])
    # inversion: from t_(i+1) back to t_i at the later time of each step, i = 3, 2, 1 (t_4 = 0)
    assert all(torch.equal(a, b) for a, b in zip(inverted, [zero, ref_t[3], ref_t[2]], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen, ref_t[1:], strict=True)), "the timesteps of its steps 1-3"


def test_noise_is_flux_pipeline_noise_drawn_by_diffusers(fast_editor, monkeypatch):
    import diffusers.utils.torch_utils as tu

    calls, real = [], tu.randn_tensor

    def spy(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append((tuple(shape), generator, torch.device(device)))
        return real(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    monkeypatch.setattr(tu, "randn_tensor", spy)
    g = torch.Generator().manual_seed(3)
    for opt in (dict(re_init=True), dict(inversion_free=True)):
        _edit(fast_editor, 3, generator=g, **opt)
        # diffusers' randn_tensor on the latents' device: a CUDA generator draws there (torch.randn
        # without a device, as before, fails with one)
        assert calls.pop() == ((1, 4, 8, 8), g, DEVICE) and not calls
    lat, _ = fast_editor.pipe.prepare_latents(1, 4, SIDE, SIDE, torch.float32, DEVICE, torch.Generator().manual_seed(3))
    noise = fl.initial_noise(fast_editor.pipe, 1, 4, 4, torch.Generator().manual_seed(3), DEVICE, torch.float32)
    assert torch.equal(noise, lat), "the noise a FluxPipeline starts from with the same generator"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA generator needs a CUDA GPU (the CPU-generator "
                    "path of the same code runs in test_noise_is_flux_pipeline_noise_drawn_by_diffusers)")
def test_cuda_generator(fast_editor):
    def run(**opt):
        return _edit(fast_editor, 3, generator=torch.Generator("cuda").manual_seed(3), **opt).latents

    for opt in (dict(re_init=True), dict(inversion_free=True)):
        assert torch.equal(run(**opt), run(**opt))


# --------------------------------------------------------------------------------------------
# Arguments, config, pipelines
# --------------------------------------------------------------------------------------------


class _CudaLabelled(torch.Generator):
    @property
    def device(self):
        return torch.device("cuda")


@pytest.mark.parametrize("kw,match", [
    (lambda: dict(image=torch.rand(2, 3, SIDE, SIDE)), r"image must be one image \(3, H, W\), got a batch of 2"),
    (lambda: dict(image=_image() * 255), r"image must have values in \[0, 1\].*divide by 255"),
    (lambda: dict(mask=np.ones((32, 32))), r"mask is 32x32 pixels but the image is 64x64; give a \(64, 64\) mask"),
    (lambda: dict(mask=_mask() * 255), r"mask is a float mask .* must be in \[0, 1\]"),
    (lambda: dict(cache_device="cuda:64" if torch.cuda.is_available() else "cuda"), "cache_device='cuda"),
    (lambda: dict(cache_device="gpu0"), "cache_device must be a device"),
    (lambda: dict(target_prompt_embeds=torch.zeros(1, 7, 31)), r"target_prompt_embeds must be \(1, S, 32\)"),
    (lambda: dict(source_pooled_prompt_embeds=torch.zeros(2, 32)), r"source_pooled_prompt_embeds must be \(1, 32\)"),
    (lambda: dict(source_prompt="a cat", source_prompt_embeds=None), "the pipeline has no text encoders"),
    (lambda: dict(output_type="jpeg"), "output_type must be one of"),
    (lambda: dict(attn_scale=float("nan")), "attn_scale must be a finite number"),
    (lambda: dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (lambda: dict(generator=[torch.Generator()] * 2), "generator is a list of 2"),
    (lambda: dict(re_init=1), "re_init must be True or False"),
])
def test_bad_arguments_raise_before_any_model_runs(fast_editor, kw, match):
    args = dict(image=_image(), mask=_mask(), **_prompts(), num_inference_steps=3, skip_steps=1)
    args.update(kw())
    with ModelRuns(fast_editor.pipe) as runs, pytest.raises(ValueError, match=match):
        fast_editor.edit(**args)
    assert runs.calls == 0, "no VAE encode, no transformer forward before the error"


def test_bad_denoise_arguments_raise_before_any_model_runs(fast_editor):
    with fast_editor.invert(_image(), _mask(), num_inference_steps=3, skip_steps=1, **_source()) as inv:
        with ModelRuns(fast_editor.pipe) as runs:
            with pytest.raises(ValueError, match=r"target_prompt_embeds must be \(1, S, 32\)"):
                fast_editor.denoise(inv, target_prompt_embeds=torch.zeros(2, 7, 32),
                               target_pooled_prompt_embeds=torch.zeros(1, 32))
            if DEVICE.type != "cuda":  # a generator on another device than the latents'
                with pytest.raises(ValueError, match="generator is a cuda generator but the latents are on cpu"):
                    fast_editor.denoise(inv, re_init=True, generator=_CudaLabelled(), **_target())
            with pytest.raises(ValueError, match="inversion must be what KVEditor.invert returned"):
                fast_editor.denoise(inv.z, **_target())
        assert runs.calls == 0


def test_kv_editor_takes_its_own_config(monkeypatch):
    pipe = _tiny_flux_pipeline()
    with pytest.raises(ValueError, match="takes a fastgen.edit.EditConfig.*condition fields .* do not apply"):
        KVEditor(pipe, ConditionConfig(attention="symmetric"))
    with pytest.raises(ValueError, match="unknown EditConfig option"):
        EditConfig(kv_cache=False)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EditConfig(attention_backend="flash")
    backends = []
    real = fastgen.ops.attention

    def spy(*args, backend="auto", **kw):
        backends.append(backend)
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(fastgen.ops, "attention", spy)
    KVEditor(pipe, EditConfig(attention_backend="sdpa")).edit(_image(), _mask(), num_inference_steps=2, skip_steps=1,
                                                              output_type="latent", **_prompts())
    assert backends and set(backends) == {"sdpa"}, "the config's backend is the one every attention call uses"


def test_non_flux_pipelines_are_refused_naming_what_is_supported():
    with pytest.raises(ValueError, match=r"KVEditor: only Flux is supported.*FluxTransformer2DModel.*got a "
                                         r"StableDiffusionPipeline with no transformer"):
        KVEditor(_sd_pipeline())


# --------------------------------------------------------------------------------------------
# An inversion serves denoising under the state it was made under, only
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,match", [
    ("lora scale", "the LoRA state"),
    ("adapters disabled", "the LoRA state"),
    ("lora fused", "the LoRA state"),
    ("weights in place", "the transformer's weights"),
    ("dtype", "the transformer's weights"),
    ("autocast", "autocast"),
    ("another editor", "the transformer"),
])
def test_denoise_under_another_state_than_the_inversion_raises(change, match):
    pipe = _tiny_flux_pipeline()
    tr = _with_lora(pipe)
    editor = KVEditor(pipe)
    inv = editor.invert(_image(), _mask(), num_inference_steps=2, skip_steps=0, **_source())
    undo = contextlib.nullcontext()
    if change == "lora scale":
        tr.set_adapters(["cond"], weights=[0.5])
    elif change == "adapters disabled":
        tr.disable_adapters()
    elif change == "lora fused":
        tr.fuse_lora()
    elif change == "weights in place":
        with torch.no_grad():
            tr.single_transformer_blocks[0].proj_out.base_layer.weight.mul_(1.0)  # same values, a new version
    elif change == "dtype":
        tr.to(torch.float64)
    elif change == "autocast":
        undo = torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    elif change == "another editor":
        editor = KVEditor(_tiny_flux_pipeline())
    target = {k: v.to(tr.dtype) for k, v in _target().items()}  # the prompt in the (new) compute dtype
    with ModelRuns(pipe) as runs, undo, pytest.raises(ValueError, match=f"{match}.* changed since the inversion.*"
                                                                          "invert the image again"):
        editor.denoise(inv, output_type="latent", **target)
    assert runs.calls == 0, "raised before any layer ran"


def test_denoise_under_the_inversion_state_runs():
    # the control of the test above: the same steps, nothing changed in between
    pipe = _tiny_flux_pipeline()
    _with_lora(pipe)
    editor = KVEditor(pipe)
    with editor.invert(_image(), _mask(), num_inference_steps=2, skip_steps=0, **_source()) as inv:
        out = editor.denoise(inv, output_type="latent", **_target())
    assert torch.isfinite(out.latents).all()


def test_edit_benchmark_suite_reports_every_path(monkeypatch):
    from fastgen import models
    from fastgen.benchmarks import core
    from fastgen.benchmarks import edit as E

    flux = models.DenoiserSpec("flux tiny", "FluxTransformer2DModel",
                               dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True),
                               models.flux_inputs(1, 16, 8, 16, 32, 32, True))
    case = E.EditCase("flux tiny 64^2, 25% mask", flux, 64, steps=3, skip_steps=1)
    monkeypatch.setattr(E, "edit_cases", lambda device: [case])
    rows = E.run(torch.device("cpu"))
    assert [r.provider for r in rows] == list(E.EDIT_BASELINES) + list(E.EDIT_PATHS)
    by = {r.provider: r for r in rows}
    for path, opts in E.EDIT_PATHS.items():
        e = by[path].extra
        assert e["background_exact"] and e["edited_tokens"] == 4 and e["forwards"] == 4, (path, e)
        assert by[path].speedup == pytest.approx(min(by[b].ms for b in E.EDIT_BASELINES) / by[path].ms)
        if "cache_dtype" in opts:
            assert 0 < by[path].max_diff < 0.5 and e["cache_mb"] < 0.6 * by["kv-edit, device cache"].extra["cache_mb"]
        elif path != "kv-edit, device cache" and not opts.get("inversion_free"):
            assert by[path].max_diff == 0.0, "where the cache lives changes nothing"
    assert by["kv-edit, inversion-free"].extra["inversion_ms"] is None
    table = core.markdown_table(rows, core.environment("cpu"))
    assert "KV-Edit" in table and table.count("| flux tiny 64^2, 25% mask |") == len(rows)
