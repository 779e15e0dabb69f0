"""FractalGen (fastgen.fractal): schedules against the method's figures, call counts of the reference
sampler, the presets' parameter counts, KV-cached decoding against full recompute, the keyed RNG's
independence of order and batch layout, the reference sampler's determinism, state-dict layout, and
bad input. Tiny configs, CPU."""

from __future__ import annotations

import collections
import itertools
import math

import numpy as np
import pytest
import torch

import fastgen
from fastgen.fractal import (
    PRESETS,
    PUBLISHED_PARAMETERS,
    FractalConfig,
    FractalGen,
    LevelConfig,
    PixelHeadConfig,
    ReferenceSampler,
    call_counts,
    get_config,
    make_plan,
    mar_schedule,
    rng,
    sample,
)
from fastgen.fractal.config import small_config
from fastgen.fractal.model import ids_to_values, load_checkpoint, rope_2d, values_to_uint8
from fractal_models import model_of, single_thread, tiny  # noqa: F401 (single_thread: an autouse fixture)
from fastgen.fractal.schedule import level_schedule, mar_mask_lengths


def shrunk(name: str) -> FractalConfig:
    """A preset's sequence structure (sizes, kinds, iterations, guiding pixels) at width 8, depth 1."""
    return small_config(name)


# --- schedules -----------------------------------------------------------------------------------


def test_mar_schedule_has_the_published_figures():
    s = mar_schedule(256, 64)
    assert len(s) == 64 and sum(s) == 256
    assert s[:10] == (1,) * 10
    assert s[-6:] == (6, 6, 7, 6, 6, 6)
    assert mar_schedule(16, 16) == (1,) * 16
    assert mar_schedule(16, 64) == (1,) * 16  # at most one iteration per token


@pytest.mark.parametrize("length,n", [(256, 64), (256, 7), (16, 16), (16, 5), (4, 4), (64, 10)])
def test_mar_schedule_is_the_cosine_formula(length, n):
    masked, prev = mar_mask_lengths(length, n), length
    for s, m in enumerate(masked):
        assert m == max(1, min(prev - 1, math.floor(length * math.cos(math.pi / 2 * (s + 1) / n))))
        prev = m
    counts = mar_schedule(length, n)
    assert all(c >= 1 for c in counts) and sum(counts) == length
    bounds = level_schedule("mar", length, n).bounds
    assert bounds[0][1] == length and bounds[-1][0] == 0  # order consumed from its end, as the official mask_by_order
    assert all(a[0] == b[1] for a, b in itertools.pairwise(bounds))


def test_cfg_schedules():
    mar = level_schedule("mar", 256, 64)
    linear = mar.cfg_scales(5.0, "linear")
    assert all(a <= b for a, b in itertools.pairwise(linear)) and linear[0] > 1.0
    assert linear[-1] == 1 + 4.0 * 255 / 256 < 5.0  # never quite the nominal scale
    assert linear[0] == 1 + 4.0 * 1 / 256  # linear in the tokens generated once the iteration is done
    assert mar.cfg_scales(5.0, "constant") == (5.0,) * 64
    ar = level_schedule("ar", 16, 99)
    assert ar.counts == (1,) * 16 and ar.cfg_scales(3.0, "linear")[-1] == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        mar.cfg_scales(2.0, "cosine")


# --- call counts ------------------------------------------------------------------------------------


def test_call_counts_of_the_presets():
    c = call_counts(PRESETS["fractalmar_huge_in256"])
    assert c.sequential == (64, 1024, 16384) and c.pixel_sequential == 49152
    assert c.reference == (64, 4096, 65536) and c.pixel_reference == 3 * 256 * 256
    assert c.guide_sequential == (0, 3 * 64, 3 * 1024)
    c = call_counts(PRESETS["fractalmar_in64"])
    assert c.sequential == (64, 1024) and c.pixel_sequential == 3072 and c.reference == (64, 4096)
    assert call_counts(PRESETS["fractalar_in64"]).sequential == (256, 4096)


class _Counting(ReferenceSampler):
    """The reference sampler with its pixel draws counted and replaced by zeros (the pixel head's cost
    is not what is counted here), and optionally whole nodes of a level replaced too."""

    def __init__(self, model, plan, stub_level=None):
        self.calls = collections.Counter()
        self.steps = collections.defaultdict(set)
        self.stub_level, self.stubbed = stub_level, []
        super().__init__(model, plan, on_call=self.record)

    def record(self, kind, level, iterations):
        self.calls[kind, level] += 1
        self.steps[kind, level].add(iterations)

    def pixel(self, head, cond, noise, *, cfg, record):
        kind, level, iterations = record
        for c in range(3):
            self.record(kind, level, iterations + (c,))
        return torch.zeros(noise.shape[0], 3)

    def node(self, k, conds, path, iterations, cfg):
        if k == self.stub_level:
            self.stubbed.append(iterations)
            size = self.config.levels[k].image_size
            return torch.zeros(path.shape[0], 3, size, size)
        return super().node(k, conds, path, iterations, cfg)


def test_reference_call_counts_imagenet64_mar():
    model = model_of(shrunk("fractalmar_in64"))
    sampler = _Counting(model, make_plan(model, [3], progress=False))
    with torch.inference_mode():
        sampler()
    # Calls made, one patch's subtree at a time ...
    assert sampler.calls["level", 0] == 64 and sampler.calls["level", 1] == 256 * 16
    assert sampler.calls["pixel", 2] == 3 * 64 * 64
    # ... and sequential (dependent) calls: those sharing their iterations are one batched call.
    assert len(sampler.steps["level", 0]) == 64 and len(sampler.steps["level", 1]) == 1024
    assert len(sampler.steps["pixel", 2]) == 3072
    counts = call_counts(model.config)
    assert counts.sequential == (64, 1024) and counts.reference == (64, 4096) and counts.pixel_sequential == 3072


def test_reference_call_counts_imagenet256():
    # Levels 0 and 1 run (level 2 nodes stubbed, their parent iterations recorded); one level-2 node
    # runs on its own; the sequential counts compose.
    config = shrunk("fractalmar_large_in256")
    model = model_of(config)
    plan = make_plan(model, [3], progress=False)
    top = _Counting(model, plan, stub_level=2)
    with torch.inference_mode():
        top()
    assert top.calls["level", 0] == 64 and len(top.steps["level", 1]) == 1024 and top.calls["level", 1] == 4096
    assert top.calls["guide", 1] == 3 * 256 and len(top.steps["guide", 1]) == 3 * 64
    assert len(top.stubbed) == 256 * 16 and len(set(top.stubbed)) == 1024
    one = _Counting(model, plan)
    with torch.inference_mode():
        one.node(2, torch.zeros(1, 5, 8), torch.zeros(1, dtype=torch.int64), (0, 0), 1.0)
    assert one.calls["level", 2] == 16 and len(one.steps["pixel", 3]) == 16 * 3 and one.calls["guide", 2] == 3
    sequential = (len(top.steps["level", 0]), len(top.steps["level", 1]),
                  len(set(top.stubbed)) * one.calls["level", 2])
    assert sequential == (64, 1024, 16384) == call_counts(config).sequential
    assert len(set(top.stubbed)) * len(one.steps["pixel", 3]) == 49152 == call_counts(config).pixel_sequential


# --- presets ----------------------------------------------------------------------------------------

# Parameter counts of the official builders (LTH14/fractalgen models/fractalgen.py with the README's
# flags), counted with the official code.
OFFICIAL_PARAMETERS = {"fractalar_in64": 442_068_224, "fractalmar_in64": 431_995_648,
                       "fractalmar_base_in256": 186_300_224, "fractalmar_large_in256": 437_000_064,
                       "fractalmar_huge_in256": 849_586_240}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = FractalGen(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL_PARAMETERS[name]
    # The README's 432M for the AR model is the MAR model's figure; its builder has 442.07M (2.3% more).
    tolerance = 0.025 if name == "fractalar_in64" else 0.01
    assert abs(n / PUBLISHED_PARAMETERS[name] - 1) < tolerance


def test_preset_structure():
    h = PRESETS["fractalmar_huge_in256"]
    assert [lv.width for lv in h.levels] + [h.pixel_head.width] == [1280, 640, 320, 64]
    assert [lv.depth for lv in h.levels] + [h.pixel_head.depth] == [40, 10, 5, 1]
    assert [lv.seq_len for lv in h.levels] == [256, 16, 16] and h.num_iters == (64, 16, 16)
    assert [lv.guiding_pixel for lv in h.levels] == [False, True, True] and h.num_conds == 5
    m = PRESETS["fractalmar_in64"]
    assert [lv.seq_len for lv in m.levels] == [256, 16] and m.num_iters == (64, 16) and m.image_size == 64
    assert PRESETS["fractalar_in64"].num_conds == 1 and PRESETS["fractalar_in64"].num_iters == (256, 16)


# --- model ------------------------------------------------------------------------------------------


def test_ar_kv_cached_decoding_equals_full_recompute():
    model = model_of(tiny(("ar", "ar"), num_conds=1))
    level = model.levels[0]
    b, length = 3, level.config.seq_len
    tokens, conds = torch.randn(b, length, level.config.token_dim), torch.randn(b, 1, 16)
    with torch.inference_mode():
        full = level(tokens, conds)[:, :, 0]  # (B, L, D)
        x = level.embed(tokens, conds)
        cache = level.new_cache(b + 2)  # a larger cache serves fewer rows
        one = torch.cat([level.hidden(level.embed(tokens, conds, s, s + 1), cache=cache, pos=s)
                         for s in range(length)], dim=1)
        chunked_cache = level.new_cache(b)
        chunks = torch.cat([level.hidden(x[:, s:s + 5], cache=chunked_cache, pos=s) for s in range(0, length, 5)], 1)
    torch.testing.assert_close(one, full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(chunks, full, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit a KVCache"):
        level.hidden(x[:, :1], cache=level.new_cache(1), pos=0)


def test_pixel_head_kv_cached_decoding_equals_full_recompute():
    head = model_of(tiny()).pixel_head
    cond, ids = torch.randn(5, 8), torch.randint(0, 256, (5, 3))
    with torch.inference_mode():
        full = head(cond, ids)
        cache = head.new_cache(5)
        steps = [head.logits(head.hidden(head.embed(cond, ids, c, c + 1), cache=cache, pos=c)[:, 0], c)
                 for c in range(3)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=2e-5, rtol=1e-5)
    assert full.dtype == torch.float32 and full.shape == (5, 3, 256)


def test_mar_level_hands_children_their_neighbours():
    model = model_of(tiny(("mar", "mar"), (16, 4, 1)))
    level = model.levels[0]  # 4 x 4 tokens
    tokens, masked = torch.randn(2, 16, 48), torch.rand(2, 16) < 0.5
    with torch.inference_mode():
        out = level(tokens, masked, torch.randn(2, 5, 16)).view(2, 4, 4, 5, 16)
    own = out[..., 0, :]
    assert torch.equal(out[:, 1:, :, 1], own[:, :-1]) and not out[:, 0, :, 1].any()  # top
    assert torch.equal(out[:, :, :-1, 2], own[:, :, 1:]) and not out[:, :, -1, 2].any()  # right
    assert torch.equal(out[:, :-1, :, 3], own[:, 1:]) and not out[:, -1, :, 3].any()  # bottom
    assert torch.equal(out[:, :, 1:, 4], own[:, :, :-1]) and not out[:, :, 0, 4].any()  # left


def test_pixel_values_map_back_exactly():
    ids = torch.arange(256)[:, None].expand(-1, 3)
    values = ids_to_values(ids).t().reshape(1, 3, 16, 16)
    assert torch.equal(values_to_uint8(values), ids.t().reshape(1, 3, 16, 16).to(torch.uint8))


# --- keyed RNG --------------------------------------------------------------------------------------


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10.
    c = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    keys = [0, 0xFFFFFFFF_FFFFFFFF, 0x299F31D0_A4093822]
    want = [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
    for row, key, expected in zip(c, keys, want):
        assert rng.philox4x32(row[None], key)[0].tolist() == expected


def test_keyed_numbers_do_not_depend_on_order_or_layout():
    images = torch.tensor([0, 3, 3, 7, 1, 0])
    paths = torch.tensor([5, 5, 6, 1000, 65535, 2 ** 31])
    kw = {"level": 2, "purpose": rng.PIXEL, "count": 7}
    flat = rng.random_bits(42, images, paths, **kw)
    singles = torch.cat([rng.random_bits(42, images[i:i + 1], paths[i:i + 1], **kw) for i in range(6)])
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    shuffled = rng.random_bits(42, images[perm], paths[perm], **kw)
    grid = rng.random_bits(42, images.view(2, 3), paths.view(2, 3), **kw)
    assert torch.equal(flat, singles) and torch.equal(shuffled, flat[perm]) and torch.equal(grid.view(6, 7), flat)
    assert torch.equal(rng.random_bits(42, images, paths, level=2, purpose=rng.PIXEL, count=3), flat[:, :3])
    assert torch.equal(rng.random_bits(42, images[:, None], paths[None, :], **kw)[torch.arange(6), torch.arange(6)],
                       flat)
    # every part of the key matters
    for other in (rng.random_bits(43, images, paths, **kw), rng.random_bits(42, images + 1, paths, **kw),
                  rng.random_bits(42, images, paths + 1, **kw),
                  rng.random_bits(42, images, paths, **{**kw, "level": 1}),
                  rng.random_bits(42, images, paths, **{**kw, "purpose": rng.GUIDE}),
                  rng.random_bits(42, images, paths, step=1, **kw)):
        assert (other != flat).float().mean() > 0.99
    assert flat.min() >= 0 and flat.max() < 2 ** 32
    # pinned: the key layout is part of the samplers' contract (one seed, one image)
    assert rng.random_bits(1234, torch.tensor([3]), torch.tensor([77]), level=2, purpose=rng.PIXEL,
                           count=2).tolist() == PINNED_BITS


PINNED_BITS = [[4246059522, 3406712816]]  # philox4x32_10(counter (3, 77, 2 << 24 | 3 << 16, 0), key 1234)[:2]


def test_keyed_draws_refuse_keys_they_cannot_hold():
    image, path, kw = torch.arange(3), torch.tensor(5), {"level": 1, "purpose": rng.PIXEL}
    for seed in (np.int32(5), np.uint8(5), np.int16(5), np.uint64(5)):  # NumPy seeds: the int's numbers
        assert torch.equal(rng.uniform(seed, image, path, count=2, **kw), rng.uniform(5, image, path, count=2, **kw))
    assert torch.equal(rng.random_bits(7, image.int(), path.to(torch.uint8), count=3, **kw),
                       rng.random_bits(7, image, path, count=3, **kw))
    assert torch.equal(rng.permutation(7, image, path, level=0, length=np.int64(6)),
                       rng.permutation(7, image, path, level=0, length=6))
    assert rng.random_bits(7, image, path, count=np.int64(3), **kw).shape == (3, 3)
    top = torch.tensor([2 ** 32 - 1])
    assert rng.random_bits(7, top, top, count=1, **kw).shape == (1, 1)
    for bad, match in (((torch.tensor([-1]), path), "image values must be in"),
                       ((image, torch.tensor(2 ** 32)), "path values must be in"),
                       ((image.float(), path), "image must be an integer tensor"),
                       ((image, torch.tensor(True)), "path must be an integer tensor"),
                       ((3, path), "image must be an integer tensor")):
        with pytest.raises(ValueError, match=match):
            rng.gumbel(7, *bad, count=4, **kw)
    with pytest.raises(ValueError, match="length must be an integer in"):
        rng.permutation(7, image, path, level=0, length=0)
    with pytest.raises(ValueError, match="count must be an integer in"):
        rng.random_bits(7, image, path, count=0, **kw)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        rng.uniform(np.int64(-1), image, path, count=2, **kw)
    with pytest.raises(ValueError, match="level must be an integer in"):
        rng.purpose_word(256, rng.PIXEL)
    assert rng.purpose_word(np.int64(2), np.uint8(3)) == 2 << 24 | 3 << 16


@pytest.mark.parametrize("per_pass", [1, 5, 192, 1000])
def test_keyed_numbers_do_not_depend_on_the_cpu_passes(monkeypatch, per_pass):
    # A CPU draws in passes of CPU_BLOCKS_PER_PASS Philox blocks (whole keys; 192 blocks a pixel's Gumbel
    # noise): every pass split gives the values of one pass.
    images, paths = torch.arange(40)[:, None], torch.arange(7)[None, :] * 1000
    kw = {"level": 3, "purpose": rng.PIXEL}
    whole = (rng.random_bits(9, images, paths, count=13, **kw), rng.uniform(9, images, paths, count=6, **kw),
             rng.channel_gumbel(9, images, paths, **kw), rng.permutation(9, images, paths, level=1, length=33))
    monkeypatch.setattr(rng, "CPU_BLOCKS_PER_PASS", per_pass)
    passes = (rng.random_bits(9, images, paths, count=13, **kw), rng.uniform(9, images, paths, count=6, **kw),
              rng.channel_gumbel(9, images, paths, **kw), rng.permutation(9, images, paths, level=1, length=33))
    for a, b in zip(whole, passes):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    assert rng.channel_gumbel(9, images[:0], paths, **kw).shape == (0, 7, 3, 256)


def test_keyed_distributions():
    image, path = torch.arange(20000), torch.zeros(1, dtype=torch.int64)
    u = rng.uniform(7, image, path, level=0, purpose=rng.ORDER, count=4)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    g = rng.gumbel(7, image, path, level=0, purpose=rng.PIXEL, count=4).double()
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.var().item() - math.pi ** 2 / 6) < 0.05
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])
    draws = rng.sample_categorical(logits, rng.gumbel(7, image, path, level=0, purpose=rng.PIXEL, count=4))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits.double(), 0), atol=0.012, rtol=0)
    perms = rng.permutation(7, image[:50], path, level=1, length=16)
    assert torch.equal(perms.sort(-1).values, torch.arange(16).expand(50, -1))
    assert torch.equal(rng.permutation(7, image[10:11], path, level=1, length=16), perms[10:11])
    assert len({tuple(p) for p in perms.tolist()}) == 50


def test_guided_logits_follow_the_official_formula():
    cond = torch.tensor([[2.0, 1.0, -30.0, 0.5]])
    uncond = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    assert torch.equal(rng.guided_logits(cond, temperature=1.5), cond * 1.5)
    out = rng.guided_logits(cond, uncond, cfg=4.0, temperature=1.0, filter_threshold=1e-4)
    # value 2 is ruled out by the conditional model: its unconditional logit is raised to
    # max(1, -30 - 2 + 3) = 1 (no change) -> 1 + 4 * (-30 - 1); the others are plain CFG
    expected = uncond + 4.0 * (cond - uncond)
    assert torch.equal(out, expected)
    out = rng.guided_logits(cond, torch.tensor([[0.0, 3.0, -50.0, 0.0]]), cfg=4.0)
    assert out[0, 2] == -29.0 + 4.0 * (-30.0 + 29.0)  # raised to -30 - 2 + 3 = -29


# --- reference sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds,sizes,guiding,num_conds", [
    (("mar", "mar"), (8, 2, 1), False, 5),
    (("ar", "ar"), (8, 2, 1), False, 1),
    (("mar", "mar", "mar"), (8, 4, 2, 1), True, 5),
], ids=["mar", "ar", "mar3-guiding"])
def test_reference_sampler_is_deterministic(kinds, sizes, guiding, num_conds):
    model = model_of(tiny(kinds, sizes, guiding=guiding, num_conds=num_conds))
    kw = {"cfg": 3.0, "temperature": 1.1, "progress": False}
    a = sample(model, [1, 4, 9], seed=5, **kw)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 8, 8)
    assert torch.equal(a, sample(model, torch.tensor([1, 4, 9]), seed=5, **kw))
    assert not torch.equal(a, sample(model, [1, 4, 9], seed=6, **kw))
    # image i depends on its label, i and the seed, not on the rest of the batch
    assert torch.equal(a[:2], sample(model, [1, 4], seed=5, **kw))
    assert not torch.equal(a[0], a[1])


def test_reference_sampler_without_cfg_and_with_a_generator():
    model = model_of(tiny())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample(model, [2, 2], seed=g1, cfg=1.0, progress=False)
    assert torch.equal(a, sample(model, [2, 2], seed=g2, cfg=1.0, progress=False))
    assert not torch.equal(a[0], a[1])  # the image index is part of every key
    # (random weights carry little class signal down the levels: a large scale shows guidance at work)
    assert not torch.equal(sample(model, [2], cfg=1.0, progress=False), sample(model, [2], cfg=500.0, progress=False))
    out = sample(model, 2, num_iter=(2, 4), cfg_schedule="constant", cfg=2.0, progress=True)
    assert out.shape == (1, 3, 8, 8)


def test_reference_sampler_draws_each_key_once():
    model = model_of(tiny(("mar", "mar", "mar"), (8, 4, 2, 1), guiding=True))
    seen = collections.defaultdict(list)
    real = rng._keyed  # every keyed draw (random_bits, uniform, gumbel) goes through it

    def spy(seed, image, path, level, purpose, *args):
        image_b, path_b = torch.broadcast_tensors(image, path)
        for i, p in zip(image_b.flatten().tolist(), path_b.flatten().tolist()):
            seen[level, purpose].append((i, p))
        return real(seed, image, path, level, purpose, *args)

    rng._keyed = spy
    try:
        sample(model, [0, 1], cfg=2.0, progress=False)
    finally:
        rng._keyed = real
    for key, draws in seen.items():
        assert len(draws) == len(set(draws)), key
    # orders: one per node and image; guiding pixels below the top; pixels: every pixel once
    assert sorted(p for i, p in seen[0, rng.ORDER] if i == 1) == [0]
    assert sorted(p for i, p in seen[1, rng.ORDER] if i == 1) == list(range(4))
    assert sorted(p for i, p in seen[2, rng.GUIDE] if i == 1) == list(range(16))
    assert sorted(p for i, p in seen[3, rng.PIXEL] if i == 0) == list(range(64))
    assert (0, rng.GUIDE) not in seen


# --- state dicts ------------------------------------------------------------------------------------


def test_state_dict_round_trip():
    config = tiny(("mar", "mar", "mar"), (8, 4, 2, 1), guiding=True)
    a, b = model_of(config, 0), model_of(config, 1)
    assert not torch.equal(sample(a, [3], progress=False), sample(b, [3], progress=False))
    b.load_state_dict(a.state_dict())
    assert torch.equal(sample(a, [3], cfg=2.0, progress=False), sample(b, [3], cfg=2.0, progress=False))
    keys = set(a.state_dict())
    assert {"class_emb.weight", "fake_latent", "generator.mask_token", "next_fractal.generator.pix_proj.weight",
            "next_fractal.generator.guiding_pixel_loss.r_mlm.bias",
            "next_fractal.next_fractal.next_fractal.b_codebook.weight"} <= keys
    assert not any("rope" in k for k in keys)


@pytest.mark.parametrize("how", ["assign", "to_empty", "parent-assign", "deepcopy"])
def test_every_way_of_building_and_loading_samples_like_the_source(how):
    # Large checkpoints load into models built on the meta device (assign=True, or to_empty() then a load,
    # through the model or a module holding it). The rotary tables are not in the state dict: they must
    # come out right whatever the route.
    import copy

    config = tiny(("ar", "ar"), num_conds=1)
    source = model_of(config)
    sample(source, [1], progress=False)  # a first use (tables made) before a copy is taken
    if how == "deepcopy":
        model = copy.deepcopy(source)
    else:
        with torch.device("meta"):
            model = FractalGen(config)
        if how == "assign":
            model.load_state_dict(source.state_dict(), assign=True)
        elif how == "to_empty":
            model = model.to_empty(device="cpu")
            model.load_state_dict(source.state_dict())
        else:
            parent = torch.nn.ModuleDict({"fractal": model})
            parent.load_state_dict({f"fractal.{k}": v for k, v in source.state_dict().items()}, assign=True)
    for level, want in zip(model.levels, source.levels):
        if hasattr(want, "rope"):
            assert level.rope.device.type == "cpu" and torch.equal(level.rope, want.rope)
    assert torch.equal(sample(model, [3, 5], cfg=2.0, progress=False), sample(source, [3, 5], cfg=2.0, progress=False))


def test_rotary_tables_stay_float32_in_a_low_precision_model():
    # Official: the tables are float32 attributes whatever the weights' dtype; a bf16 table would round angles.
    model = model_of(tiny(("ar", "ar"), num_conds=1)).to(torch.bfloat16)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        wide = FractalGen(tiny(("ar", "ar"), num_conds=1))
    finally:
        torch.set_default_dtype(default)
    assert all(level.rope.dtype == torch.float32 for level in wide.levels)
    for level in model.levels:
        assert level.rope.dtype == torch.float32
        assert torch.equal(level.rope, rope_2d(level.config.grid, level.config.width // level.config.heads))
    assert model.levels[0].patch_emb.weight.dtype == torch.bfloat16
    assert sample(model, [1], cfg=2.0, progress=False).shape == (1, 3, 8, 8)


def test_load_checkpoint_reads_official_and_plain_files(tmp_path):
    import argparse

    model = model_of(tiny())
    sd = model.state_dict()
    official, plain, junk, other = (tmp_path / n for n in ("official.pth", "plain.pt", "junk.pt", "other.pt"))
    torch.save({"model": sd, "model_ema": sd, "args": argparse.Namespace(model="fractalmar_in64", cfg=6.5),
                "epoch": 799}, official)  # util/misc.py save_model's layout
    torch.save(sd, plain)
    junk.write_bytes(b"not a checkpoint")
    torch.save({"weights": [1, 2]}, other)
    for path in (official, plain):
        loaded = load_checkpoint(path)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match=r"junk.pt is not a PyTorch checkpoint of tensors \(not a file torch.save wrote"):
        load_checkpoint(junk)
    with pytest.raises(ValueError, match="without a 'model' state dict of tensors"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth")


def test_state_dict_mistakes_get_a_hint():
    model = model_of(tiny())
    sd = model.state_dict()
    with pytest.raises(ValueError, match="whole checkpoint .* 'model' entry"):
        model.load_state_dict({"model": sd, "epoch": 3})
    with pytest.raises(ValueError, match="'module.' .*DistributedDataParallel"):
        model.load_state_dict({f"module.{k}": v for k, v in sd.items()})
    with pytest.raises(ValueError, match="must be tensors; not tensors: fake_latent"):
        model.load_state_dict({**sd, "fake_latent": [0.0] * 16})


def test_wrong_state_dict_layout_is_a_clear_error():
    model = model_of(tiny())
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "generator.mask_token"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): generator.mask_token"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): generator.extra"):
        model.load_state_dict({**sd, "generator.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"mis-shaped keys .*class_emb.weight: expected \(10, 16\), got \(1000, 16\)"):
        model.load_state_dict({**sd, "class_emb.weight": torch.zeros(1000, 16)})
    ar = model_of(tiny(("ar", "ar"), num_conds=1))
    with pytest.raises(ValueError, match="does not match .*missing keys .*blocks.0.attention.wqkv.weight"):
        ar.load_state_dict(sd)
    model.load_state_dict(missing, strict=False)  # non-strict: missing keys are fine, shapes are not
    with pytest.raises(ValueError, match="mis-shaped"):
        model.load_state_dict({"fake_latent": torch.zeros(2, 16)}, strict=False)


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_sampling_input():
    model = model_of(tiny())
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\).*\[10\]"):
        sample(model, [1, 10], progress=False)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        sample(model, torch.tensor([-1]), progress=False)
    with pytest.raises(ValueError, match="integers"):
        sample(model, [1.5], progress=False)
    with pytest.raises(ValueError, match="cfg must be >= 1"):
        sample(model, [1], cfg=0.5, progress=False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(model, [1], temperature=0, progress=False)
    with pytest.raises(ValueError, match="cfg_schedule"):
        sample(model, [1], cfg_schedule="cosine", progress=False)
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        sample(model, [1], sampler="fast", progress=False)
    with pytest.raises(ValueError, match="num_iter"):
        sample(model, [1], num_iter=(4,), progress=False)
    with pytest.raises(ValueError, match="iterations must be positive"):
        sample(model, [1], num_iter=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        sample(model, [1], seed=-1, progress=False)
    with pytest.raises(ValueError, match="filter_threshold"):
        sample(model, [1], filter_threshold=2.0, progress=False)
    for name, value in (("cfg", float("inf")), ("temperature", float("inf")), ("cfg", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            sample(model, [1], progress=False, **{name: value})
    for huge in (1e39, -1e39):
        with pytest.raises(ValueError, match="within float32's range"):
            sample(model, [1], temperature=huge, progress=False)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\).*\[1180591620717411303424\]"):
        sample(model, [2 ** 70], progress=False)
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
            sample(model, torch.tensor([3, 12], dtype=dtype), progress=False)
    with pytest.raises(ValueError, match="must be an int, a sequence of ints"):
        sample(model, object(), progress=False)
    with pytest.raises(ValueError, match="integers, got dtype torch.float64"):
        sample(model, np.array([1.0, 2.0]), progress=False)
    with pytest.raises(ValueError, match="class_labels must be integers"):
        sample(model, [torch.tensor(1), torch.tensor(1.5)], progress=False)
    mixed = model_of(tiny())
    mixed.class_emb.to(torch.float64)
    with pytest.raises(ValueError, match="share one dtype and device.*torch.float32 on cpu, torch.float64 on cpu"):
        sample(mixed, [1], progress=False)
    with torch.device("meta"):
        meta = FractalGen(tiny())
    with pytest.raises(ValueError, match="meta device"):
        sample(meta, [1], progress=False)


def test_numpy_numbers_are_numbers():
    model = model_of(tiny(("mar", "ar")))
    want = sample(model, [1, 2], cfg=2.0, temperature=1.5, num_iter=2, seed=3, progress=False)
    for labels in (np.array([1, 2]), [np.int64(1), np.int32(2)], torch.tensor([1, 2]), list(torch.tensor([1, 2])),
                   [torch.tensor(1, dtype=torch.uint8), np.array(2)]):
        got = sample(model, labels, cfg=np.float32(2.0), temperature=np.float64(1.5), num_iter=np.int64(2),
                     seed=np.uint32(3), progress=False)
        assert torch.equal(got, want)
    assert torch.equal(sample(model, np.int64(2), seed=3, progress=False), sample(model, 2, seed=3, progress=False))
    per_level = sample(model, [1, 2], cfg=2.0, temperature=1.5, num_iter=np.array([2, 4]), seed=3, progress=False)
    assert torch.equal(per_level, want)  # the AR level makes one iteration per token whatever is asked
    assert torch.equal(sample(model, torch.tensor([1, 2], dtype=torch.uint16), cfg=2.0, temperature=1.5, num_iter=2,
                              seed=3, progress=False), want)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown FractalGen preset 'fractalmar_giant'.*fractalmar_huge_in256"):
        get_config("fractalmar_giant")
    with pytest.raises(ValueError, match="unknown FractalGen preset"):
        FractalGen("nope")
    with pytest.raises(ValueError, match="kind"):
        LevelConfig(kind="diffusion", image_size=8, patch_size=2, width=8, depth=1, heads=2, num_iter=4)
    with pytest.raises(ValueError, match="divide"):
        LevelConfig(kind="mar", image_size=8, patch_size=3, width=8, depth=1, heads=2, num_iter=4)
    with pytest.raises(ValueError, match="RoPE"):
        LevelConfig(kind="ar", image_size=8, patch_size=2, width=12, depth=1, heads=2, num_iter=4)
    with pytest.raises(ValueError, match="unknown LevelConfig option"):
        LevelConfig(kind="mar", image_size=8, patch_size=2, width=8, depth=1, heads=2, num_iter=4, dropout=0.1)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(sizes=(8, 2, 2))
    a, _ = tiny().levels
    with pytest.raises(ValueError, match=r"level 1's image_size \(4\) must be level 0's patch_size \(2\)"):
        FractalConfig(levels=(a, LevelConfig(kind="mar", image_size=4, patch_size=1, width=8, depth=1, heads=2,
                                             num_iter=4)), pixel_head=PixelHeadConfig(width=8, depth=1, heads=2))
    with pytest.raises(ValueError, match="passes 1"):
        tiny(("ar", "mar"), num_conds=5)
    with pytest.raises(ValueError, match="level 0 has no guiding pixel"):
        FractalConfig(levels=(LevelConfig(kind="mar", image_size=2, patch_size=1, width=8, depth=1, heads=2,
                                          num_iter=4, guiding_pixel=True),),
                      pixel_head=PixelHeadConfig(width=8, depth=1, heads=2))
    for bad in (0, 2.0, True, "8"):
        with pytest.raises(ValueError, match=r"PixelHeadConfig.width must be an integer >= 1"):
            PixelHeadConfig(width=bad, depth=1, heads=1)
    # NumPy integers, as everywhere in fastgen, held as Python ints
    level = LevelConfig(kind="mar", image_size=np.int8(8), patch_size=np.int64(2), width=np.uint8(8), depth=1,
                        heads=np.int32(2), num_iter=np.int16(4))
    head = PixelHeadConfig(width=np.int64(8), depth=np.int8(1), heads=2)
    assert level == LevelConfig(kind="mar", image_size=8, patch_size=2, width=8, depth=1, heads=2, num_iter=4)
    assert all(type(getattr(level, f)) is int for f in ("image_size", "patch_size", "width", "heads", "num_iter"))
    assert type(head.width) is int and type(head.depth) is int
    config = FractalConfig(levels=(level, LevelConfig(kind="mar", image_size=2, patch_size=1, width=8, depth=1,
                                                      heads=2, num_iter=4)), pixel_head=head,
                           num_classes=np.int64(10), num_conds=np.int32(5))
    assert type(config.num_classes) is int and type(config.num_conds) is int


def test_fractal_is_a_lazy_submodule():
    assert "fractal" in fastgen.__all__ and fastgen.fractal.sample is sample
