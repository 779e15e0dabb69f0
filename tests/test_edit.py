"""KV-Edit on a tiny Flux: the sharp test, background bit-exact, masks, cache options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen import flux_latents as fl
from fastgen.condition import ConditionConfig
from fastgen.condition.branches import BranchState, branch_forward
from fastgen.edit import BackgroundKV, KVEditor
from helpers import DEVICE
from test_condition import SIDE, _forward_inputs, _image, _rel, _tiny_flux_pipeline


@pytest.fixture(scope="module")
def editor():
    return KVEditor(_tiny_flux_pipeline(), ConditionConfig(attention_backend="triton", prologue_backend="triton"))


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
        bg = BackgroundKV(bg_idx, torch.device("meta") if offload else DEVICE, DEVICE)
        if offload:  # the offload path, storage == compute on a CPU: copies, prefetch, residency
            bg.storage = DEVICE
            bg.offload = True
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
        layers = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        assert len(bg._entries) == layers


def test_attn_scale_changes_the_foreground(editor):
    a = editor.edit(_image(), _mask(), num_inference_steps=3, skip_steps=1, output_type="latent", **_prompts())
    b = editor.edit(_image(), _mask(), num_inference_steps=3, skip_steps=1, attn_scale=0.0, output_type="latent",
                    **_prompts())
    assert _rel(a.latents, b.latents) > 1e-5


@pytest.mark.parametrize("variant", ["inversion", "re_init", "inversion_free"])
def test_background_is_bit_exact_after_an_edit(editor, variant):
    kw = dict(re_init=variant == "re_init", inversion_free=variant == "inversion_free",
              generator=torch.Generator().manual_seed(3))
    out = editor.edit(_image(), _mask(), num_inference_steps=4, skip_steps=1, output_type="latent", **kw, **_prompts())
    x0, _ = fl.encode_image(editor.pipe, _image())
    fg = fl.token_mask(_mask(), SIDE, SIDE)
    assert torch.equal(out.latents[:, ~fg], x0[:, ~fg]), "background latents copied from the source"
    assert not torch.equal(out.latents[:, fg], x0[:, fg]) and torch.isfinite(out.latents).all()
    steps = 3
    assert out.stats["forwards"] == 2 * steps, out.stats  # inversion + edit, or source + target per step
    per_layer = 12 * 2 * 16 * 2 * 4  # 12 background tokens, 2 heads x 16, k and v, fp32
    assert out.stats["cache_bytes"] == (1 if variant == "inversion_free" else steps) * 3 * per_layer


def test_empty_mask_returns_the_input(editor):
    img = _image()
    out = editor.edit(img, np.zeros((SIDE, SIDE)), output_type="pt", **_prompts())
    assert out.stats["forwards"] == 0
    assert torch.allclose(out.images[0].cpu(), img, atol=1e-6)


def test_full_mask_edits_everything(editor):
    out = editor.edit(_image(), _mask("full"), num_inference_steps=3, skip_steps=1, output_type="np", **_prompts())
    assert out.images.shape == (1, SIDE, SIDE, 3) and np.isfinite(out.images).all()
    assert out.stats["edited_tokens"] == 16


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
    with pytest.raises(ValueError, match="source_prompt"):
        editor.edit(_image(), _mask())
