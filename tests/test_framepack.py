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
    with pytest.raises(ValueError, match="at least 1 section"):
        section_layouts(FramePackConfig(), 0)


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
