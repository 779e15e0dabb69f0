"""fastgen.patch over every supported denoiser (one shared tester, tiny configs): patched ==
unpatched within attention tolerance, unpatch bit-exact, idempotent, per-instance, reversible,
composes with LoRA and torch.compile; cross-attention K/V cache hits and misses; bad input."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import fastgen
from fastgen import FastgenFallbackWarning
from helpers import DEVICE
from offload_sim import MetaParams
from tiny_models import BUILDERS, CROSS, run

# Patched outputs may differ from upstream only by attention/prologue rounding (fp32 here).
TOL = 2e-5


@pytest.fixture(scope="module", params=list(BUILDERS))
def _built(request):
    model, inputs = BUILDERS[request.param]()
    return request.param, model, inputs, run(model, inputs)


@pytest.fixture
def tiny(_built):
    """(name, model, inputs, unpatched output) of each supported denoiser; unpatched after the test."""
    yield _built
    fastgen.unpatch(_built[1])


@pytest.mark.parametrize("backends", [{}, {"attention_backend": "triton", "prologue_backend": "triton"},
                                      {"attention_backend": "triton", "fuse_prologue": False}],
                         ids=["auto", "triton", "triton-unfused"])
def test_patched_matches_unpatched(tiny, backends):
    name, model, inputs, ref = tiny
    handle = fastgen.patch(model, **backends)
    assert handle.state.replaced, f"{name}: nothing was patched"
    out = run(model, inputs)
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= TOL, f"{name} {backends}: max difference {err:.3e}"
    if not backends and DEVICE.type == "cpu":
        # no fastgen kernel runs on a CPU by default: upstream's own code runs (the K/V cache aside)
        assert torch.equal(out, ref), f"{name}: default patching on a CPU must not change a bit"


def test_unpatch_restores_bit_identical_outputs(tiny):
    name, model, inputs, ref = tiny
    originals = {path: module.processor for path, module in model.named_modules() if hasattr(module, "set_processor")}
    fastgen.patch(model, attention_backend="triton")
    run(model, inputs)
    fastgen.unpatch(model)
    assert not fastgen.is_patched(model)
    now = {path: module.processor for path, module in model.named_modules() if hasattr(module, "set_processor")}
    assert all(now[p] is originals[p] for p in originals), "the original processor objects are back"
    assert not any("Fastgen" in type(m).__name__ for m in model.modules())
    assert not any("forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for m in model.modules()), "no hook residue"
    assert torch.equal(run(model, inputs), ref)


def test_patch_is_idempotent_and_tells_the_truth(tiny):
    name, model, inputs, ref = tiny
    assert not fastgen.is_patched(model)
    h1 = fastgen.patch(model)
    n = len(h1.state.replaced)
    h2 = fastgen.patch(model)
    assert h2.state is h1.state and len(h2.state.replaced) == n, "same config: same patch"
    assert fastgen.is_patched(model)
    assert "Fastgen" in str(model) and "wraps=" in str(model), "print(model) shows what was patched"
    h3 = fastgen.patch(model, fuse_prologue=False)  # another config re-patches from the originals
    assert h3.state is not h1.state and len(h3.state.replaced) == n
    assert all(not type(old).__name__.startswith("Fastgen") for _, old, _, _ in h3.state.replaced)
    h3.remove()
    assert not fastgen.is_patched(model)
    assert torch.equal(run(model, inputs), ref)


def test_context_manager_restores(tiny):
    name, model, inputs, ref = tiny
    with fastgen.patch(model) as h:
        assert fastgen.is_patched(model) and h.config.fuse_prologue
        run(model, inputs)
    assert not fastgen.is_patched(model)
    assert torch.equal(run(model, inputs), ref)


def test_other_instances_are_untouched(tiny):
    name, model, inputs, ref = tiny
    other = copy.deepcopy(model)
    before = {p: type(m.processor) for p, m in other.named_modules() if hasattr(m, "set_processor")}
    fastgen.patch(model, attention_backend="triton")
    after = {p: type(m.processor) for p, m in other.named_modules() if hasattr(m, "set_processor")}
    assert before == after and not fastgen.is_patched(other)
    assert torch.equal(run(other, inputs), ref), "an unpatched twin computes exactly as before"


def test_user_processor_is_left_alone_with_one_warning():
    # e.g. an IP-Adapter processor: fastgen does not accelerate it, says so once, leaves it running
    from diffusers.models.attention_processor import AttnProcessor

    model, inputs = BUILDERS["unet"]()
    ref = run(model, inputs)
    target = next(m for p, m in model.named_modules() if p.endswith("attn2"))
    keep = target.processor
    target.set_processor(AttnProcessor())
    with pytest.warns(FastgenFallbackWarning, match="AttnProcessor alone") as rec:
        h = fastgen.patch(model)
    assert len([w for w in rec if "alone" in str(w.message)]) == 1
    assert type(target.processor) is AttnProcessor and fastgen.is_patched(model)
    assert (run(model, inputs) - ref).abs().max().item() <= TOL
    h.remove()
    assert type(target.processor) is AttnProcessor
    target.set_processor(keep)
    assert torch.equal(run(model, inputs), ref)


# --------------------------------------------------------------------------------------------
# LoRA (through diffusers/PEFT), before and after patching
# --------------------------------------------------------------------------------------------


def _add_lora(model, seed=0):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False),
                      adapter_name="style")


@pytest.mark.parametrize("when", ["before", "after"])
def test_lora_changes_output_exactly_as_unpatched(tiny, when):
    name, _, inputs, ref = tiny
    model, _ = BUILDERS[name]()
    torch.manual_seed(1)
    _add_lora(model)
    with_lora = run(model, inputs)
    assert (with_lora - ref).abs().max().item() > 1e-3, "the LoRA must change the output"
    if when == "after":
        model, _ = BUILDERS[name]()
        fastgen.patch(model, attention_backend="triton")
        torch.manual_seed(1)
        _add_lora(model)
    else:
        fastgen.patch(model, attention_backend="triton")
    assert fastgen.is_patched(model)
    err = (run(model, inputs) - with_lora).abs().max().item()
    assert err <= TOL, f"{name}: LoRA {when} patching differs by {err:.3e}"
    fastgen.unpatch(model)
    assert torch.equal(run(model, inputs), with_lora)


# --------------------------------------------------------------------------------------------
# Cross-attention K/V cache (UNet, Wan)
# --------------------------------------------------------------------------------------------


def _cache_run(name):
    model, inputs = BUILDERS[name]()
    ref = run(model, inputs)
    handle = fastgen.patch(model)
    return model, inputs, ref, handle.state.kv_cache


@pytest.mark.parametrize("name", list(CROSS))
def test_cross_attention_kv_hits_on_later_steps(name):
    model, inputs, ref, cache = _cache_run(name)
    n_cross = sum(1 for p, _ in model.named_modules() if p.endswith("attn2"))
    out1 = run(model, inputs)
    n = cache.misses
    assert cache.hits == 0 and n >= n_cross, "step 1 computes every cross-attention K/V"
    for step in range(2, 4):
        out = run(model, inputs)
        assert (cache.hits, cache.misses) == ((step - 1) * n, n), f"step {step} reuses all"
        assert torch.equal(out, out1), "a cached K/V gives the very same output"
    assert (out1 - ref).abs().max().item() <= TOL
    assert cache.nbytes() > 0


@pytest.mark.parametrize("change", ["new prompt", "new batch", "in-place edit", "new lora"])
@pytest.mark.parametrize("name", list(CROSS))
def test_cross_attention_kv_misses_when_anything_changes(name, change):
    model, inputs, ref, cache = _cache_run(name)
    run(model, inputs)
    n = cache.misses
    key = CROSS[name]
    inputs = dict(inputs)
    if change == "new prompt":
        inputs[key] = inputs[key].clone() * -1
    elif change == "new batch":
        inputs = {k: torch.cat([v, v[:1]]) if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items()}
    elif change == "in-place edit":
        inputs[key].mul_(0.5)
    else:
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=2, target_modules=["to_k"], init_lora_weights=False), adapter_name="a")
    out = run(model, inputs)
    expected = n if change != "new lora" else sum(1 for p, _ in model.named_modules() if p.endswith("attn2"))
    assert cache.misses == n + expected, f"{change}: every affected K/V must recompute"
    fastgen.unpatch(model)
    assert torch.equal(out, run(model, inputs)), f"{change}: the patched output equals the unpatched one"


@pytest.mark.parametrize("name", list(CROSS))
def test_cache_is_freed_on_unpatch_and_when_the_prompt_dies(name):
    model, inputs, ref, cache = _cache_run(name)
    key = CROSS[name]
    ctx = inputs.pop(key).clone()
    run(model, dict(inputs, **{key: ctx}))
    assert len(cache) > 0
    shape = ctx.shape
    del ctx
    assert len(cache) == 0, "entries die with their embeddings"
    ctx2 = torch.randn(shape, device=DEVICE)
    run(model, dict(inputs, **{key: ctx2}))
    assert len(cache) > 0
    fastgen.unpatch(model)
    assert len(cache) == 0


# --------------------------------------------------------------------------------------------
# torch.compile, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_of_a_patched_model():
    model, inputs = BUILDERS["flux"]()
    ref = run(model, inputs)
    fastgen.patch(model, attention_backend="triton", prologue_backend="triton")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(**inputs, return_dict=False)[0]
    assert (out - ref).abs().max().item() <= TOL


def test_unsupported_targets_name_the_supported_ones():
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        fastgen.patch(torch.nn.Linear(2, 2))

    class FakePipeline:
        components = {"transformer": torch.nn.Linear(2, 2)}
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=re.escape("does not support FakePipeline")):
        fastgen.patch(FakePipeline())


def test_bad_options_say_what_is_allowed(tiny):
    _, model, _, _ = tiny
    with pytest.raises(ValueError, match="unknown PatchConfig option.*the options are"):
        fastgen.patch(model, tome_ratio=0.5)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        fastgen.patch(model, attention_backend="flash9")
    with pytest.raises(ValueError, match="must be True or False"):
        fastgen.patch(model, fuse_prologue="yes")
    with pytest.raises(ValueError, match="config must be a fastgen.PatchConfig"):
        fastgen.patch(model, config={"fuse_prologue": True})
    assert not fastgen.is_patched(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastgen.patch(model, fastgen.PatchConfig(fuse_prologue=False), attention_backend="sdpa")
    assert fastgen.is_patched(model)


# --------------------------------------------------------------------------------------------
# HunyuanVideo: text padding as per-batch key lengths
# --------------------------------------------------------------------------------------------


def test_prefix_key_lengths_accepts_only_prefix_masks():
    from fastgen.patching.core import prefix_key_lengths

    lengths = torch.tensor([5, 3])
    mask = (torch.arange(6)[None] < lengths[:, None]).view(2, 1, 1, 6)
    assert prefix_key_lengths(mask, 2, 6) == [5, 3]
    assert prefix_key_lengths(torch.ones(2, 1, 1, 6, dtype=torch.bool), 2, 6) is None, "all valid: no mask"
    holes = mask.clone()
    holes[0, 0, 0, 1] = False
    assert prefix_key_lengths(holes, 2, 6) is False, "a hole is not a prefix: upstream handles it"
    assert prefix_key_lengths(mask.float(), 2, 6) is False, "additive masks go upstream"
    assert prefix_key_lengths(mask.expand(2, 1, 6, 6), 2, 6) is False, "square masks go upstream"
    empty = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    assert prefix_key_lengths(empty, 2, 6) is False


@pytest.mark.parametrize("name", ["hunyuan", "framepack"])
def test_hunyuan_padding_runs_fastgen_path(name, monkeypatch):
    from fastgen.patching.processors.base import FastgenProcessor

    model, inputs = BUILDERS[name]()
    ref = run(model, inputs)
    deferred = []
    upstream = FastgenProcessor.upstream
    monkeypatch.setattr(FastgenProcessor, "upstream",
                        lambda self, *a, **k: deferred.append(type(self).__name__) or upstream(self, *a, **k))
    fastgen.patch(model, attention_backend="triton", prologue_backend="triton")
    out = run(model, inputs)
    assert inputs["encoder_attention_mask"].min() == 0, "the case must have padding"
    assert deferred == ["FastgenAttnProcessor"] * len(deferred) and len(deferred) == 1, \
        f"only the token refiner (square mask) may defer to upstream, got {deferred}"
    assert (out - ref).abs().max().item() <= TOL


_QK_NORM = re.compile(r"norm_(added_)?[qk]$")


def _offload_norm_weights(model):
    """What accelerate's sequential offload does to a module: its weights live on the meta device
    and a pre-forward hook puts real ones in place only while it runs. Applied to every QK norm.
    Returns a function that removes the hooks and puts the real weights back."""
    handles, offloaded = [], []
    for name, module in model.named_modules():
        if not _QK_NORM.search(name) or getattr(module, "weight", None) is None:
            continue
        params = MetaParams(module, ["weight"])
        handles += [module.register_forward_pre_hook(lambda m, args, p=params: p.put(m, True)),
                    module.register_forward_hook(lambda m, args, out, p=params: p.put(m, False))]
        params.put(module, False)
        offloaded.append((module, params))

    def restore():
        for h in handles:
            h.remove()
        for m, params in offloaded:
            params.put(m, True)

    return restore, len(offloaded)


@pytest.mark.parametrize("name", ["flux", "sd35", "wan", "hunyuan", "framepack"])
def test_norms_whose_weights_a_hook_places_are_called_not_read(name):
    # Reading a hooked norm's weight directly would hand the fused kernel a meta tensor (or, under
    # leaf-level group offload, one still in flight on the onload stream): fastgen calls the module.
    model, inputs = BUILDERS[name]()
    ref = run(model, inputs)
    restore, n = _offload_norm_weights(model)
    try:
        assert n >= 2, f"{name}: expected QK norms to offload"
        assert all(m.weight.is_meta for p, m in model.named_modules() if _QK_NORM.search(p) and m.weight is not None)
        with fastgen.patch(model, attention_backend="triton", prologue_backend="triton"):
            out = run(model, inputs)
    finally:
        restore()
    err = (out - ref).abs().max().item()
    assert err <= TOL, f"{name}: max difference {err:.3e}"
