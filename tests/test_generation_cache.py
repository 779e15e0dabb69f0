"""Step-invariant caches live inside one generation and key on every ambient state.

Every patched call is compared with an unpatched twin of the model (same weights, same state):
caches must never serve K/V that belong to another prompt, batch, autocast dtype, grad or
inference mode, LoRA scale or adapter, or weights. Covered at model level (with and without
``fastgen.generation``) and at pipeline level, on every model with such a cache (UNet and Wan
cross-attention, Wan's prompt/image projections and I2V joined context, HunyuanVideo's key lengths).
"""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch

import fastgen
from helpers import DEVICE
from tiny_models import BUILDERS, CROSS, EXTRA, run

TOL = 2e-5
BUILD = {**BUILDERS, **EXTRA}


def _twins(name, lora=False):
    """(patched model, unpatched twin, inputs): the same weights (and adapters) in both."""
    model, inputs = BUILD[name]()
    if lora:
        _add_adapters(model, name)
    twin = copy.deepcopy(model)
    fastgen.patch(model)
    return model, twin, inputs


def _cache(model):
    from fastgen.patching.patches import top

    return top(model).state.kv_cache


def _err(out, ref) -> float:
    return (out.double() - ref.double()).abs().max().item() / max(1.0, ref.double().abs().max().item())


# --------------------------------------------------------------------------------------------
# The generation scope
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CROSS))
def test_no_reuse_outside_a_generation(name):
    model, twin, inputs = _twins(name)
    cache = _cache(model)
    for _ in range(2):
        assert torch.equal(run(model, inputs), run(twin, inputs)), "outside a generation upstream runs, bit for bit"
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


@pytest.mark.parametrize("name", list(CROSS))
def test_reuse_inside_a_generation_is_exact(name):
    model, twin, inputs = _twins(name)
    cache, ref = _cache(model), run(twin, inputs)
    with fastgen.generation(model):
        out = run(model, inputs)
        first = cache.misses
        assert cache.hits == 0 and first >= 2, "step 1 computes every step-invariant result"
        for step in range(2, 5):
            out = run(model, inputs)
            assert (cache.hits, cache.misses) == ((step - 1) * first, first), f"step {step} reuses them all"
            assert _err(out, ref) <= TOL
    assert len(cache) == 0, "the generation's entries end with it"


def test_wan_i2v_joins_its_context_once_per_generation():
    # diffusers concatenates [image, text] anew at every step: without the joined-context hook every
    # step's cross-attention saw a new tensor and missed (4 misses per step on this model).
    model, twin, inputs = _twins("wan_i2v")
    cache, ref = _cache(model), run(twin, inputs)
    n_layers = len(model.blocks)
    with fastgen.generation(model):
        run(model, inputs)
        assert cache.misses == 3 + 2 * n_layers, "text, image, joined context, and text+image K/V per layer"
        misses = cache.misses
        for _ in range(3):
            assert _err(run(model, inputs), ref) <= TOL
        assert cache.misses == misses


@pytest.mark.parametrize("name", list(CROSS))
def test_entries_die_with_their_inputs_and_on_unpatch(name):
    model, twin, inputs = _twins(name)
    cache, key = _cache(model), CROSS[name]
    with fastgen.generation(model):
        ctx = inputs.pop(key).clone()
        run(model, dict(inputs, **{key: ctx}))
        assert len(cache) > 0
        shape = ctx.shape
        del ctx
        # every entry computed from the text dies with it (I2V's image projection has its own input)
        assert len(cache) == (1 if name == "wan_i2v" else 0), "entries die with their embeddings"
        ctx = torch.randn(shape, device=DEVICE)
        run(model, dict(inputs, **{key: ctx}))
        assert len(cache) > 0
        fastgen.unpatch(model)
        assert len(cache) == 0


def test_scopes_nest_and_end_with_exceptions():
    model, twin, inputs = _twins("unet")
    cache = _cache(model)
    with pytest.raises(RuntimeError, match="user error"):
        with fastgen.generation(model):
            run(model, inputs)
            with fastgen.generation(model):
                run(model, inputs)
            assert len(cache) > 0, "the inner scope does not end the outer generation"
            raise RuntimeError("user error")
    assert not cache.open and len(cache) == 0
    with pytest.raises(ValueError, match="pipeline or a model"):
        with fastgen.generation("a model"):
            pass
    with fastgen.generation(copy.deepcopy(twin)):  # an unpatched model: nothing to scope
        run(twin, inputs)


@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_a_pipeline_call_is_one_generation(family):
    from fastgen import demo

    pipe, call = demo.build_pipeline(family, "tiny")
    pipe.set_progress_bar_config(disable=True)
    ref = _latents(pipe, call)
    name = type(pipe).__name__
    handle = fastgen.patch(pipe)
    cache = handle.state.kv_cache
    assert type(pipe).__name__ == name and isinstance(pipe, type(pipe).__bases__[0])
    out = _latents(pipe, call)
    assert cache.hits > 0 and len(cache) == 0 and not cache.open, "reused within the call, dropped at its end"
    assert _err(out, ref) <= TOL

    def boom(*args, **kwargs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _latents(pipe, call, callback_on_step_end=boom)
    assert not cache.open and len(cache) == 0, "an exception ends the generation too"
    handle.remove()
    assert "_fastgen_scoped" not in type(pipe).__dict__, "unpatch gives the pipeline its own class back"
    assert torch.equal(_latents(pipe, call), ref)


def _latents(pipe, call, steps=3, **kwargs):
    from fastgen import demo

    return demo.pipeline_output(pipe(**call, num_inference_steps=steps, output_type="latent",
                                     generator=torch.Generator("cpu").manual_seed(0), **kwargs))


# --------------------------------------------------------------------------------------------
# Each failure the review reproduced, on every model with the cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scoped", [False, True], ids=["model", "generation"])
@pytest.mark.parametrize("name", list(CROSS) + ["hunyuan", "framepack"])
def test_inference_mode(name, scoped):
    # Inference tensors keep no version counter: reading it used to raise.
    model, twin, inputs = _twins(name)
    if name in ("hunyuan", "framepack"):  # the key-length cache runs on the kernel path
        fastgen.patch(model, attention_backend="triton", prologue_backend="triton")
    with torch.inference_mode():
        inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}  # inference tensors
        ref = run(twin, inputs)
        with fastgen.generation(model) if scoped else contextlib.nullcontext():
            for _ in range(2):
                assert _err(run(model, inputs), ref) <= TOL


@pytest.mark.parametrize("family", ["sd15", "wan", "hunyuan"])
def test_inference_mode_pipeline(family):
    from fastgen import demo

    pipe, call = demo.build_pipeline(family, "tiny")
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ref = _latents(pipe, call)
        with fastgen.patch(pipe, attention_backend="triton", prologue_backend="triton"):
            out = _latents(pipe, call)
    assert _err(out, ref) <= 1e-4


AUTOCAST_NOTICE = "ignore:Mismatch dtype between input and weight:UserWarning"  # torch's, under CPU autocast


@pytest.mark.filterwarnings(AUTOCAST_NOTICE)
@pytest.mark.parametrize("name", list(CROSS))
def test_autocast_dtype_is_in_the_key(name):
    model, twin, inputs = _twins(name)
    with fastgen.generation(model):
        for dtype in (None, torch.bfloat16, torch.float16, None, torch.bfloat16):
            ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                ref, out = run(twin, inputs), run(model, inputs)
            assert out.dtype == ref.dtype
            assert _err(out, ref) <= (TOL if dtype is None else 2e-2), f"autocast {dtype}"


@pytest.mark.parametrize("name", list(CROSS))
def test_lora_scale_of_children_is_in_the_key(name):
    # Wan: a LoRA on condition_embedder.text_embedder.linear_1 (a child of the hooked module); UNet
    # and Wan: LoRA on the K/V projections. The scale changes between calls on the same prompt.
    model, twin, inputs = _twins(name, lora=True)
    with fastgen.generation(model):
        for scale in (1.0, 0.3, 0.0, 1.0):
            kw = _scale_kwargs(name, scale)
            ref, out = run(twin, dict(inputs, **kw)), run(model, dict(inputs, **kw))
            assert _err(out, ref) <= TOL, f"scale {scale}: {_err(out, ref):.3e}"


def test_writes_behind_the_version_counter_between_generations():
    # A UI overwriting the prompt embeddings through .data (no version bump) between calls: each call
    # is its own generation, so the new prompt is seen.
    from fastgen import demo

    pipe, call = demo.build_pipeline("sd15", "tiny")
    pipe.set_progress_bar_config(disable=True)
    call = dict(call, prompt_embeds=call["prompt_embeds"].clone())
    other = torch.randn_like(call["prompt_embeds"])
    ref_a = _latents(pipe, call, steps=2)
    ref_b = _latents(pipe, dict(call, prompt_embeds=other), steps=2)
    with fastgen.patch(pipe):
        assert _err(_latents(pipe, call, steps=2), ref_a) <= TOL
        call["prompt_embeds"].data.copy_(other)
        assert _err(_latents(pipe, call, steps=2), ref_b) <= TOL, "the old prompt's K/V were served"
    model, twin, inputs = _twins("unet")  # model level, no generation: never reused
    run(model, inputs)
    key = CROSS["unet"]
    inputs[key].data.copy_(torch.randn_like(inputs[key]))
    assert torch.equal(run(model, inputs), run(twin, inputs))


def test_cuda_graph_capture_neither_serves_nor_stores(monkeypatch):
    import fastgen._validity as validity

    model, twin, inputs = _twins("unet")
    cache = _cache(model)
    key = CROSS["unet"]
    with fastgen.generation(model):
        run(model, inputs)  # warm-up: fills the cache
        hits, misses, entries = cache.hits, cache.misses, len(cache)
        monkeypatch.setattr(validity, "capturing", lambda: True)
        # a write the key cannot see: only a capture that computes afresh gets the new prompt right
        inputs[key].data.copy_(torch.randn_like(inputs[key]))
        out = run(model, inputs)
        assert (cache.hits, cache.misses, len(cache)) == (hits, misses, entries), "capture must compute afresh"
        monkeypatch.setattr(validity, "capturing", lambda: False)
    assert _err(out, run(twin, inputs)) <= TOL


@pytest.mark.gpu
def test_cuda_graph_replay_follows_the_static_prompt():
    model, twin, inputs = _twins("unet")
    key = CROSS["unet"]
    static = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad(), fastgen.generation(model):
        run(model, static)  # warm-up fills the cache; capture must not hit it
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(model, static)
        new = torch.randn_like(static[key])
        static[key].copy_(new)
        graph.replay()
        torch.cuda.synchronize()
    assert _err(out, run(twin, dict(inputs, **{key: new}))) <= 1e-4


# --------------------------------------------------------------------------------------------
# Grad mode: a patched model must not break a training step
# --------------------------------------------------------------------------------------------


def _loss(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    return out.float().pow(2).mean()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("name", list(CROSS))
def test_training_steps_match_unpatched(name, checkpointing):
    model, twin, inputs = _twins(name)
    for m in (model, twin):
        m.train()
        if checkpointing:
            m.enable_gradient_checkpointing()
    with fastgen.generation(model):  # even inside a generation, autograd on means no reuse
        for _ in range(2):  # two forward/backward passes over one fixed prompt batch
            grads = []
            for m in (model, twin):
                m.zero_grad()
                _loss(m, inputs).backward()
                grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            assert grads[0].keys() == grads[1].keys() and grads[0]
            for n in grads[1]:
                assert _err(grads[0][n], grads[1][n]) <= 1e-4, n
    assert _cache(model).hits == 0


# --------------------------------------------------------------------------------------------
# The randomized property test: interleaved state changes, every call against the twin
# --------------------------------------------------------------------------------------------


def _add_adapters(model, name):
    import warnings

    from peft import LoraConfig

    targets = ["to_k", "to_v"] + (["linear_1"] if name.startswith("wan") else [])
    torch.manual_seed(7)
    for adapter in ("a", "b"):
        with warnings.catch_warnings():  # PEFT's notice that a second adapter joins the first: intended
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False),
                              adapter_name=adapter)
    model.set_adapters(["a", "b"], [1.0, 0.5])


def _scale_kwargs(name, scale):
    return {"cross_attention_kwargs" if name == "unet" else "attention_kwargs": {"scale": scale}}


def _random_state_change(rng, name, inputs, models, ambient):
    """One change (or none, half the time, so that steps can reuse) to the inputs, the adapters
    of both models, or the ambient state (LoRA scale, autocast dtype, grad/inference mode)."""
    key = CROSS[name]
    change = rng.choice(["none"] * 8 + ["prompt", "batch", "in-place", "adapters", "disable", "enable", "scale",
                                        "autocast", "mode"])
    if change == "prompt":
        inputs[key] = torch.randn_like(inputs[key])
    elif change == "batch":
        n = rng.choice([1, 2, 3])
        for k, v in list(inputs.items()):
            if torch.is_tensor(v) and v.dim() and v.shape[0] != n:
                inputs[k] = torch.cat([v[:1]] * n)
    elif change == "in-place":
        with torch.no_grad():
            inputs[key].mul_(0.9)
    elif change == "adapters":
        choice, weight = rng.choice([["a"], ["b"], ["a", "b"]]), rng.choice([1.0, 0.5])
        for m in models:
            m.set_adapters(choice, [weight] * len(choice))
    elif change == "disable":
        for m in models:
            m.disable_adapters()
    elif change == "enable":
        for m in models:
            m.enable_adapters()
    elif change == "scale":
        ambient["scale"] = rng.choice([None, 1.0, 0.3, 0.0])
    elif change == "autocast":
        ambient["dtype"] = rng.choice([None, torch.bfloat16, torch.float16])
    elif change == "mode":
        ambient["mode"] = rng.choice(["no_grad", "inference_mode"])
    return change


@pytest.mark.filterwarnings(AUTOCAST_NOTICE)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CROSS))
def test_random_interleavings_match_unpatched(name, seed):
    rng = random.Random(seed)
    model, twin, inputs = _twins(name, lora=True)
    key = CROSS[name]
    ambient = {"scale": None, "dtype": None, "mode": "no_grad"}
    history = []
    for generation in range(3):
        with fastgen.generation(model):
            for _ in range(8):
                history.append(_random_state_change(rng, name, inputs, (model, twin), ambient))
                kw = _scale_kwargs(name, ambient["scale"]) if ambient["scale"] is not None else {}
                grad = torch.no_grad() if ambient["mode"] == "no_grad" else torch.inference_mode()
                dtype = ambient["dtype"]
                amp = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
                with grad, amp:
                    ref = twin(**inputs, **kw, return_dict=False)[0]
                    out = model(**inputs, **kw, return_dict=False)[0]
                assert _err(out, ref) <= (TOL if dtype is None else 2e-2), f"after {history} with {ambient}"
        # between generations, a write behind PyTorch's back is allowed
        inputs[key].data.copy_(torch.randn_like(inputs[key]))
    assert _cache(model).hits > 0, "reuse happened somewhere in the interleaving"


# --------------------------------------------------------------------------------------------
# The same at pipeline level: each call one generation, states changing between calls
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(AUTOCAST_NOTICE)
@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_pipeline_calls_interleaved_with_state_changes(family):
    from fastgen import demo

    (pipe, call), (twin, _) = demo.build_pipeline(family, "tiny"), demo.build_pipeline(family, "tiny")
    for p in (pipe, twin):
        p.set_progress_bar_config(disable=True)
        _add_adapters(p.unet if family == "sd15" else p.transformer, "unet" if family == "sd15" else "wan")
    fastgen.patch(pipe)
    scale_arg = "cross_attention_kwargs" if family == "sd15" else "attention_kwargs"
    call = dict(call, prompt_embeds=call["prompt_embeds"].clone())
    states = [
        dict(mode=torch.no_grad, dtype=None, scale=1.0),
        dict(mode=torch.inference_mode, dtype=None, scale=0.3),
        dict(mode=torch.no_grad, dtype=torch.bfloat16, scale=0.3, data_edit=True),
        dict(mode=torch.inference_mode, dtype=torch.float16, scale=1.0),
        dict(mode=torch.no_grad, dtype=None, scale=0.0, data_edit=True),
    ]
    for s in states:
        if s.get("data_edit"):  # behind the version counter, between calls
            call["prompt_embeds"].data.copy_(torch.randn_like(call["prompt_embeds"]))
        if family == "sd15":  # its pipeline scales the (absent) text encoder too: weigh the adapters instead
            for p in (pipe, twin):
                p.unet.set_adapters(["a", "b"], [s["scale"], 0.5])
            kw = {}
        else:
            kw = {scale_arg: {"scale": s["scale"]}}
        amp = torch.autocast("cpu", dtype=s["dtype"]) if s["dtype"] else contextlib.nullcontext()
        with s["mode"](), amp:
            ref = _latents(twin, call, steps=2, **kw)
            out = _latents(pipe, call, steps=2, **kw)
        assert _err(out, ref) <= (TOL if s["dtype"] is None else 5e-2), f"{s}: {_err(out, ref):.3e}"
    assert _cache(pipe.unet if family == "sd15" else pipe.transformer).hits > 0


# --------------------------------------------------------------------------------------------
# Found in review: writes a key cannot see, parameters replaced, ambient switches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_callback_rewriting_the_prompt_in_place_under_inference_mode(family):
    # Under inference mode the prompt embeddings keep no version counter: an in-place rewrite by a
    # step callback is invisible to a key, so entries computed from such tensors go after callbacks.
    from fastgen import demo

    (pipe, call), (twin, _) = demo.build_pipeline(family, "tiny"), demo.build_pipeline(family, "tiny")
    other = torch.randn(call["prompt_embeds"].shape, generator=torch.Generator().manual_seed(5))

    def run_with_callback(p):
        def rewrite(_pipe, i, t, kw):
            if i == 1:
                kw["prompt_embeds"].copy_(other)
            return {}

        p.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            c = dict(call, prompt_embeds=call["prompt_embeds"].clone())
            return _latents(p, c, steps=4, callback_on_step_end=rewrite,
                            callback_on_step_end_tensor_inputs=["prompt_embeds"])

    ref = run_with_callback(twin)
    fastgen.patch(pipe)
    assert _err(run_with_callback(pipe), ref) <= TOL


def test_ambient_key_holds_autocast_of_every_device_type_and_tf32():
    from fastgen._validity import AUTOCAST_DEVICE_TYPES, ambient_key

    assert {"cpu", "cuda", "mps", "xpu"} <= set(AUTOCAST_DEVICE_TYPES)
    base = ambient_key()
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not before
        assert ambient_key() != base
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "highest")
        assert ambient_key() != base
    finally:
        torch.set_float32_matmul_precision(precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ambient_key() != base
    assert ambient_key() == base
