"""KV-Edit on a tiny Flux: the sharp test, background bit-exact, masks, cache options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen import flux_latents as fl
from fastgen.condition import ConditionConfig
from fastgen.condition.branches import BranchState, branch_forward
from fastgen.edit import BackgroundKV, EditConfig, KVEditor, PinnedArena
from helpers import DEVICE
from test_condition import SIDE, _forward_inputs, _image, _rel, _tiny_flux_pipeline


@pytest.fixture(scope="module")
def editor():
    return KVEditor(_tiny_flux_pipeline(), EditConfig(attention_backend="triton", prologue_backend="triton"))


def _prompts():
    g = torch.Generator().manual_seed(11)
    return dict(source_prompt_embeds=torch.randn(1, 7, 32, generator=g).to(DEVICE),
                source_pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(DEVICE),
                target_prompt_embeds=torch.randn(1, 7, 32, generator=g).to(DEVICE),
                target_pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(DEVICE))


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
        state = BranchState.create(model, [], ConditionConfig(attention_backend=backend))
        state.background = bg
        with torch.no_grad():
            bg.begin("capture", 0)
            full = branch_forward(model, state, **inputs).sample
            bg.begin("use", 0, 0.0)
            part = dict(inputs, hidden_states=inputs["hidden_states"][:, fg_idx], img_ids=inputs["img_ids"][fg_idx])
            out = branch_forward(model, state, **part).sample
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
        state = BranchState.create(model, [], ConditionConfig(attention_backend=backend))
        state.token_split = int(fg.sum())
        out = branch_forward(model, state, **dict(inputs, hidden_states=inputs["hidden_states"][:, order],
                                                  img_ids=inputs["img_ids"][order])).sample
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak GPU memory of the offloaded cache needs a CUDA GPU")
def test_offloaded_cache_peak_gpu_memory_does_not_grow_with_steps(editor):
    def peak(steps, **opt):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = editor.edit(_image(), _mask(), num_inference_steps=steps, skip_steps=1, output_type="latent", **opt,
                          **_prompts())
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out

    (short, _), (long, b) = peak(3, cache_device="cpu"), peak(9, cache_device="cpu")
    (dev_short, _), (dev_long, c) = peak(3), peak(9)
    assert torch.equal(b.latents, c.latents), "the offloaded cache is the device cache, moved"
    assert b.stats["max_resident_layers"] <= 2 and b.stats["host_cache_bytes"] >= b.stats["cache_bytes"]
    per_step = c.stats["cache_bytes"] // 8
    assert dev_long - dev_short >= 5 * per_step, "the device cache grows with the steps"
    assert long - short < per_step, f"offloaded: {short} -> {long} bytes of peak GPU memory"


def test_edit_benchmark_suite_reports_every_path(monkeypatch):
    from fastgen import benchmarks as B

    flux = B.DenoiserCase("flux tiny", "FluxTransformer2DModel",
                          dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 6, 6), guidance_embeds=True),
                          B._flux_inputs(1, 16, 8, 16, 32, 32, True))
    case = B.EditCase("flux tiny 64^2, 25% mask", flux, 64, steps=3, skip_steps=1)
    monkeypatch.setattr(B, "edit_cases", lambda device: [case])
    rows = B.run_edits(torch.device("cpu"))
    assert [r.provider for r in rows] == list(B.EDIT_BASELINES) + list(B.EDIT_PATHS)
    by = {r.provider: r for r in rows}
    for path, opts in B.EDIT_PATHS.items():
        e = by[path].extra
        assert e["background_exact"] and e["edited_tokens"] == 4 and e["forwards"] == 4, (path, e)
        assert by[path].speedup == pytest.approx(min(by[b].ms for b in B.EDIT_BASELINES) / by[path].ms)
        if "cache_dtype" in opts:
            assert 0 < by[path].max_diff < 0.5 and e["cache_mb"] < 0.6 * by["kv-edit, device cache"].extra["cache_mb"]
        elif path != "kv-edit, device cache" and not opts.get("inversion_free"):
            assert by[path].max_diff == 0.0, "where the cache lives changes nothing"
    assert by["kv-edit, inversion-free"].extra["inversion_ms"] is None
    table = B.markdown_table(rows, B.environment("cpu"))
    assert "KV-Edit" in table and table.count("| flux tiny 64^2, 25% mask |") == len(rows)
