"""FramePack (fastgen.framepack): the packing schedule against the method's figures and diffusers'
pipeline, the patched transformer against diffusers' own forward, and the section sampler against
diffusers' pipeline, streamed."""

from __future__ import annotations

import time

import pytest
import torch

import fastgen
from fastgen.framepack import (
    INVERTED_ANTI_DRIFTING,
    VANILLA,
    FramePackConfig,
    latent_paddings,
    num_sections,
    packed_tokens,
    section_layouts,
    sections,
    video_length,
)
from fastgen.models import build_pipeline, tiny_denoiser


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on the 2-core CI machine
    yield
    torch.set_num_threads(n)


def _r(x):
    return list(range(*x)) if isinstance(x, tuple) else x


# --- the schedule ---------------------------------------------------------------------------


def test_section_counts_and_paddings_are_the_published_figures():
    assert num_sections(129) == 4 and num_sections(91) == 3 and num_sections(33) == 1 and num_sections(34) == 2
    assert latent_paddings(4) == [3, 2, 1, 0]
    assert latent_paddings(6) == [3, 2, 2, 2, 1, 0]
    assert latent_paddings(1) == [0]
    for n in range(1, 40):
        assert num_sections(33 * n) == n and num_sections(33 * n + 1) == n + 1


def test_inverted_layout_at_padding_3_is_the_published_figure():
    first = section_layouts(FramePackConfig(), 4)[0]
    assert first.padding == 3
    assert first.clean.tolist() == [0, 37]  # start 0, post (1x) 37; blank 1-27
    assert first.latents.tolist() == _r((28, 37))
    assert first.history[0].tolist() == [38, 39] and first.history[1].tolist() == _r((40, 56))
    assert [s.padding for s in section_layouts(FramePackConfig(), 4)] == [3, 2, 1, 0]


def test_vanilla_layout_is_the_published_figure():
    # [start 1 | 4x 16 | 2x 2 | 1x 1 | noisy 9]
    for s in section_layouts(FramePackConfig(sampling_type=VANILLA), 3):
        assert s.clean.tolist() == [0, 19]
        assert s.history[1].tolist() == _r((1, 17)) and s.history[0].tolist() == [17, 18]
        assert s.latents.tolist() == _r((20, 29)) and s.padding == 0


def test_packed_tokens_at_640x608_are_the_published_figures():
    t = packed_tokens(FramePackConfig(), 608 // 8, 640 // 8)
    assert (t["noisy"], t["clean"], t["2x"], t["4x"]) == (13680, 3040, 380, 400)
    assert t["context"] == 3820 and t["total"] == 17500


def test_context_is_bounded_however_many_sections():
    # the packed sequence of every section of every video length is the same size: flat cost
    cfg = FramePackConfig()
    sizes = {s.context_frames + s.latents.numel() for n in range(1, 41) for s in section_layouts(cfg, n)}
    assert sizes == {1 + 19 + 9}
    # the paper's general form: any number of rates with growing kernels stays bounded too
    geometric = FramePackConfig(history=((1, (1, 2, 2)), (2, (2, 4, 4)), (4, (4, 8, 8)), (8, (8, 16, 16))))
    assert {s.context_frames for s in section_layouts(geometric, 12)} == {1 + 15}
    assert packed_tokens(geometric, 64, 64)["8x"] == 16


@pytest.mark.parametrize("bad, match", [
    (dict(latent_window_size=0), "latent_window_size"),
    (dict(sampling_type="forward"), "sampling_type"),
    (dict(history=()), "history"),
    (dict(history=((0, (1, 2, 2)),)), "at least 1 frame"),
    (dict(history=((1, (1, 2)),)), "three positive ints"),
    (dict(window=9), "unknown FramePackConfig option"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        FramePackConfig(**bad)


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="num_frames"):
        num_sections(0)
    with pytest.raises(ValueError, match="latent_window_size"):
        num_sections(129, latent_window_size=0)
    with pytest.raises(ValueError, match="number of sections"):
        section_layouts(FramePackConfig(), 0)
    with pytest.raises(ValueError, match="number of sections"):
        video_length(0, 9, VANILLA)
    with pytest.raises(ValueError, match="sampling_type"):
        video_length(3, 9, "inverted")
    with pytest.raises(ValueError, match="latent_height"):
        packed_tokens(FramePackConfig(), -4, 10)


def test_numpy_integers_are_accepted_as_diffusers_accepts_them():
    import numpy as np

    assert num_sections(np.int64(129), np.int64(9)) == 4
    assert FramePackConfig(latent_window_size=np.int64(9)).latent_window_size == 9
    assert [s.padding for s in section_layouts(FramePackConfig(), np.int64(4))] == [3, 2, 1, 0]


# --- against diffusers' pipeline ----------------------------------------------------------------


def _pipe(side=32):
    pipe, call = build_pipeline("framepack", "tiny")
    pipe.set_progress_bar_config(disable=True)
    call.update(height=side, width=side, num_inference_steps=2)
    return pipe, call


def _record(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("sampling_type", [INVERTED_ANTI_DRIFTING, VANILLA])
def test_schedules_equal_diffusers_pipeline(sampling_type):
    """Every section's indices, as diffusers' pipeline passes them to its transformer, at lengths of
    1, 3 (91 frames), 4 (129 frames) and 6 sections."""
    pipe, call = _pipe()
    call.update(num_inference_steps=1, output_type="latent", sampling_type=sampling_type)
    call.pop("num_frames")
    calls, handle = _record(pipe.transformer)
    try:
        for frames in (33, 91, 129, 6 * 33):
            calls.clear()
            pipe(**call, num_frames=frames, generator=torch.Generator().manual_seed(0))
            n = num_sections(frames)
            assert len(calls) == n
            for got, s in zip(calls, section_layouts(FramePackConfig(sampling_type=sampling_type), n)):
                assert got["indices_latents"].tolist() == s.latents.tolist()
                assert got["indices_latents_clean"].tolist() == s.clean.tolist()
                assert got["indices_latents_history_2x"].tolist() == s.history[0].tolist()
                assert got["indices_latents_history_4x"].tolist() == s.history[1].tolist()
    finally:
        handle.remove()


# --- the patched transformer against diffusers' forward -----------------------------------------


def _fresh_history(inputs, seed):
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    for k in ("latents_clean", "latents_history_2x", "latents_history_4x"):
        out[k] = torch.randn(inputs[k].shape, generator=g)
    return out


def test_patched_transformer_equals_diffusers_forward_over_interleaved_states():
    """One patched model, one generation, calls that alternate between what may be reused and what
    must not be: each output equals the unpatched model's on the same inputs."""
    import copy

    model, inputs = tiny_denoiser("framepack")
    reference = copy.deepcopy(model)
    handle = fastgen.patch(model)
    cache = handle.state.kv_cache
    other = _fresh_history(inputs, 1)
    batch1 = {k: (v[:1] if torch.is_tensor(v) and v.dim() > 1 else v) for k, v in inputs.items()}
    batch1["timestep"], batch1["guidance"] = inputs["timestep"][:1], inputs["guidance"][:1]

    def check(x, grad=False, autocast=False):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with torch.set_grad_enabled(grad), ctx:
            got = model(**x, return_dict=False)[0]
            want = reference(**x, return_dict=False)[0]
        tol = 2e-2 if autocast else 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)

    with fastgen.generation(model):
        check(inputs)
        hits = cache.hits
        check(inputs)  # the very same history: packed context, pooled RoPE, image tokens served again
        assert cache.hits >= hits + 3
        check(other)  # another section's history: computed afresh
        check(inputs)  # and back: both sections' entries live side by side
        with torch.no_grad():
            inputs["latents_clean"].mul_(0.5)  # an in-place write bumps the version: not served stale
        check(inputs)
        check(dict(inputs, timestep=inputs["timestep"] * 0.5))  # other steps of the section
        check(batch1)
        check(inputs, grad=True)  # autograd on: upstream's own path
        check(inputs, autocast=True)  # autocast: upstream's Conv3d in bf16
        check(dict(inputs, indices_latents_history_4x=inputs["indices_latents_history_4x"] + 3))
    check(inputs)  # outside a generation nothing is reused, and nothing differs
    fastgen.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    assert "_pack_history_states" not in model.__dict__ and not hasattr(model.clean_x_embedder, "_diffusers_hook")


# --- the section sampler against diffusers' pipeline -------------------------------------------


def _neg(call):
    g = torch.Generator().manual_seed(9)
    return dict(negative_prompt_embeds=torch.randn(call["prompt_embeds"].shape, generator=g),
                negative_pooled_prompt_embeds=torch.randn(call["pooled_prompt_embeds"].shape, generator=g),
                negative_prompt_attention_mask=call["prompt_attention_mask"].clone(), true_cfg_scale=2.0)


@pytest.mark.parametrize("sampling_type, extra", [
    (INVERTED_ANTI_DRIFTING, "last_image"),
    (VANILLA, "true_cfg"),
])
def test_patched_pipeline_equals_diffusers_pipeline(sampling_type, extra):
    pipe, call = _pipe()
    call.update(sampling_type=sampling_type, num_frames=33 * 3)
    if extra == "true_cfg":
        call.update(_neg(call))
    else:
        call["last_image"] = call["image"].rotate(90)
    runs = {}
    for state in ("diffusers", "fastgen", "unpatched"):
        if state == "fastgen":
            fastgen.patch(pipe)
        elif state == "unpatched":
            fastgen.unpatch(pipe)
        video = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").frames
        latents = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").frames
        runs[state] = video, latents
    (ref, ref_lat), (out, out_lat), (back, back_lat) = runs["diffusers"], runs["fastgen"], runs["unpatched"]
    assert out.shape == ref.shape == (1, video_length(3, 9, sampling_type), 3, 32, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(out_lat) == len(ref_lat) == 3
    for a, b in zip(out_lat, ref_lat):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(back, ref) and all(torch.equal(a, b) for a, b in zip(back_lat, ref_lat))


@pytest.mark.parametrize("sampling_type", [INVERTED_ANTI_DRIFTING, VANILLA])
def test_sections_stream_the_pipeline_video(sampling_type):
    """Streamed sections, placed by their start, are the pipeline's video; each hands out only
    frames no later section changes, so a long video never sits in memory whole."""
    pipe, call = _pipe()
    call.update(sampling_type=sampling_type, num_frames=33 * 4)
    want = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").frames
    fastgen.patch(pipe)
    image = call.pop("image")
    got = list(sections(pipe, image, **call, generator=torch.Generator().manual_seed(0), output_type="np",
                        progress=False))
    assert [s.index for s in got] == [0, 1, 2, 3] and all(s.count == 4 for s in got)
    placed = sorted((s for s in got if s.num_frames), key=lambda s: s.start)
    starts = [s.start for s in placed]
    assert starts[0] == 0 and all(a.start + a.num_frames == b.start for a, b in zip(placed, placed[1:]))
    import numpy as np

    video = np.concatenate([s.frames for s in placed], axis=1)
    assert video.shape == want.shape
    np.testing.assert_allclose(video, want, rtol=1e-5, atol=1e-5)
    decode = (2 * 9 - 1) * 4 + 1 + 33  # one decoded section and the held-back overlap, at most
    assert max(s.num_frames for s in got) <= decode
    empty = [s for s in got if not s.num_frames]
    assert all(s.frames.shape == (1, 0, 32, 32, 3) for s in empty)  # typed as the other sections' frames
    assert (len(empty) == 1) == (sampling_type == INVERTED_ANTI_DRIFTING)
    if sampling_type == INVERTED_ANTI_DRIFTING:  # the end of the video comes first
        assert [s.start for s in got][1:] == sorted([s.start for s in got][1:], reverse=True)
    latents = list(sections(pipe, image, **call, generator=torch.Generator().manual_seed(0), output_type="latent",
                            progress=False))
    assert all(s.frames is None and s.num_frames == 0 for s in latents)
    for a, b in zip(latents, got):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)


def test_section_cost_is_flat():
    """Every section after the first costs the same: the same FLOPs (counted), a packed sequence of the
    same length however much video precedes it, and the same wall time (median of sections 8-12 within
    1.3x of sections 2-6, best of three runs; medians, because a shared CI core stalls single sections)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe, call = _pipe()
    fastgen.patch(pipe)
    image = call.pop("image")
    call.update(num_frames=33 * 13, num_inference_steps=6, sampling_type=VANILLA)
    run = lambda: sections(pipe, image, **call, generator=torch.Generator().manual_seed(0),  # noqa: E731
                           output_type="latent", progress=False)
    lengths, flops = [], []
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args: lengths.append(args[0].shape[1]))
    try:
        it = run()
        while True:
            with FlopCounterMode(display=False) as counter:
                if next(it, None) is None:
                    break
            flops.append(counter.get_total_flops())
    finally:
        handle.remove()
    assert len(flops) == 13 and len(set(lengths)) == 1
    assert len(set(flops[1:])) == 1 and flops[1] > 0, flops  # the first section also encodes the image
    best = None
    for _ in range(3):
        times, last = [], time.perf_counter()
        for _s in run():
            now = time.perf_counter()
            times.append(now - last)
            last = now
        best = times if best is None else [min(a, b) for a, b in zip(best, times)]
    early, late = sorted(best[2:7])[2], sorted(best[8:13])[2]
    assert late <= 1.3 * early, best


def test_low_vram_mode_runs_the_same_video():
    from fastgen.framepack.offload import enable_low_vram

    pipe, call = _pipe()
    call.update(num_frames=33 * 2)
    want = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    fastgen.patch(pipe)
    enable_low_vram(pipe, "cpu")  # diffusers' block-level group offloading (streams need CUDA)
    got = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CUDA"):
        enable_low_vram(pipe, "cpu", use_stream=True)
    with pytest.raises(ValueError, match="num_blocks_per_group"):
        enable_low_vram(pipe, "cpu", num_blocks_per_group=0)
    flux, _ = build_pipeline("flux", "tiny")
    with pytest.raises(ValueError, match="HunyuanVideoFramepackPipeline"):
        enable_low_vram(flux, "cpu")


def test_bad_sampler_input_raises():
    pipe, call = _pipe()
    fastgen.patch(pipe)
    image = call.pop("image")
    embeds = pipe.encode_image(pipe.video_processor.preprocess(image, 32, 32))
    with pytest.raises(ValueError, match="do not match 4 latent channels at 4x4"):
        next(sections(pipe, None, **call, image_latents=torch.zeros(1, 4, 1, 3, 3), image_embeds=embeds))
    with pytest.raises(ValueError, match="image is required"):
        next(sections(pipe, None, **call, image_latents=torch.zeros(1, 4, 1, 4, 4)))
    with pytest.raises(ValueError, match="num_frames"):
        pipe(image, **dict(call, num_frames=0))
    with pytest.raises(ValueError, match="sampling_type"):
        pipe(image, **dict(call, sampling_type="forward"))
    with pytest.raises(ValueError, match="last_image"):  # as diffusers: vanilla order has no last frame
        pipe(image, **dict(call, sampling_type=VANILLA), last_image=image)
    with pytest.raises(ValueError, match="output_type"):
        next(sections(pipe, image, **call, output_type="mp4"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        next(sections(pipe, image, **call, frames=9))
    with pytest.raises(ValueError, match="expected \\(1, 4, 1, 4, 4\\)"):  # two frames
        next(sections(pipe, None, **call, image_latents=torch.zeros(1, 4, 2, 4, 4), image_embeds=embeds))
    with pytest.raises(ValueError, match="image_embeds of shape"):
        next(sections(pipe, None, **call, image_latents=torch.zeros(1, 4, 1, 4, 4), image_embeds=embeds[..., :7]))
    flux, _ = build_pipeline("flux", "tiny")
    with pytest.raises(ValueError, match="HunyuanVideoFramepackPipeline"):
        next(sections(flux, image, **call))
    import numpy as np

    out = pipe(image, **dict(call, num_frames=np.int64(33)), output_type="latent").frames
    assert len(out) == 1


def test_sections_run_from_precomputed_conditioning_without_image_encoder():
    """The transformer, VAE decoder and scheduler suffice: start-image latents and SigLIP features
    computed elsewhere give the video the pipeline makes from the image."""
    pipe, call = _pipe()
    call.update(num_frames=33 * 2)
    image = call.pop("image")
    want = list(sections(pipe, image, **call, generator=torch.Generator().manual_seed(0), output_type="latent",
                         progress=False))
    pixels = pipe.video_processor.preprocess(image, 32, 32)
    embeds = pipe.encode_image(pixels)
    g = torch.Generator().manual_seed(0)
    latents = pipe.prepare_image_latents(pixels, dtype=torch.float32, generator=g)  # the pipeline's first draw
    pipe.image_encoder = None
    got = list(sections(pipe, None, **call, image_latents=latents, image_embeds=embeds, generator=g,
                        output_type="latent", progress=False))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)


def test_history_convolutions_whose_weights_a_hook_places_are_called_not_read():
    """Under sequential or leaf-level offload the history convolutions' weights sit on the meta device
    (or the CPU) until their own pre-forward hook puts them in place: the fused packing must not read
    them, and the model must still give diffusers' output."""
    from offload_sim import MetaParams

    model, inputs = tiny_denoiser("framepack")
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    handles = []
    for conv in (model.clean_x_embedder.proj, model.clean_x_embedder.proj_2x, model.clean_x_embedder.proj_4x):
        params = MetaParams(conv, ["weight", "bias"])
        handles += [conv.register_forward_pre_hook(lambda m, a, p=params: p.put(m, True)),
                    conv.register_forward_hook(lambda m, a, o, p=params: p.put(m, False))]
        params.put(conv, False)
    fastgen.patch(model)
    with torch.no_grad(), fastgen.generation(model):
        for _ in range(2):
            torch.testing.assert_close(model(**inputs, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
    assert model.clean_x_embedder.proj.weight.is_meta
    for h in handles:
        h.remove()


def test_lora_on_the_history_embedders_is_computed_as_upstream():
    """A PEFT LoRA wraps the history convolutions: the fused packing, which reads a convolution's
    weight, must step aside, at every LoRA scale, as the scale changes between calls."""
    import copy

    from peft import LoraConfig

    model, inputs = tiny_denoiser("framepack")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                 target_modules=["clean_x_embedder.proj_4x", "clean_x_embedder.proj"]))
    reference = copy.deepcopy(model)
    fastgen.patch(model)
    with torch.no_grad(), fastgen.generation(model):
        for scale in (1.0, 0.3, 1.0, 0.0):
            kw = dict(inputs, attention_kwargs={"scale": scale}, return_dict=False)
            torch.testing.assert_close(model(**kw)[0], reference(**kw)[0], rtol=1e-5, atol=1e-5)


def _live_latent_frames(channels, size):
    # latent frames held by live tensors of the pipeline's latent layout (B, C, T, h, w)
    import gc

    seen, frames = set(), 0
    for obj in gc.get_objects():
        # type(), not isinstance(): a deprecated module proxy warns when asked for its __class__
        if (issubclass(type(obj), torch.Tensor) and obj.dim() == 5 and obj.shape[1] == channels and tuple(obj.shape[3:]) == size
                and obj.dtype == torch.float32):
            base = obj._base if obj._base is not None else obj
            if id(base) not in seen:
                seen.add(id(base))
                frames += base.shape[2]
    return frames


@pytest.mark.parametrize("sampling_type", [INVERTED_ANTI_DRIFTING, VANILLA])
def test_memory_is_flat_over_sections(sampling_type):
    """The step cache and the latents a patched pipeline call keeps do not grow with the sections
    made: the same at section 3 as at section 8."""
    pipe, call = _pipe()
    call.update(num_frames=33 * 8, num_inference_steps=1, sampling_type=sampling_type)
    handle = fastgen.patch(pipe)
    entries, frames = [], []

    def probe(module, args, kwargs):
        entries.append(len(handle.state.kv_cache))
        frames.append(_live_latent_frames(4, (4, 4)))

    hook = pipe.transformer.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt")
    finally:
        hook.remove()
    assert len(entries) == 8
    assert entries[7] == entries[2] and frames[7] == frames[2], (entries, frames)
