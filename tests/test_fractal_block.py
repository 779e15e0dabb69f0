"""The block sampler (fastgen.fractal.block): the same uint8 images as the reference sampler for one seed
(float32, CPU) for AR and MAR levels, with and without CFG, at batch sizes 1, odd and even; the graph
path's bucketed data layout (on a CPU, without graphs); its sequential call counts; the row invariance
it rests on (linear layers, exact pixel-head decoding, the seed as a tensor). GPU-only: CUDA graphs."""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from fastgen.fractal import make_plan, rng, sample
from fastgen.fractal.block import BlockSampler, block_sampler, row_bucket
from fastgen.fractal.model import linear, values_to_uint8
from fastgen.fractal.schedule import call_counts
from fractal_models import model_of, single_thread, tiny  # noqa: F401 (single_thread: an autouse fixture)


CONFIGS = {
    "mar": dict(kinds=("mar", "mar")),
    "ar": dict(kinds=("ar", "ar"), num_conds=1),
    "mar-ar": dict(kinds=("mar", "ar")),
    "mar3-guiding": dict(kinds=("mar", "mar", "mar"), sizes=(8, 4, 2, 1), guiding=True),
}
LABELS = {1: [7], 3: [1, 4, 9], 4: [0, 3, 3, 8]}  # batch 1, odd, even (a label twice: the image index differs)
KW = {"temperature": 1.1, "seed": 11, "progress": False}


@functools.cache
def _model(name):
    return model_of(tiny(**CONFIGS[name]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["no-cfg", "cfg"])
def test_block_gives_the_reference_images(name, cfg):
    model = _model(name)
    for batch, labels in LABELS.items():
        ref = sample(model, labels, sampler="reference", cfg=cfg, **KW)
        out = sample(model, labels, sampler="block", cfg=cfg, **KW)
        assert out.dtype == torch.uint8 and out.shape == ref.shape == (batch, 3, 8, 8)
        assert torch.equal(out, ref), f"{name}, batch {batch}, cfg {cfg}: {(out != ref).sum()} values differ"
    assert not torch.equal(out[1], out[2])  # the same label twice: other images


def test_bucketed_layout_gives_the_reference_images():
    # The CUDA graph path's data layout (static, padded inputs per (level, row bucket)) without graphs.
    model = _model("mar3-guiding")
    plan = make_plan(model, [2, 5, 5], cfg=2.5, cfg_schedule="constant", **KW)
    sampler = BlockSampler(model, plan, bucket=True)
    with torch.inference_mode():
        out = values_to_uint8(sampler(plan))
        assert torch.equal(out, sample(model, [2, 5, 5], sampler="reference", cfg=2.5, cfg_schedule="constant", **KW))
        # the same sampler serves another batch and seed; its slots are reused (rows 3 x count -> buckets)
        plan2 = make_plan(model, [1, 2, 3, 4, 5], cfg=2.5, **{**KW, "seed": 3})
        again = values_to_uint8(sampler(plan2))
    assert torch.equal(again, sample(model, [1, 2, 3, 4, 5], sampler="reference", cfg=2.5, **{**KW, "seed": 3}))
    assert {rows for _, rows in sampler._slots} <= {row_bucket(n) for n in range(1, 21)}
    with pytest.raises(ValueError, match="other settings"):
        sampler(make_plan(model, [1], cfg=2.5, **{**KW, "temperature": 1.0}))
    assert [row_bucket(n) for n in (1, 3, 5, 16, 17, 33, 256, 1792)] == [1, 4, 8, 16, 32, 48, 256, 1792]


def test_block_makes_the_sequential_calls():
    model = model_of(tiny(("mar", "mar", "mar"), (8, 4, 2, 1), guiding=True, num_iter=3))
    plan = make_plan(model, [1, 2], cfg=2.0, **KW)
    calls, rows = collections.Counter(), collections.defaultdict(list)

    def record(kind, level, n):
        calls[kind, level] += 1
        rows[kind, level].append(n)

    with torch.inference_mode():
        BlockSampler(model, plan, on_call=record)(plan)
    counts = call_counts(model.config, (3, 3, 3))
    assert (calls["level", 0], calls["level", 1], calls["level", 2]) == counts.sequential == (3, 9, 27)
    assert calls["pixel", 3] == counts.pixel_sequential == 81
    assert (calls["guide", 1], calls["guide", 2]) == counts.guide_sequential[1:] == (9, 27)
    # one call carries every node of an iteration: level 1 records each node once per iteration (3), the
    # pixel head each pixel once per channel
    assert sum(rows["level", 1]) == 3 * 2 * 4 and sum(rows["pixel", 3]) == 3 * 2 * 64


def test_rows_are_computed_alike_however_many_a_call_has():
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 16), torch.randn(24), torch.randn(37, 16)
    full = linear(x, w, b)
    assert all(torch.equal(linear(x[:n], w, b), full[:n]) for n in range(1, 37))
    assert all(torch.equal(linear(x[i:i + 1], w, b), full[i:i + 1]) for i in range(37))
    assert torch.equal(linear(x.view(37, 1, 16), w, b).view(37, 24), full)
    assert linear(torch.zeros(0, 16), w, b).shape == (0, 24)


def test_pixel_head_decoding_with_cached_queries_is_the_full_forward():
    head = _model("mar").pixel_head
    cond, ids = torch.randn(6, 8), torch.randint(0, 256, (6, 3))
    with torch.inference_mode():
        full = head(cond, ids)
        cache = head.new_cache(8, queries=True)  # a larger cache serves fewer rows
        steps = [head.logits(head.hidden(head.embed(cond, ids, c, c + 1), cache=cache, pos=c)[:, 0], c)
                 for c in range(3)]
    assert torch.equal(torch.stack(steps, 1), full)


def test_seed_words_give_the_int_seeds_numbers():
    image, path = torch.arange(5), torch.tensor([0, 3, 99, 2 ** 31, 7])
    for seed in (0, 11, 2 ** 64 - 1):
        kw = {"level": 2, "purpose": rng.PIXEL, "count": 9}
        assert torch.equal(rng.random_bits(rng.seed_words(seed), image, path, **kw),
                           rng.random_bits(seed, image, path, **kw))
    with pytest.raises(ValueError, match="int64 \\(2,\\)"):
        rng.random_bits(torch.zeros(3, dtype=torch.int64), image, path, level=0, purpose=rng.ORDER, count=1)


def test_block_sampler_progress_and_cpu_construction():
    model = _model("mar")
    out = sample(model, [1, 2], sampler="block", cfg=2.0, progress=True)
    assert out.shape == (2, 3, 8, 8)
    plan = make_plan(model, [1], progress=False)
    assert not block_sampler(model, plan).graphs  # CPU: no graphs, a new sampler per call
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        BlockSampler(model, plan, graphs=True)


# --- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_replay_the_eager_block_sampler():
    model = _model("mar3-guiding").cuda()
    labels = [1, 4, 4, 9, 0]
    plan = make_plan(model, labels, cfg=3.0, **KW)
    with torch.inference_mode():
        eager = values_to_uint8(BlockSampler(model, plan, graphs=False, bucket=True)(plan))
        sampler = BlockSampler(model, plan)
        first = values_to_uint8(sampler(plan))  # warm-up run per slot, captures
        captured = sampler.captured
        again = values_to_uint8(sampler(plan))  # replays
    assert captured > 0 and sampler.captured == captured
    assert torch.equal(first, eager) and torch.equal(again, eager)
    # (against the reference on a GPU only within sampling tolerance: its kernels see other shapes, so one
    # draw may part and with it the rest of its image; tests/test_fractal_digits.py checks what is drawn)


@pytest.mark.parametrize("name", ["ar", "mar-ar"])
def test_autocast_runs_both_samplers_with_cached_levels(name):
    # The KV caches keep the weights' dtype; autocast hands them bf16 projections (stored in the cache's dtype).
    model = _model(name)
    full = sample(model, [1, 4, 9], cfg=3.0, **KW)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sample(model, [1, 4, 9], sampler="reference", cfg=3.0, **KW)
        out = sample(model, [1, 4, 9], sampler="block", cfg=3.0, **KW)
    assert out.dtype == ref.dtype == torch.uint8 and out.shape == ref.shape == full.shape
    # bf16 matmuls: a draw whose logits round differently may part; almost all values agree
    assert (out == ref).float().mean() > 0.95 and (ref == full).float().mean() > 0.95


def test_a_kept_sampler_serves_calls_in_every_grad_mode():
    # Kept samplers (block_sampler on CUDA; keep=True here) hold buffers across calls: made under inference
    # mode they must still take in-place writes in a later call outside it, and the reverse.
    import contextlib

    model = _model("mar-ar")
    plan = make_plan(model, [3, 8], cfg=2.0, **KW)
    want = sample(model, [3, 8], cfg=2.0, **KW)
    kept = None
    for mode in (torch.inference_mode, torch.no_grad, contextlib.nullcontext, torch.inference_mode):
        with mode():
            sampler = block_sampler(model, plan, keep=True)
            out = values_to_uint8(sampler(plan))
        kept = kept or sampler
        assert sampler is kept and torch.equal(out, want), mode
    assert not sample(model, [3], sampler="block", **KW).is_inference()  # an ordinary tensor for the caller
    out = sample(model, [3], sampler="block", **KW)
    out[:, :, 0] = 255  # writable (e.g. a grid's border)


def test_kept_samplers_do_not_keep_their_model_alive():
    import gc
    import weakref

    from fastgen.fractal import block

    before = len(block._KEPT)  # other tests' models (cached) keep theirs
    model = model_of(tiny(**CONFIGS["mar"]))
    plan = make_plan(model, [1], cfg=2.0, **KW)
    block_sampler(model, plan, keep=True)(plan)
    assert model in block._KEPT and len(block._KEPT) == before + 1
    ref = weakref.ref(model)
    del model, plan
    gc.collect()
    assert ref() is None and len(block._KEPT) == before
