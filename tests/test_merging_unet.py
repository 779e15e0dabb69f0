"""Token merging in UNets through ``fastgen.patch(..., tome=, todo=)``: equal to tomesd 0.1.3 with the
same settings (several ratios, odd latent sizes, every part it can merge), SDXL's default merges
where tomesd's merges nothing and the report says where, seeded randomness (one map for a whole CFG
batch), step schedules, ToDo, and the patch's own promises (unpatch bit-exact, stacking)."""

import warnings

import pytest
import torch

import fastgen
from fastgen.merging import ToDoConfig, ToMeConfig
from fastgen.merging.unet import downsample_tokens, unet_blocks
from fastgen.models import build_pipeline, tiny_denoiser


def _unet(level1_attention: bool):
    """A tiny UNet: attention at level 1 (SD 1.5 layout) or only at level 2 (SDXL layout)."""
    from diffusers import UNet2DConditionModel

    down = ("CrossAttnDownBlock2D", "DownBlock2D") if level1_attention else ("DownBlock2D", "CrossAttnDownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D") if level1_attention else ("CrossAttnUpBlock2D", "UpBlock2D")
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, down_block_types=down,
                                up_block_types=up, cross_attention_dim=32, attention_head_dim=2,
                                norm_num_groups=8).eval()


def _args(side: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 7, 32, generator=g))


@pytest.fixture(scope="module")
def sd15_unet():
    return _unet(level1_attention=True)


def _run(unet, args):
    with torch.no_grad():
        return unet(*args).sample  # positional: tomesd reads the latent size from the first positional argument


def _tomesd(unet, args, **kw):
    import tomesd

    tomesd.apply_patch(unet, **kw)
    try:
        return _run(unet, args)
    finally:
        tomesd.remove_patch(unet)


@pytest.mark.parametrize("side", [8, 9, 13])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_equals_tomesd_with_the_same_settings(sd15_unet, side, ratio):
    args = _args(side)
    ref = _run(sd15_unet, args)
    with fastgen.patch(sd15_unet, tome=ToMeConfig(ratio, use_rand=False)):
        out = _run(sd15_unet, args)
    expected = _tomesd(sd15_unet, args, ratio=ratio, use_rand=False)  # tomesd's max_downsample=1: level 1
    assert not torch.equal(out, ref), "merging changes the output"
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert torch.equal(_run(sd15_unet, args), ref), "unpatch is bit-exact"


@pytest.mark.parametrize("parts", [dict(merge_crossattn=True), dict(merge_mlp=True),
                                   dict(merge_attn=False, merge_mlp=True), dict(max_downsample=2)])
def test_equals_tomesd_for_every_part_and_level(sd15_unet, parts):
    args = _args(11, seed=1)
    with fastgen.patch(sd15_unet, tome=ToMeConfig(0.5, use_rand=False, **parts)):
        out = _run(sd15_unet, args)
    torch.testing.assert_close(out, _tomesd(sd15_unet, args, ratio=0.5, use_rand=False, **parts), rtol=0, atol=1e-5)


def test_level_ratios_override_the_ratio(sd15_unet):
    args = _args(8, seed=2)
    with fastgen.patch(sd15_unet, tome=ToMeConfig(0.5, use_rand=False, level_ratios={1: 0.3, 2: 0.6})):
        out = _run(sd15_unet, args)
    expected = _tomesd(sd15_unet, args, ratio=0.3, use_rand=False)  # level 1 at 0.3 ...
    assert not torch.allclose(out, expected, atol=1e-5)  # ... and level 2 merges too, at 0.6
    with fastgen.patch(sd15_unet, tome=ToMeConfig(0.5, use_rand=False, level_ratios={1: 0.3})):
        torch.testing.assert_close(_run(sd15_unet, args), expected, rtol=0, atol=1e-5)


def test_sdxl_default_merges_the_highest_level_with_attention_and_says_where():
    unet = _unet(level1_attention=False)
    assert sorted({lv for _, lv, _ in unet_blocks(unet)}) == [2]
    args = _args(10)
    ref = _run(unet, args)
    assert torch.equal(_tomesd(unet, args, ratio=0.5, use_rand=False), ref), "tomesd's default merges nothing here"
    with fastgen.patch(unet, tome=0.5) as handle:
        assert "4 block(s) at level 2 (ToMe 0.5 in attn1)" in handle.merging  # down, mid, 2 up
        assert "level 2" in repr(handle)
        out = _run(unet, args)
    assert not torch.equal(out, ref)
    with fastgen.patch(unet, tome=ToMeConfig(0.5, use_rand=False)):
        torch.testing.assert_close(_run(unet, args),
                                   _tomesd(unet, args, ratio=0.5, use_rand=False, max_downsample=2), rtol=0, atol=1e-5)


def test_a_config_that_merges_nothing_warns_once():
    unet = _unet(level1_attention=False)
    with pytest.warns(UserWarning, match="merges nothing.*level 2.*max_downsample"):
        handle = fastgen.patch(unet, tome=ToMeConfig(0.4, max_downsample=1))
    assert handle.merging == "UNet2DConditionModel: no block merges or downsamples tokens"
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastgen.patch(unet, tome=ToMeConfig(0.4, max_downsample=1)).remove()  # said once
        fastgen.patch(unet, tome=ToMeConfig(0.0)).remove()  # ratio 0 asks for nothing: no warning


def test_ratio_zero_and_steps_outside_the_schedule_equal_the_plain_patch(sd15_unet):
    args = _args(9, seed=3)
    with fastgen.patch(sd15_unet):
        plain = _run(sd15_unet, args)
    assert fastgen.PatchConfig(tome=0).tome is None
    with fastgen.patch(sd15_unet, tome=ToMeConfig(0.0)) as handle:
        assert handle.merging.endswith("no block merges or downsamples tokens")
        assert torch.equal(_run(sd15_unet, args), plain)


def test_one_map_for_the_whole_batch_whatever_its_size(sd15_unet):
    # tomesd drops randomness for odd batches; fastgen draws one map for the batch: identical rows
    # (both halves of a CFG batch with the same inputs) give identical outputs at any batch size
    for batch in (2, 3):
        x, t, ctx = _args(10, batch=1, seed=4)
        args = (x.expand(batch, -1, -1, -1).clone(), t.expand(batch), ctx.expand(batch, -1, -1).clone())
        with fastgen.patch(sd15_unet, tome=ToMeConfig(0.6, seed=5)):
            out = _run(sd15_unet, args)
        for b in range(1, batch):
            assert torch.equal(out[b], out[0])


def test_seeded_maps_are_reproducible_and_the_seed_matters(sd15_unet):
    args = _args(12, seed=6)
    outs = {}
    for seed in (1, 1, 2):
        with fastgen.patch(sd15_unet, tome=ToMeConfig(0.5, seed=seed)):
            outs.setdefault(seed, []).append(_run(sd15_unet, args))
    assert torch.equal(outs[1][0], outs[1][1])
    assert not torch.equal(outs[1][0], outs[2][0])


def test_a_pipeline_call_seeds_the_maps_from_its_generator_without_drawing_from_it():
    pipe, call = build_pipeline("sd15", "tiny")
    call = dict(call, num_inference_steps=3, output_type="latent")

    def run(seed, **patch):
        with fastgen.patch(pipe, **patch):
            return pipe(**call, generator=torch.Generator().manual_seed(seed)).images

    with torch.no_grad():
        a, b, c = run(1, tome=0.5), run(1, tome=0.5), run(2, tome=0.5)
        plain1, plain2 = run(1), run(2)
        # a fixed config seed makes the maps independent of the call's generator
        s1, s2 = (run(seed, tome=ToMeConfig(0.5, seed=9)) for seed in (1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, plain1) and not torch.equal(c, plain2)
    # the call's generator is only read: the initial noise (drawn from it) is the unpatched call's
    dev = lambda x, ref: float((x - ref).norm() / ref.norm())  # noqa: E731
    assert dev(a, plain1) < 0.5 and dev(c, plain2) < 0.5
    assert dev(s1, plain1) < 0.5 and dev(s2, plain2) < 0.5


def test_steps_schedule_follows_the_pipelines_steps():
    pipe, call = build_pipeline("sd15", "tiny")
    call = dict(call, num_inference_steps=4, output_type="latent")

    def run(**patch):
        with fastgen.patch(pipe, **patch), torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    plain = run()
    never = run(tome=ToMeConfig(0.5, steps=(0.9, 1.0)))  # steps 0, 1/4, 2/4, 3/4: none in [0.9, 1)
    last = run(tome=ToMeConfig(0.5, steps=(0.75, 1.0)))
    first = run(tome=ToMeConfig(0.5, steps=(0.0, 0.25)))
    every = run(tome=0.5)
    assert torch.equal(never, plain)
    assert not torch.equal(last, plain) and not torch.equal(first, plain)
    assert not torch.equal(last, every) and not torch.equal(first, every)


def test_todo_downsamples_keys_and_values_only(sd15_unet):
    x = torch.randn(2, 6 * 8, 5)
    near = downsample_tokens(x, (6, 8), 2, "nearest")
    grid = x.view(2, 6, 8, 5)
    assert torch.equal(near, grid[:, 1::2, 1::2].reshape(2, 12, 5))  # nearest-exact picks cell centres
    avg = downsample_tokens(x[:, :35], (5, 7), 2, "avg")
    g = x[:, :35].view(2, 5, 7, 5)
    assert avg.shape == (2, 3 * 4, 5)
    torch.testing.assert_close(avg[:, 0], g[:, :2, :2].mean((1, 2)))
    torch.testing.assert_close(avg[:, -1], g[:, 4, 6])  # the ragged corner cell: its one token
    args = _args(12, seed=7)
    ref = _run(sd15_unet, args)
    for method in ("nearest", "avg"):
        with fastgen.patch(sd15_unet, todo=ToDoConfig(2, method=method)) as handle:
            assert "ToDo x2 K/V" in handle.merging
            out = _run(sd15_unet, args)
        rel = float((out - ref).norm() / ref.norm())
        assert 0 < rel < 0.5, (method, rel)
    with fastgen.patch(sd15_unet, tome=ToMeConfig(0.5, use_rand=False), todo=2) as handle:
        assert "ToMe 0.5 in attn1, ToDo x2 K/V" in handle.merging
        both = _run(sd15_unet, args)
    assert torch.isfinite(both).all() and not torch.equal(both, ref)
    assert torch.equal(_run(sd15_unet, args), ref)


def test_merging_stacks_over_a_plain_patch_and_comes_off_exactly(sd15_unet):
    args = _args(9, seed=8)
    ref = _run(sd15_unet, args)
    with fastgen.patch(sd15_unet):
        plain = _run(sd15_unet, args)
        with fastgen.patch(sd15_unet, tome=ToMeConfig(0.5, use_rand=False)):
            merged = _run(sd15_unet, args)
        assert torch.equal(_run(sd15_unet, args), plain)
    assert not torch.equal(merged, plain)
    assert torch.equal(_run(sd15_unet, args), ref)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in sd15_unet.modules())


def test_runs_under_inference_mode_and_on_the_tiny_unet_with_keywords():
    unet, inputs = tiny_denoiser("unet")
    with torch.inference_mode():
        ref = unet(**inputs).sample
        with fastgen.patch(unet, tome=0.5):
            out = unet(**inputs).sample  # sample given by keyword: read all the same
    assert out.shape == ref.shape and not torch.equal(out, ref)


@pytest.mark.parametrize("offload", ["model_cpu_offload", "group_offload_block_level", "group_offload_leaf_level"])
def test_composes_with_offload_hooks(offload):
    pipe, call = build_pipeline("sd15", "tiny")
    call = dict(call, num_inference_steps=2, output_type="latent")

    def run():
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    with fastgen.patch(pipe, tome=0.5):
        ref = run()
        if offload == "model_cpu_offload":
            pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks, cpu as the execution device
        else:
            pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                           offload_type=offload.split("offload_")[1],
                                           **({"num_blocks_per_group": 1} if "block" in offload else {}))
        out = run()
    assert torch.equal(out, ref)


def test_under_autocast_and_in_a_pipeline_sharing_the_model(sd15_unet):
    args = _args(12, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run(sd15_unet, args)
        with fastgen.patch(sd15_unet, tome=ToMeConfig(0.5, use_rand=False)):
            out = _run(sd15_unet, args)
    assert out.dtype == ref.dtype
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert 0 < rel < 0.5
    pipe, call = build_pipeline("sd15", "tiny")
    twin = type(pipe)(**pipe.components)  # shares the UNet
    call = dict(call, num_inference_steps=2, output_type="latent")
    with torch.no_grad():
        plain = twin(**call, generator=torch.Generator().manual_seed(0)).images
        with fastgen.patch(pipe, tome=ToMeConfig(0.5, seed=3)):
            a = twin(**call, generator=torch.Generator().manual_seed(0)).images  # runs the merging model
            b = twin(**call, generator=torch.Generator().manual_seed(0)).images
        after = twin(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b) and not torch.equal(a, plain) and torch.equal(after, plain)


def test_the_demo_reports_a_merging_row_with_its_deviation(capsys):
    from fastgen.cli import main

    assert main(["demo", "--family", "sd15", "--size", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1",
                 "--quiet", "--tome", "0.5", "--todo", "2"]) == 0
    out = capsys.readouterr().out
    assert "| fastgen.patch + ToMe 0.5 + ToDo x2 (approximate) |" in out
    line = next(x for x in out.splitlines() if x.startswith("fastgen.patch + ToMe 0.5 + ToDo x2: speed-up"))
    assert "deviate by" in line and "relative L2" in line and "merges in UNet2DConditionModel" in line
    assert "unpatch restores bit-identical output: True" in out


def test_cuda_graph_capture_runs_unmerged_and_says_so(monkeypatch, sd15_unet):
    # No GPU here: capture is simulated where fastgen asks for it. The dst maps are drawn on the host,
    # which a captured graph cannot replay, so ToMe steps aside (ToDo, pure device work, stays).
    import fastgen.merging.runtime as runtime

    args = _args(9, seed=10)
    monkeypatch.setattr(runtime, "capturing", lambda: True)
    for name in ("unet", "flux"):
        model, inputs = (sd15_unet, None) if name == "unet" else tiny_denoiser("flux")
        run = (lambda: _run(sd15_unet, args)) if inputs is None else (lambda: model(**inputs).sample)
        with fastgen.patch(model), torch.no_grad():
            exact = run()
        with pytest.warns(UserWarning, match="while a CUDA graph is captured"):
            with fastgen.patch(model, tome=0.5), torch.no_grad():
                out = run()
        assert torch.equal(out, exact)


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_merging_under_torch_compile_equals_eager(name):
    # the hooks trace with graph breaks where the matching reads its index lists on the host
    model, inputs = tiny_denoiser(name)
    with torch.no_grad(), fastgen.patch(model, tome=ToMeConfig(0.5, seed=1), todo=2):
        eager = model(**inputs).sample
        compiled = torch.compile(model, backend="aot_eager")(**inputs).sample
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_steps_follow_the_schedulers_own_steps_with_heun():
    # Heun repeats each timestep (two scheduler steps per timestep but the last): the schedule
    # counts the scheduler's steps, so (0.5, 1) merges in the second half and (0, 0.5) in the first
    from diffusers import HeunDiscreteScheduler

    pipe, call = build_pipeline("sd15", "tiny")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    call = dict(call, num_inference_steps=4, output_type="latent")
    seen = []

    def run(tome=None):
        with fastgen.patch(pipe, tome=tome) as handle, torch.no_grad():
            mp = handle.state.model_patches[0]
            if mp.merging is not None:
                on = mp.merging.on
                mp.merging.on = lambda config: seen.append(on(config)) or seen[-1]
            return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    exact = run()
    late, early = run(ToMeConfig(0.5, steps=(0.5, 1.0))), None
    late_seen, seen[:] = list(seen), []
    early = run(ToMeConfig(0.5, steps=(0.0, 0.5)))
    n = len(pipe.scheduler.timesteps)
    assert n == 7 and len(late_seen) // 4 == n  # 4 merging blocks ask at each of the 7 forwards
    per_forward = [late_seen[i * 4] for i in range(n)]
    assert per_forward == [i / n >= 0.5 for i in range(n)]
    assert [seen[i * 4] for i in range(n)] == [i / n < 0.5 for i in range(n)]
    assert not torch.equal(late, exact) and not torch.equal(early, exact)


def test_cells_that_do_not_fit_skip_with_a_warning_instead_of_failing():
    pipe, call = build_pipeline("sd15", "tiny")
    call = dict(call, num_inference_steps=2, output_type="latent")
    with torch.no_grad():
        plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        with pytest.warns(UserWarning, match="sf=2 applies to video"):
            with fastgen.patch(pipe, tome=ToMeConfig(0.5, sf=2)):  # images: 2-D cells
                video_cells = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        with fastgen.patch(pipe, tome=ToMeConfig(0.5)):
            flat = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        assert torch.equal(video_cells, flat)
        with pytest.warns(UserWarning, match=r"cell does not fit"):
            with fastgen.patch(pipe, tome=ToMeConfig(0.9, sx=16, sy=16)):  # larger than the 4 x 4 grid
                big = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(big, plain)


def test_merge_mlp_follows_diffusers_feed_forward_chunking():
    unet, inputs = tiny_denoiser("unet")
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    config = ToMeConfig(0.5, use_rand=False, merge_mlp=True)
    with fastgen.patch(unet, tome=config):
        ref = _run(unet, args)
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for b in blocks:
        b.set_chunk_feed_forward(1, 0)  # along the batch: each chunk merges with its own matching
    with fastgen.patch(unet, tome=config):
        torch.testing.assert_close(_run(unet, args), ref, rtol=0, atol=1e-5)
    for b in blocks:
        b.set_chunk_feed_forward(2, 1)  # along the tokens: the feed-forward runs unmerged, said once
    with pytest.warns(UserWarning, match="chunked along the tokens"):
        with fastgen.patch(unet, tome=config):
            out = _run(unet, args)
    with fastgen.patch(unet, tome=ToMeConfig(0.5, use_rand=False)):
        torch.testing.assert_close(out, _run(unet, args), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_a_merging_model_pickles_and_its_copy_merges_alike(name):
    import pickle

    model, inputs = tiny_denoiser(name)
    with torch.no_grad(), fastgen.patch(model, tome=ToMeConfig(0.5, seed=3), todo=2):
        out = model(**inputs).sample
        copy = pickle.loads(pickle.dumps(model))
        assert torch.equal(copy(**inputs).sample, out)
    fastgen.unpatch(copy)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in copy.modules())


def test_bad_merging_options_are_value_errors():
    import numpy as np

    for bad in (dict(level_ratios=(1, 0.5)), dict(level_ratios=[1, 2]), dict(steps="01"), dict(max_downsample=1.0),
                dict(steps=(True, 1.0)), dict(seed=1.5)):
        with pytest.raises(ValueError):
            ToMeConfig(0.5, **bad)
    with pytest.raises(ValueError):
        ToDoConfig(2, max_downsample=2.0)
    assert fastgen.PatchConfig(tome=np.float32(0.5)).tome.ratio == 0.5
    assert fastgen.PatchConfig(todo=np.int64(2)).todo.factor == 2
    # NumPy integers of any width are held as Python ints (an int8 cell of 8 x 8 x 2 would overflow)
    tome = ToMeConfig(0.99, sx=np.int8(8), sy=np.uint8(8), sf=np.int16(2), seed=np.int32(3), max_downsample=np.int8(2))
    assert [type(v) for v in (tome.sx, tome.sy, tome.sf, tome.seed, tome.max_downsample)] == [int] * 5
    assert tome.sx * tome.sy * tome.sf == 128
    assert fastgen.PatchConfig(todo=0).todo is None and fastgen.PatchConfig(todo=1).todo is None


def test_level_ratios_alone_that_merge_nothing_warn():
    unet = _unet(level1_attention=False)  # attention at level 2 only
    with pytest.warns(UserWarning, match="merges nothing"):
        fastgen.patch(unet, tome=ToMeConfig(0.0, level_ratios={1: 0.3})).remove()


@pytest.mark.parametrize("arg", ["--tome=1.5", "--tome=nan", "--tome=abc", "--todo=2.5"])
def test_demo_refuses_bad_merging_arguments_as_usage_errors(arg, capsys):
    from fastgen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", arg])
    assert e.value.code == 2 and "--to" in capsys.readouterr().err
