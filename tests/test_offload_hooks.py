"""Conditions and KV-Edit run Flux through fastgen's branch forward, not ``transformer(...)`` or
``block(...)``: the offloading hooks wrapping those forwards must still run around it.

Offloading is simulated (tests/offload_sim.py) by hooks that keep parameters on the meta device
except while they run (accelerate's hook on the transformer, as
``enable_model_cpu_offload`` installs one; diffusers registry hooks on every block, as block-level
group offloading does). A forward that skipped a hook would meet meta tensors and fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from fastgen.condition import Condition, ConditionConfig
from fastgen._hooks import call_as_forward
from fastgen.edit import KVEditor
from helpers import DEVICE
from offload_sim import MetaParams
from test_condition import SIDE, _call, _image, _tiny_flux_pipeline
from test_edit import _mask, _prompts

BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


class _DiffusersOffload(ModelHook):
    def __init__(self, params: MetaParams):
        super().__init__()
        self.params = params

    def pre_forward(self, module, *args, **kwargs):
        self.params.put(module, True)
        return args, kwargs

    def post_forward(self, module, output):
        self.params.put(module, False)
        return output


def _offload(pipe):
    """Meta-offload the transformer's own modules (accelerate hook) and each block (diffusers hooks);
    the VAE gets a plain accelerate hook, as model offload gives every component one (pipelines
    take their execution device from them). Returns (restore, root counter, block counters)."""
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    class Placed(AccelerateHook):
        execution_device = DEVICE  # where pipelines put latents (accelerate's offload hooks say so)

    transformer = pipe.transformer
    add_hook_to_module(pipe.vae, Placed())

    root = MetaParams(transformer, [n for n, _ in transformer.named_parameters() if not n.startswith(BLOCKS)])

    class RootOffload(Placed):
        def pre_forward(self, module, *args, **kwargs):
            root.put(module, True)
            return args, kwargs

        def post_forward(self, module, output):
            root.put(module, False)
            return output

    add_hook_to_module(transformer, RootOffload())
    blocks = []
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        params = MetaParams(block, [n for n, _ in block.named_parameters()])
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_DiffusersOffload(params), "meta_offload")
        blocks.append((block, params))
    root.put(transformer, False)
    for block, params in blocks:
        params.put(block, False)

    def restore():
        remove_hook_from_module(pipe.vae)
        remove_hook_from_module(transformer)
        root.put(transformer, True)
        for block, params in blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook("meta_offload", recurse=False)
            params.put(block, True)

    return restore, root, [p for _, p in blocks]


def _all_meta(transformer) -> bool:
    return all(p.is_meta for p in transformer.parameters())


@pytest.mark.parametrize("cache", [True, False], ids=["kv-cache", "no-cache"])
def test_conditions_run_inside_the_offload_hooks(cache):
    pipe = _tiny_flux_pipeline()
    config = ConditionConfig(kv_cache=cache)  # kernels do not matter here (and are slow interpreted)
    conds = [Condition(_image(seed=4)), Condition(_image(SIDE // 2, seed=5), position_delta=(0, 4))]
    ref = _call(pipe, conds, steps=3, condition_config=config)
    restore, root, blocks = _offload(pipe)
    try:
        assert _all_meta(pipe.transformer)
        out = _call(pipe, conds, steps=3, condition_config=config)
        assert _all_meta(pipe.transformer), "every hook's post-forward ran"
        assert root.loads == 3 and all(b.loads == 3 for b in blocks), "one load per forward, every block"
        # the cache key is stable under offload (new meta parameters per call): filled once, then served
        assert pipe.last_condition_stats["branch_forwards"] == (1 if cache else 3), pipe.last_condition_stats
    finally:
        restore()
    assert torch.equal(out, ref)


def test_kv_edit_runs_inside_the_offload_hooks():
    editor = KVEditor(_tiny_flux_pipeline())
    kw = dict(num_inference_steps=4, skip_steps=1, output_type="latent", **_prompts())
    ref = editor.edit(_image(), _mask(), **kw).latents
    free = editor.edit(_image(), _mask(), inversion_free=True, generator=torch.Generator().manual_seed(3), **kw)
    restore, root, _ = _offload(editor.pipe)
    try:
        out = editor.edit(_image(), _mask(), **kw).latents
        out_free = editor.edit(_image(), _mask(), inversion_free=True, generator=torch.Generator().manual_seed(3), **kw)
        assert _all_meta(editor.pipe.transformer)
        assert root.loads == 3 + 3 + 2 * 3, "inversion, edit, inversion-free: a load per forward"
        # one inversion, two edits: the hooks make new parameters at every load, the state key holds
        src = {k: v for k, v in kw.items() if not k.startswith("target") and k != "output_type"}
        tar = {k: v for k, v in kw.items() if k.startswith("target")}
        with editor.invert(_image(), _mask(), **src) as inv:
            twice = [editor.denoise(inv, output_type="latent", **tar).latents for _ in range(2)]
    finally:
        restore()
    assert torch.equal(out, ref) and torch.equal(out_free.latents, free.latents)
    assert torch.equal(twice[0], ref) and torch.equal(twice[1], ref)


def test_conditions_compose_with_diffusers_block_level_group_offload():
    pipe = _tiny_flux_pipeline()
    conds = [Condition(_image(seed=4))]
    ref = _call(pipe, conds, steps=2)
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    out = _call(pipe, conds, steps=2)
    assert torch.equal(out, ref)


def test_forward_replacing_hooks_raise_instead_of_being_skipped():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = _tiny_flux_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match="replaces its forward.*disable_cache"):
        _call(pipe, [Condition(_image(seed=4))], steps=2)
    pipe.transformer.disable_cache()
    assert np.isfinite(_call(pipe, [Condition(_image(seed=4))], steps=2).cpu().numpy()).all()


def test_call_as_forward_runs_hooks_outermost_first():
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module

    calls = []

    class Tag(ModelHook):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def pre_forward(self, module, *args, **kwargs):
            calls.append(f"pre {self.tag}")
            return tuple(a + 1 for a in args), kwargs

        def post_forward(self, module, output):
            calls.append(f"post {self.tag}")
            return output * 10

    class Acc(AccelerateHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append("pre accelerate")
            return args, kwargs

    m = torch.nn.Linear(1, 1)
    add_hook_to_module(m, Acc())
    reg = HookRegistry.check_if_exists_or_initialize(m)
    for tag in ("inner", "outer", "own"):
        reg.register_hook(Tag(tag), tag)
    out = call_as_forward(m, lambda x: x, 1, skip="own")
    assert out == (1 + 2) * 100, "fn sees the inputs the pre-hooks moved; its output goes through the post-hooks"
    assert calls == ["pre outer", "pre inner", "pre accelerate", "post inner", "post outer"]


@pytest.mark.parametrize("what", ["conditions", "kv-edit"])
def test_compose_with_enable_model_cpu_offload(what):
    # The real accelerate hooks (on a GPU they move each model there and back; on a CPU they run
    # the same chain with cpu as the execution device).
    pipe = _tiny_flux_pipeline()
    if what == "conditions":
        run = lambda: _call(pipe, [Condition(_image(seed=4))], steps=2).cpu()  # noqa: E731
    else:
        editor = KVEditor(pipe)
        run = lambda: editor.edit(_image(), _mask(), num_inference_steps=3, skip_steps=1,  # noqa: E731
                                  output_type="latent", **_prompts()).latents.cpu()
    ref = run()
    pipe.enable_model_cpu_offload(device=DEVICE.type)
    out = run()
    if DEVICE.type == "cuda":
        assert next(pipe.transformer.parameters()).device.type == "cpu", "offloaded again after the call"
    assert torch.equal(out, ref)
