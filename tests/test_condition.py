"""Image conditions for Flux (OminiControl2): the branch forward against diffusers, cached ==
uncached, per-condition LoRA, compact position ids, fill mode, fp8 cache, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastgen import flux_latents as fl
from fastgen.condition import Condition, ConditionConfig, Fill, FluxConditionPipeline
from fastgen.condition.branches import Branch, BranchState, branch_forward
from helpers import DEVICE

SIDE = 64  # 4 x 4 tokens: Triton's interpreter runs a 2-step generation in about a second


def _tiny_flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from fastgen.models import autoencoder_kl

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=(4, 6, 6), guidance_embeds=True).eval()
    pipe = FluxConditionPipeline(scheduler=FlowMatchEulerDiscreteScheduler(),
                                 vae=autoencoder_kl(4, flux_style=True).eval(), text_encoder=None, tokenizer=None,
                                 text_encoder_2=None, tokenizer_2=None, transformer=tr).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _tiny_flux_pipeline()


def _image(side=SIDE, seed=0):
    return torch.rand(3, side, side, generator=torch.Generator().manual_seed(seed))


def _call(pipe, conditions=(), steps=2, cfg=False, **kw):
    g = torch.Generator("cpu").manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g).to(DEVICE),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(DEVICE))
    if cfg:
        embeds.update(negative_prompt_embeds=torch.randn(1, 7, 32, generator=g).to(DEVICE),
                      negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(DEVICE), true_cfg_scale=2.0)
    for k, v in dict(output_type="latent", height=SIDE, width=SIDE,
                     generator=torch.Generator("cpu").manual_seed(1)).items():
        kw.setdefault(k, v)
    return pipe(conditions=conditions, num_inference_steps=steps, guidance_scale=3.5, **embeds, **kw).images


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


# --------------------------------------------------------------------------------------------
# The branch forward
# --------------------------------------------------------------------------------------------


def _forward_inputs(pipe, batch=2):
    g = torch.Generator().manual_seed(3)
    ids = fl.grid_ids(4, 4, device=DEVICE)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=g).to(DEVICE),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=g).to(DEVICE),
                pooled_projections=torch.randn(batch, 32, generator=g).to(DEVICE),
                timestep=torch.full((batch,), 0.7, device=DEVICE), img_ids=ids, txt_ids=torch.zeros(7, 3, device=DEVICE),
                guidance=torch.full((batch,), 3.5, device=DEVICE))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_zero_conditions_equal_the_plain_flux_forward(pipe, backend):
    model, inputs = pipe.transformer, _forward_inputs(pipe)
    with torch.no_grad():
        ref = model(**inputs).sample
        state = BranchState.create(model, [], ConditionConfig(attention_backend=backend, prologue_backend="triton"))
        out = branch_forward(model, state, **inputs).sample
    assert _rel(out, ref) <= (1e-6 if backend == "sdpa" else 1e-5), _rel(out, ref)


def _branches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 4, 1.0, (0, -4)), (2, 2, 2.0, (0, 0)), (4, 4, 1.0, (0, 4))]
    return [Branch(torch.randn(1, r * c, 16, generator=g).to(DEVICE), fl.grid_ids(r, c, scale=s, delta=d, device=DEVICE),
                   None, [0.0, 0.5, -0.3][i]) for i, (r, c, s, d) in enumerate(shapes[:n])]


@pytest.mark.parametrize("n", [1, 3])
def test_cached_forward_equals_uncached_and_skips_the_branches(pipe, n):
    model, inputs = pipe.transformer, _forward_inputs(pipe)
    with torch.no_grad():
        plain = BranchState.create(model, _branches(n), ConditionConfig(kv_cache=False, attention_backend="triton"))
        cached = BranchState.create(model, _branches(n), ConditionConfig(attention_backend="triton"))
        for step in range(3):
            inputs["timestep"] = torch.full((2,), 0.9 - 0.3 * step, device=DEVICE)
            ref = branch_forward(model, plain, **inputs).sample
            out = branch_forward(model, cached, **inputs).sample
            assert _rel(out, ref) <= 1e-5, f"step {step}: {_rel(out, ref):.2e}"
    assert plain.branch_forwards == 3 and cached.branch_forwards == 1, "steps >= 1 drop the condition branches"
    layers = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(cached.cache) == layers and cached.cache.reads == 2 * layers


def test_conditions_change_the_output_and_bias_weighs_them(pipe):
    model, inputs = pipe.transformer, _forward_inputs(pipe)
    with torch.no_grad():
        none = branch_forward(model, BranchState.create(model, [], ConditionConfig()), **inputs).sample
        one = branch_forward(model, BranchState.create(model, _branches(1), ConditionConfig()), **inputs).sample
        br = _branches(1)
        br[0].bias = -float("inf")  # a condition of scale 0 is no condition
        dropped = branch_forward(model, BranchState.create(model, br, ConditionConfig()), **inputs).sample
    assert _rel(one, none) > 1e-3
    assert _rel(dropped, none) <= 1e-6


def test_asymmetric_conditions_do_not_see_the_image(pipe):
    # A condition's K/V (what the cache holds) must not depend on the image tokens.
    model, inputs = pipe.transformer, _forward_inputs(pipe)
    with torch.no_grad():
        a = BranchState.create(model, _branches(1), ConditionConfig())
        b = BranchState.create(model, _branches(1), ConditionConfig())
        branch_forward(model, a, **inputs)
        inputs["hidden_states"] = inputs["hidden_states"] * -2 + 1
        branch_forward(model, b, **inputs)
    for layer in range(3):
        ka, va = a.cache.segments(layer)[0]
        kb, vb = b.cache.segments(layer)[0]
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_symmetric_conditions_see_the_image(pipe):
    model, inputs = pipe.transformer, _forward_inputs(pipe)
    with torch.no_grad():
        sym = branch_forward(model, BranchState.create(model, _branches(2), ConditionConfig(attention="symmetric")),
                             **inputs).sample
        asym = branch_forward(model, BranchState.create(model, _branches(2), ConditionConfig()), **inputs).sample
    assert _rel(sym, asym) > 1e-4, "symmetric attention lets conditions see text and image: a different model"


# --------------------------------------------------------------------------------------------
# Whole generations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,cfg", [(1, False), (3, False), (1, True), (3, True)])
def test_cached_generation_equals_uncached(pipe, n, cfg):
    conds = [Condition(_image(), position_delta=(0, -4)), Condition(_image(32, seed=1), scale=1.5),
             Condition(_image(seed=2), position_delta=(0, 4), scale=0.7)][:n]
    ref = _call(pipe, conds, cfg=cfg, condition_config=ConditionConfig(kv_cache=False, attention_backend="triton"))
    stats_ref = pipe.last_condition_stats
    out = _call(pipe, conds, cfg=cfg, condition_config=ConditionConfig(attention_backend="triton"))
    stats = pipe.last_condition_stats
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    calls = 2 * (2 if cfg else 1)
    assert stats_ref["branch_forwards"] == calls and stats["branch_forwards"] == 1, (stats_ref, stats)
    assert stats["forwards"] == calls and stats["cache_bytes"] > 0
    assert stats["condition_tokens"] == [16, 4, 16][:n]
    assert pipe.transformer._diffusers_hook.get_hook("fastgen.condition") is None, "the hook goes with the call"


def test_generation_without_conditions_equals_flux_pipeline(pipe):
    from diffusers import FluxPipeline

    plain = FluxPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    ref = _call(_Adapter(plain))
    out = _call(pipe, [])
    assert _rel(out, ref) <= 1e-6


class _Adapter:
    """FluxPipeline called like the condition pipeline (it takes no ``conditions``)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, conditions=(), **kw):
        return self.pipe(**kw)


def test_fp8_cache_is_close_and_smaller(pipe):
    conds = [Condition(_image()), Condition(_image(seed=3))]
    ref = _call(pipe, conds, condition_config=ConditionConfig(attention_backend="triton"))
    full = pipe.last_condition_stats["cache_bytes"]
    out = _call(pipe, conds, condition_config=ConditionConfig(cache_dtype="fp8", attention_backend="triton"))
    small = pipe.last_condition_stats["cache_bytes"]
    # e4m3 keeps 3 mantissa bits: a few percent per element, much less after attention averages
    assert 0 < _rel(out, ref) <= 5e-2, _rel(out, ref)
    assert small < 0.6 * full, (small, full)


# --------------------------------------------------------------------------------------------
# Per-condition LoRA
# --------------------------------------------------------------------------------------------


def _with_lora(pipe, name="cond"):
    from peft import LoraConfig

    tr = pipe.transformer
    if name not in (getattr(tr, "peft_config", None) or {}):
        torch.manual_seed(7)
        tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]),
                       adapter_name=name)
    return tr


def test_condition_lora_applies_to_condition_tokens_only():
    pipe = _tiny_flux_pipeline()
    base = _call(pipe, [Condition(_image())])
    tr = _with_lora(pipe)
    probe, seen = tr.transformer_blocks[0].attn.to_q, []
    handle = probe.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[1], list(m.active_adapters))))
    try:
        ref = _call(pipe, [Condition(_image(), adapter="cond")], condition_config=ConditionConfig(kv_cache=False))
        seen_uncached, seen[:] = list(seen), []
        out = _call(pipe, [Condition(_image(), adapter="cond")])
    finally:
        handle.remove()
    # image tokens (16) run the base weights, the condition's tokens (16, own call) the adapter
    assert {(n, tuple(a)) for n, a in seen_uncached} == {(16, ()), (16, ("cond",))}
    assert [a for _, a in seen] == [[], ["cond"], []], "step 2 runs no condition branch"
    assert _rel(out, ref) <= 1e-5, "cached == uncached with a LoRA on the condition"
    assert _rel(out, base) > 1e-4, "the adapter changes the condition, hence the image"
    assert list(probe.active_adapters) == ["cond"], "the adapters active before are restored"


def test_adapters_no_condition_names_stay_on_the_main_branch():
    pipe = _tiny_flux_pipeline()
    base = _call(pipe, [Condition(_image())])
    tr = _with_lora(pipe, "style")  # loaded and active, named by no condition
    probe, seen = tr.transformer_blocks[0].attn.to_q, []
    handle = probe.register_forward_pre_hook(lambda m, a: seen.append(list(m.active_adapters)))
    try:
        out = _call(pipe, [Condition(_image())], steps=1)
    finally:
        handle.remove()
    assert seen == [["style"], []], "text/image keep the user's adapters; a condition without one runs base weights"
    assert _rel(out, _call(_tiny_flux_pipeline(), [Condition(_image())], steps=1)) > 1e-4
    assert _rel(base, base) == 0


# --------------------------------------------------------------------------------------------
# Compact conditions and fill
# --------------------------------------------------------------------------------------------


def test_compact_condition_ids_are_cell_centres():
    ids = fl.grid_ids(2, 3, scale=2.0, delta=(1, -4))
    assert ids.shape == (6, 3)
    assert torch.equal(ids[:, 0], torch.zeros(6))
    assert torch.equal(ids[:, 1], torch.tensor([0.5, 0.5, 0.5, 2.5, 2.5, 2.5]) + 1)
    assert torch.equal(ids[:, 2], torch.tensor([0.5, 2.5, 4.5] * 2) - 4)
    assert torch.equal(fl.grid_ids(2, 2), torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32))


def test_compact_condition_in_the_pipeline_has_scaled_ids(pipe):
    from fastgen.condition.pipeline import _condition_branch

    br = _condition_branch(pipe, Condition(_image(32), position_delta=(0, -4)), 4, 4, 1, 0)
    assert br.tokens.shape == (1, 4, 16)
    assert torch.equal(br.ids.cpu(), fl.grid_ids(2, 2, scale=2.0, delta=(0, -4)))


def test_token_mask_marks_any_masked_pixel():
    m = np.zeros((64, 64), dtype=np.uint8)
    m[17, 40] = 255  # one pixel in token (1, 2)
    m[60:, :16] = 1  # bottom-left token
    tok = fl.token_mask(m, 64, 64)
    assert tok.shape == (16,) and tok.sum() == 2 and tok[1 * 4 + 2] and tok[3 * 4 + 0]


@pytest.mark.parametrize("holes", ["part", "none", "all"])
def test_fill_writes_known_tokens_back_exactly(pipe, holes):
    image = _image(seed=9)
    mask = torch.zeros(SIDE, SIDE)
    if holes == "part":
        mask[:32, 16:48] = 1  # 2 x 2 tokens
    elif holes == "all":
        mask[:] = 1
    out = _call(pipe, fill=Fill(image, mask))
    known_tokens, _ = fl.encode_image(pipe, image)
    hole = fl.token_mask(mask, SIDE, SIDE)
    assert out.shape == (1, 16, 16)
    assert torch.equal(out[:, ~hole], known_tokens[:, ~hole].to(out.dtype)), "known tokens written back bit-exactly"
    stats = pipe.last_condition_stats
    assert stats["generated_tokens"] == int(hole.sum())
    if holes == "part":
        assert stats["condition_tokens"] == [12] and torch.isfinite(out).all()
        assert not torch.equal(out[:, hole], known_tokens[:, hole].to(out.dtype))


def test_fill_decodes_to_an_image(pipe):
    mask = np.zeros((SIDE, SIDE), dtype=np.float32)
    mask[:16, :16] = 1.0
    img = _call(pipe, fill=Fill(_image(), mask), output_type="np")
    assert img.shape == (1, SIDE, SIDE, 3) and np.isfinite(img).all()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond,match", [
    (lambda: Condition(_image(40)), "multiple of 16"),
    (lambda: Condition(torch.rand(4, 64, 64)), "RGB"),
    (lambda: Condition(torch.rand(3, 64, 32)), "aspect ratios differ"),
    (lambda: Condition(_image(), adapter="missing"), "unknown LoRA adapter"),
])
def test_bad_conditions_raise(pipe, cond, match):
    with pytest.raises(ValueError, match=match):
        _call(pipe, [cond()])


def test_bad_arguments_raise(pipe):
    with pytest.raises(ValueError, match="scale"):
        Condition(_image(), scale=0.0)
    with pytest.raises(ValueError, match="fastgen.Condition"):
        _call(pipe, [_image()])
    with pytest.raises(ValueError, match="mask is 32x32"):
        _call(pipe, fill=Fill(_image(), torch.ones(32, 32)))
    with pytest.raises(ValueError, match="kv_cache needs"):
        ConditionConfig(attention="symmetric", kv_cache=True)
    with pytest.raises(ValueError, match="unknown ConditionConfig"):
        ConditionConfig.build(cache="fp8")
    with pytest.raises(ValueError, match="cache_dtype"):
        ConditionConfig(cache_dtype="int4")


# --------------------------------------------------------------------------------------------
# Symmetric attention: the original OminiControl
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_symmetric_attention_is_ominicontrol_with_its_bias(pipe, backend):
    # OminiControl's reference: one joint sequence [text, image, cond_1, cond_2], every token sees
    # every token, log(scale_c) added to the logits between condition c and the text and image
    # tokens in both directions, none between conditions: diffusers' own forward over the
    # concatenated tokens with that additive mask. Conditions run at timestep 0 and guidance 1,
    # so here the image does too (one embedding for every token, as in a single forward).
    model = pipe.transformer
    scales = (8.0, 0.125)  # large: the bias on condition queries reaches the image through later layers only
    branches = _branches(2)
    for b, s in zip(branches, scales):
        b.bias = float(np.log(s))
    g = torch.Generator().manual_seed(4)
    x, txt = torch.randn(1, 16, 16, generator=g).to(DEVICE), torch.randn(1, 7, 32, generator=g).to(DEVICE)
    common = dict(encoder_hidden_states=txt, pooled_projections=torch.randn(1, 32, generator=g).to(DEVICE),
                  timestep=torch.zeros(1, device=DEVICE), txt_ids=torch.zeros(7, 3, device=DEVICE),
                  guidance=torch.ones(1, device=DEVICE))
    n_cond = [b.tokens.shape[1] for b in branches]
    n_main = 7 + 16

    def bias(both_ways: bool) -> torch.Tensor:
        m = torch.zeros(n_main + sum(n_cond), n_main + sum(n_cond), device=DEVICE)
        start = n_main
        for b, n in zip(branches, n_cond):
            m[:n_main, start : start + n] = b.bias  # text and image queries, condition keys
            if both_ways:
                m[start : start + n, :n_main] = b.bias  # condition queries, text and image keys
            start += n
        return m[None, None]

    joint = dict(common, hidden_states=torch.cat([x] + [b.tokens for b in branches], dim=1),
                 img_ids=torch.cat([fl.grid_ids(4, 4, device=DEVICE)] + [b.ids for b in branches]))
    with torch.no_grad():
        state = BranchState.create(model, branches, ConditionConfig(attention="symmetric", attention_backend=backend))
        out = branch_forward(model, state, **common, hidden_states=x, img_ids=fl.grid_ids(4, 4, device=DEVICE)).sample
        ref = model(**joint, joint_attention_kwargs={"attention_mask": bias(True)}).sample[:, :16]
        one_way = model(**joint, joint_attention_kwargs={"attention_mask": bias(False)}).sample[:, :16]
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    assert _rel(one_way, ref) > 1e-4, "the bias on the condition queries' logits matters: the test can tell"


# --------------------------------------------------------------------------------------------
# The schedule: FluxPipeline's at the output size
# --------------------------------------------------------------------------------------------


def dynamic_scheduler():
    """Flux-dev's scheduler settings: the shift mu depends on the image's token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def _record_forwards(model, seen: list):
    # what a pipeline passes to the transformer at every step (the condition pipeline's hook
    # replaces the forward, but torch's pre-hooks still see the call)
    return model.register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["timestep"].clone(), kw["hidden_states"].clone())), with_kwargs=True)


def test_fill_schedule_and_noise_are_flux_pipeline_at_the_output_size(pipe):
    from diffusers import FluxPipeline

    components = dict(pipe.components, scheduler=dynamic_scheduler())
    plain, fill_pipe = FluxPipeline(**components), FluxConditionPipeline(**components)
    for p in (plain, fill_pipe):
        p.set_progress_bar_config(disable=True)
    mask = torch.zeros(SIDE, SIDE)
    mask[:32, 16:48] = 1  # 4 of 16 tokens
    hole = fl.token_mask(mask, SIDE, SIDE).to(DEVICE)
    ref_seen, seen = [], []
    handle = _record_forwards(pipe.transformer, ref_seen)
    try:
        _call(_Adapter(plain), steps=3)
        ref_sigmas = plain.scheduler.sigmas.clone()
        handle.remove()
        handle = _record_forwards(pipe.transformer, seen)
        out = _call(fill_pipe, fill=Fill(_image(seed=9), mask), steps=3)
    finally:
        handle.remove()
    assert torch.equal(fill_pipe.scheduler.sigmas, ref_sigmas), "the sigmas of a FluxPipeline at 64x64"
    assert len(seen) == len(ref_seen) == 3
    for (t, _), (t_ref, _) in zip(seen, ref_seen):
        assert torch.equal(t, t_ref), "the timesteps it gives the transformer"
    start, start_ref = seen[0][1], ref_seen[0][1]
    assert torch.equal(start[:, hole], start_ref[:, hole]), "the noise it starts from, at the generated tokens"
    known, _ = fl.encode_image(pipe, _image(seed=9))
    assert torch.equal(start[:, ~hole], known[:, ~hole]) and torch.equal(out[:, ~hole], known[:, ~hole])
    assert fill_pipe.last_condition_stats["generated_tokens"] == 4


# --------------------------------------------------------------------------------------------
# Every argument checked before any model runs
# --------------------------------------------------------------------------------------------


class ModelRuns:
    """Counts calls of the transformer (any forward, branch forwards included) and of the VAE encoder."""

    def __init__(self, pipe):
        self.calls = 0

        def count(*_):
            self.calls += 1

        self.handles = [pipe.transformer.x_embedder.register_forward_pre_hook(count),
                        pipe.vae.encoder.register_forward_pre_hook(count)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kw,match", [
    (lambda: dict(fill=Fill(torch.rand(2, 3, SIDE, SIDE), torch.ones(SIDE, SIDE))),
     r"fill.image is a batch of 2 images but the generation makes 1 .*give 1 image$"),
    (lambda: dict(fill=Fill(_image(32), torch.ones(32, 32)), height=SIDE, width=SIDE),
     r"fill.image is 32x32 px but the output is 64x64: give a \(3, 64, 64\) image"),
    (lambda: dict(fill=Fill(_image(), torch.ones(32, 32))), r"fill.mask is 32x32 pixels .*give a \(64, 64\) mask"),
    (lambda: dict(fill=Fill(_image() * 255, torch.ones(SIDE, SIDE))),
     r"fill.image must have values in \[0, 1\], got values in \[.*\] \(0-255 values\? divide by 255\)"),
    (lambda: dict(conditions=[Condition(_image()), Condition(torch.rand(3, 3, SIDE, SIDE))]),
     r"conditions\[1\].image is a batch of 3 images"),
    (lambda: dict(conditions=[Condition(_image()), Condition(_image() * 2 - 1)]),
     r"conditions\[1\].image must have values in \[0, 1\]"),
    (lambda: dict(conditions=[Condition(_image()), Condition(_image(), adapter="missing")]), "unknown LoRA adapter"),
    (lambda: dict(conditions=[Condition(_image())], generator=[torch.Generator()] * 3), "generator is a list of 3"),
    (lambda: dict(conditions=[Condition(_image())], joint_attention_kwargs={"ip_adapter_image_embeds": 0}),
     "not supported with conditions"),
    (lambda: dict(conditions=[Condition(_image(), position_scale=1.0)], height=72),
     "height and width must be multiples of 16"),
    (lambda: dict(fill=Fill(_image(), torch.cat([torch.zeros(16, SIDE), torch.full((48, SIDE), 255.0)]))),
     r"fill.mask is a float mask with values in \[0, 255\]: float masks must be in \[0, 1\]"),
])
def test_bad_arguments_raise_before_any_model_runs(pipe, kw, match):
    # e.g. a fill image batch that does not match the generation's used to fail inside attention
    with ModelRuns(pipe) as runs, pytest.raises(ValueError, match=match):
        _call(pipe, **kw())
    assert runs.calls == 0, "no VAE encode, no transformer forward before the error"


def test_float_images_outside_0_1_raise_and_uint8_is_read_as_0_255(pipe):
    img = _image()
    with pytest.raises(ValueError, match=r"conditions\[0\].image must have values in \[0, 1\]"):
        _call(pipe, [Condition(img * 255)])
    u8 = (img * 255).round().to(torch.uint8)
    a = fl.image_tensor(pipe, u8)
    b = fl.image_tensor(pipe, u8.float() / 255)
    c = fl.image_tensor(pipe, u8.permute(1, 2, 0).numpy())  # (H, W, 3) uint8 array
    assert torch.equal(a, b) and torch.equal(a, c) and a.min() >= -1 and a.max() <= 1


# --------------------------------------------------------------------------------------------
# Pipelines: Flux only, from_pipe, import
# --------------------------------------------------------------------------------------------


def _sd_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from fastgen.models import autoencoder_kl
    from tiny_models import unet

    with warnings.catch_warnings():  # diffusers' deprecation notices about tiny configs (errors where filtered so)
        warnings.simplefilter("ignore")
        return StableDiffusionPipeline(vae=autoencoder_kl(4).eval(), text_encoder=None, tokenizer=None,
                                       unet=unet()[0], scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_non_flux_pipelines_are_refused_naming_what_is_supported():
    from fastgen.condition import generate

    sd = _sd_pipeline()
    for call in (lambda: FluxConditionPipeline.from_pipe(sd), lambda: generate(sd, "a cat", [Condition(_image())])):
        with pytest.raises(ValueError, match=r"only Flux is supported.*FluxTransformer2DModel.*got a "
                                             r"StableDiffusionPipeline with no transformer \(its denoiser is a "
                                             r"UNet2DConditionModel\)"):
            call()


def test_from_pipe_keeps_the_progress_bar_config(pipe):
    from diffusers import FluxPipeline

    plain = FluxPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True, desc="flux")
    cp = FluxConditionPipeline.from_pipe(plain)
    assert cp._progress_bar_config == {"disable": True, "desc": "flux"}
    assert cp._progress_bar_config is not plain._progress_bar_config


def test_importing_conditions_and_kv_edit_prints_nothing():
    # transformers prints torchvision notices when diffusers' pipelines load: fastgen's imports
    # must not load them (the pipeline class loads on first use)
    import subprocess
    import sys

    code = ("import fastgen.condition, fastgen.edit\n"
            "from fastgen.condition import Condition, ConditionConfig, Fill\n"
            "from fastgen.edit import EditConfig, KVEditor\n"
            "import sys; assert 'diffusers.pipelines.flux.pipeline_flux' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


# --------------------------------------------------------------------------------------------
# Cache validity: one generation, keyed on everything that changes the condition K/V
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["joint_attention_kwargs scale", "set_adapters weight"])
def test_cache_refills_when_the_lora_changes_mid_generation(change):
    pipe = _tiny_flux_pipeline()
    tr = _with_lora(pipe)  # "cond": the condition's adapter (text and image never run it)

    def callback(p, i, t, kw):
        if i == 0:
            if change.startswith("joint"):
                p._joint_attention_kwargs["scale"] = 0.5
            else:
                p.transformer.set_adapters(["cond"], weights=[0.5])
        return {}

    def run(config, cb=callback):
        tr.set_adapters(["cond"], weights=[1.0])
        return _call(pipe, [Condition(_image(), adapter="cond")], steps=3, condition_config=config,
                     callback_on_step_end=cb, joint_attention_kwargs={"scale": 1.0})

    ref = run(ConditionConfig(kv_cache=False))
    out = run(ConditionConfig())
    stats = pipe.last_condition_stats
    stale = run(ConditionConfig(), cb=None)  # what a cache filled at step 0 and never refilled serves
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    assert stats["branch_forwards"] == 2 and stats["cache_refills"] == 1, stats
    assert _rel(stale, ref) > 1e-4, "the change matters: a stale cache would be wrong"


def test_cache_neither_serves_nor_stores_when_reuse_is_unsafe(pipe, monkeypatch):
    model, inputs = pipe.transformer, _forward_inputs(pipe)
    state = BranchState.create(model, _branches(1), ConditionConfig())
    with torch.enable_grad():  # autograd on: the branches run, nothing is stored
        branch_forward(model, state, **inputs)
    assert not state.cache.filled and len(state.cache) == 0 and state.branch_forwards == 1
    with torch.no_grad():
        branch_forward(model, state, **inputs)  # fills
        branch_forward(model, state, **inputs)  # serves
        assert state.branch_forwards == 2 and state.cache.reads == 3
        with monkeypatch.context() as m:  # as under torch.compile: no serving, no storing
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            branch_forward(model, state, **inputs)
        assert state.branch_forwards == 3 and state.cache.reads == 3 and state.cache.filled
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # another ambient state: refilled
            out = branch_forward(model, state, **inputs).sample
            ref = branch_forward(model, BranchState.create(model, _branches(1), ConditionConfig(kv_cache=False)),
                                 **inputs).sample
        assert state.branch_forwards == 4 and state.cache.refills == 1
        assert torch.equal(out, ref)
