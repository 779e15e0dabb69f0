"""fastgen.patch over every supported denoiser (one shared tester, tiny configs): patched ==
unpatched within attention tolerance, unpatch bit-exact, idempotent, per-instance, reversible,
composes with LoRA; nested patches and stale handles; shared components; bad input. The caches are
tested in test_generation_cache.py, torch.compile in test_compile.py."""

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
from tiny_models import BUILDERS, run

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
    h3 = fastgen.patch(model, fuse_prologue=False)  # another config goes on top, from the originals
    assert h3.state is not h1.state and len(h3.state.replaced) == n
    assert all(not type(old).__name__.startswith("Fastgen") for _, old, _, _ in h3.state.replaced)
    h2.remove()  # a handle that did not create the patch does not own it
    assert _running_config(model) == h3.config
    h3.remove()  # what was there before comes back
    assert fastgen.is_patched(model) and _running_config(model) == h1.config
    h1.remove()
    assert not fastgen.is_patched(model)
    assert torch.equal(run(model, inputs), ref)


def _running_config(model):
    """The config of the fastgen processors in place in ``model`` (one for all of them)."""
    from fastgen.patching.processors.base import FastgenProcessor

    configs = {m.processor.config for m in model.modules() if isinstance(getattr(m, "processor", None), FastgenProcessor)}
    assert len(configs) == 1, configs
    return configs.pop()


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
# Bad input
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Nested patches, stale handles, shared components
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["model", "pipeline"])
def test_a_context_manager_restores_what_was_there_before(level):
    from fastgen import demo

    pipe, _ = demo.build_pipeline("flux", "tiny")
    target = pipe if level == "pipeline" else pipe.transformer
    outer = fastgen.patch(target)
    with fastgen.patch(target, attention_backend="sdpa") as inner:
        assert inner.owns and _running_config(pipe.transformer).attention_backend == "sdpa"
    assert fastgen.is_patched(target) and _running_config(pipe.transformer) == outer.config
    with fastgen.patch(target) as same:  # already patched so: the block leaves it patched
        assert not same.owns and same.state is outer.state
    assert fastgen.is_patched(target) and _running_config(pipe.transformer) == outer.config
    outer.remove()
    assert not fastgen.is_patched(target) and not fastgen.is_patched(pipe)
    assert "_fastgen_scoped" not in type(pipe).__dict__


def test_a_stale_handle_never_undoes_a_newer_patch():
    model, inputs = BUILDERS["flux"]()
    ref = run(model, inputs)
    h1 = fastgen.patch(model)
    h2 = fastgen.patch(model, fuse_prologue=False)
    h1.remove()  # h1 is beneath h2: h2 stays in force
    assert fastgen.is_patched(model) and _running_config(model) == h2.config
    h2.remove()  # and h1 does not come back
    assert not fastgen.is_patched(model)
    assert torch.equal(run(model, inputs), ref)
    h1.remove()  # removing twice is harmless
    h2.remove()
    assert not fastgen.is_patched(model)


def test_a_model_patch_under_a_pipeline_patch_comes_back():
    from fastgen import demo

    pipe, _ = demo.build_pipeline("flux", "tiny")
    model_level = fastgen.patch(pipe.transformer, attention_backend="sdpa")
    pipe_level = fastgen.patch(pipe)
    assert _running_config(pipe.transformer) == pipe_level.config
    pipe_level.remove()
    assert _running_config(pipe.transformer) == model_level.config
    fastgen.unpatch(pipe)  # everything fastgen put on the models the pipeline runs
    assert not fastgen.is_patched(pipe.transformer)


def test_is_patched_answers_for_the_models_a_pipeline_runs():
    from diffusers import FluxPipeline

    from fastgen import demo

    pipe, _ = demo.build_pipeline("flux", "tiny")
    other = FluxPipeline(**pipe.components)  # shares every model
    assert not fastgen.is_patched(pipe) and not fastgen.is_patched(other)
    with fastgen.patch(pipe.transformer):
        assert fastgen.is_patched(pipe) and fastgen.is_patched(other), "their transformer runs fastgen's processors"
    assert not fastgen.is_patched(pipe) and not fastgen.is_patched(other)
    with fastgen.patch(pipe):
        assert fastgen.is_patched(other)
    assert not fastgen.is_patched(other)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError, match="unknown PatchConfig option.*foo"):
        fastgen.PatchConfig(foo=1)
    with pytest.raises(ValueError, match="positional"):
        fastgen.PatchConfig("auto", True, "auto", True, False, None, None, None, 1)
    model, _ = BUILDERS["flux"]()
    with pytest.raises(ValueError, match="unknown PatchConfig option.*foo"):
        fastgen.patch(model, foo=1)


# --------------------------------------------------------------------------------------------
# Requests that cannot be honoured say so; diffusers' own processor APIs keep working
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [{"attention_backend": "cuda"}, {"attention_backend": "xformers"},
                                    {"prologue_backend": "cuda"}], ids=["attention-cuda", "xformers", "prologue-cuda"])
def test_an_explicit_backend_that_cannot_run_warns_once(option):
    model, inputs = BUILDERS["flux"]()
    ref = run(model, inputs)
    fastgen.patch(model, **option)
    with pytest.warns(FastgenFallbackWarning, match=f"{next(iter(option.items()))[1]}' cannot run on cpu") as rec:
        out = run(model, inputs)
        run(model, inputs)
    assert len([w for w in rec if "cannot run" in str(w.message)]) == 1
    assert (out - ref).abs().max().item() <= TOL


def test_explicit_triton_without_the_interpreter_warns():
    # A CPU without TRITON_INTERPRET: Triton cannot run; the patched model says so once.
    import subprocess
    import sys

    code = ("import sys, warnings; sys.path.insert(0, 'tests'); import torch, fastgen; from tiny_models import flux, run\n"
            "m, x = flux(); ref = run(m, x); fastgen.patch(m, attention_backend='triton')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); out = run(m, x)\n"
            "print([str(i.message) for i in w]); assert (out - ref).abs().max() < 2e-5")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert res.returncode == 0, res.stderr
    assert "attention_backend='triton' cannot run on cpu" in res.stdout and "CUDA device" in res.stdout, res.stdout


def test_set_attention_backend_on_a_patched_model_is_honoured(monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from fastgen.patching.processors.base import FastgenProcessor

    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    model, inputs = BUILDERS["flux"]()
    ref = run(model, inputs)
    fastgen.patch(model, attention_backend="triton", prologue_backend="triton")
    ran = []
    upstream = FastgenProcessor.upstream
    monkeypatch.setattr(FastgenProcessor, "upstream", lambda self, *a, **k: ran.append(1) or upstream(self, *a, **k))
    model.set_attention_backend("native")
    procs = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), FastgenProcessor)]
    assert procs and all(p.original._attention_backend is not None for p in procs)
    out = run(model, inputs)
    assert len(ran) == len(procs), "the chosen diffusers backend runs, in every attention"
    assert (out - ref).abs().max().item() <= TOL
    model.reset_attention_backend()
    ran.clear()
    run(model, inputs)
    assert not ran, "back to fastgen's attention"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_processors_diffusers_recreates_keep_working(name):
    # IP-Adapter load/unload rebuild every processor they do not replace with type(processor)().
    from fastgen.patching.processors.base import FastgenProcessor

    model, inputs = BUILDERS[name]()
    ref = run(model, inputs)
    fastgen.patch(model, attention_backend="triton", prologue_backend="triton")
    attns = {path: m for path, m in model.named_modules() if hasattr(m, "set_processor")}
    procs = {path: m.processor for path, m in attns.items()}
    for path, m in attns.items():  # as diffusers' set_attn_processor does it
        m.set_processor(type(procs[path])())
    assert all(m.processor.state is None for m in attns.values() if isinstance(m.processor, FastgenProcessor))
    assert fastgen.is_patched(model)
    assert (run(model, inputs) - ref).abs().max().item() <= TOL
    fastgen.unpatch(model)
    assert not fastgen.is_patched(model)
    assert not any(isinstance(m.processor, FastgenProcessor) for m in attns.values())
    assert torch.equal(run(model, inputs), ref)
    fresh = [type(p)() for p in procs.values() if isinstance(p, FastgenProcessor)][0]
    assert fresh.config is None and "follows the patch" in repr(fresh)


def _ip_adapter_state_dict(unet, seed=0):
    """IP-Adapter weights for ``unet`` in the layout diffusers loads: a projection of image embeddings
    into 4 tokens, and to_k_ip / to_v_ip per cross-attention, keyed 1, 3, 5, ... in processor order."""
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    adapter, key = {}, 1
    for name, module in ((n, m) for n, m in unet.named_modules() if hasattr(m, "set_processor")):
        if name.endswith("attn2"):
            shape = module.to_k.weight.shape
            adapter[f"{key}.to_k_ip.weight"] = torch.randn(shape, generator=g) * 0.1
            adapter[f"{key}.to_v_ip.weight"] = torch.randn(shape, generator=g) * 0.1
            key += 2
    proj = {"proj.weight": torch.randn(4 * dim, dim, generator=g) * 0.1, "proj.bias": torch.zeros(4 * dim),
            "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    return {"image_proj": proj, "ip_adapter": adapter}


@pytest.mark.parametrize("order", ["patch then load", "load then patch"])
def test_ip_adapter_load_and_unload_on_a_patched_pipeline(order):
    # diffusers re-creates every processor it does not replace with type(processor)() when it loads
    # and unloads an IP-Adapter: that used to raise TypeError on fastgen's processors.
    from fastgen import demo

    (pipe, _), (twin, _) = demo.build_pipeline("sd15", "tiny"), demo.build_pipeline("sd15", "tiny")
    weights = _ip_adapter_state_dict(pipe.unet)
    unet = pipe.unet
    x = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    image = {"image_embeds": [torch.randn(2, 1, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))]}

    def out(p, **kw):
        with torch.no_grad():
            return p.unet(x, 500, encoder_hidden_states=ctx, **kw).sample

    if order == "patch then load":
        fastgen.patch(pipe, attention_backend="triton")
    for p in (pipe, twin):
        p.unet._load_ip_adapter_weights([weights])
    if order == "load then patch":
        with pytest.warns(FastgenFallbackWarning, match="IPAdapterAttnProcessor2_0 alone"):
            fastgen.patch(pipe, attention_backend="triton")
    assert fastgen.is_patched(pipe)
    err = (out(pipe, added_cond_kwargs=image) - out(twin, added_cond_kwargs=image)).abs().max().item()
    assert err <= TOL, f"with the IP-Adapter: {err:.3e}"
    for p in (pipe, twin):
        p.unload_ip_adapter()
    assert fastgen.is_patched(pipe)
    assert (out(pipe) - out(twin)).abs().max().item() <= TOL
    # unloading put fresh AttnProcessor2_0 objects on the cross-attentions: the next generation wraps
    # them again, so the K/V cache works as before
    with fastgen.generation(pipe):
        for _ in range(2):
            assert (out(pipe) - out(twin)).abs().max().item() <= TOL
    from fastgen.patching.patches import top

    assert top(pipe.unet).state.kv_cache.hits > 0
    assert all(type(m.processor).__name__.startswith("Fastgen") for n, m in pipe.unet.named_modules()
               if n.endswith("attn2"))
    fastgen.unpatch(pipe)
    assert not fastgen.is_patched(pipe)
    assert torch.equal(out(pipe), out(twin))


def test_set_default_attn_processor_on_a_patched_model():
    # diffusers' method refuses processors that are not its own classes: fastgen steps aside first
    from fastgen import demo

    (pipe, _), (twin, _) = demo.build_pipeline("sd15", "tiny"), demo.build_pipeline("sd15", "tiny")
    fastgen.patch(pipe, include_vae=True)
    for p in (pipe, twin):
        p.unet.set_default_attn_processor()
        p.vae.set_default_attn_processor()
    assert not fastgen.is_patched(pipe.unet) and not fastgen.is_patched(pipe.vae)
    assert "set_default_attn_processor" not in vars(pipe.unet)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 8, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, 500, ctx).sample, twin.unet(x, 500, ctx).sample)


def test_fuse_unpatch_unfuse_leaves_nothing_of_fastgen_running():
    # diffusers' unfuse_qkv_projections puts back the processors it saw when fusing: fastgen's, of a
    # patch removed since then; they run upstream's code.
    model, inputs = BUILDERS["unet"]()
    twin = copy.deepcopy(model)
    fastgen.patch(model, attention_backend="triton")
    for m in (model, twin):
        m.fuse_qkv_projections()
    fastgen.unpatch(model)
    for m in (model, twin):
        m.unfuse_qkv_projections()
    assert not fastgen.is_patched(model)
    assert torch.equal(run(model, inputs), run(twin, inputs))


def test_every_denoiser_of_a_pipeline_is_patched():
    # Wan 2.2 runs two experts (transformer, transformer_2)
    from diffusers import WanPipeline

    from fastgen import demo

    pipe, _ = demo.build_pipeline("wan", "tiny")
    two = WanPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                      transformer_2=copy.deepcopy(pipe.transformer), scheduler=pipe.scheduler, boundary_ratio=0.5)
    handle = fastgen.patch(two)
    assert fastgen.is_patched(two.transformer) and fastgen.is_patched(two.transformer_2)
    assert len(handle.state.model_patches) == 2
    handle.remove()
    assert not fastgen.is_patched(two.transformer_2)


def test_repatching_pipelines_that_share_a_model_stacks_nothing():
    from diffusers import StableDiffusionImg2ImgPipeline

    from fastgen import demo
    from fastgen.patching.patches import top

    pipe, _ = demo.build_pipeline("sd15", "tiny")
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    for _ in range(3):
        fastgen.patch(pipe)
        fastgen.patch(img2img)
    depth, mp = 0, top(pipe.unet)
    while mp is not None:
        depth, mp = depth + 1, mp.below
    assert depth == 1, "one patch on the shared UNet, whoever asked for it"
    assert fastgen.is_patched(img2img) and "_fastgen_scoped" in type(img2img).__dict__
    fastgen.unpatch(pipe)
    assert not fastgen.is_patched(img2img), "patching is per model: the UNet's patch is gone for both"


def test_patched_pipelines_and_models_pickle_and_deepcopy():
    import pickle

    from fastgen import demo

    pipe, call = demo.build_pipeline("sd15", "tiny")
    fastgen.patch(pipe)
    again = pickle.loads(pickle.dumps(pipe))
    assert type(again) is type(pipe).__bases__[0], "pickled as its own class"
    unet = pickle.loads(pickle.dumps(pipe.unet))
    assert fastgen.is_patched(unet)
    copied = copy.deepcopy(pipe.unet)
    from fastgen.patching.patches import top

    assert top(copied).state.pipeline in (None, pipe), "a model's copy does not copy the pipeline it came from"
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 8, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = pipe.unet(x, 500, ctx).sample
        assert torch.equal(unet(x, 500, ctx).sample, ref) and torch.equal(copied(x, 500, ctx).sample, ref)


def test_unpatch_and_patch_say_what_they_take():
    with pytest.raises(ValueError, match="pipeline or a model"):
        fastgen.unpatch("x")
    model, _ = BUILDERS["flux"]()
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match="patch the model before compiling"):
        fastgen.patch(compiled)

    class Pipe:  # a pipeline whose denoiser was replaced by a compiled wrapper
        def __init__(self):
            self.transformer = compiled
            self.components = {"transformer": compiled}

    with pytest.raises(ValueError, match="patch the model before compiling"):
        fastgen.patch(Pipe())


def test_include_vae_says_when_the_vae_is_not_patched():
    from fastgen import demo

    pipe, _ = demo.build_pipeline("wan", "tiny")
    with pytest.warns(FastgenFallbackWarning, match="AutoencoderKLWan alone"):
        fastgen.patch(pipe, include_vae=True)
    assert not fastgen.is_patched(pipe.vae) and fastgen.is_patched(pipe.transformer)
