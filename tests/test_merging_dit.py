"""Token merging in DiTs through ``fastgen.patch(..., tome=, todo=)`` (Flux, SD3 / SD3.5, Wan, HunyuanVideo
and FramePack): a measured, bounded change of the output; the merged attention equals a reference built
from diffusers' own projections, norms and RoPE; text never merged; the report names the blocks; ratio 0
and steps outside the schedule run the plain patch exactly; seeded maps; unpatch bit-exact."""

import warnings

import pytest
import torch

import fastgen
from fastgen._warnings import reset_warnings
from fastgen.merging import ToDoConfig, ToMeConfig
from fastgen.merging import dit
from fastgen.merging.matching import merge, unmerge
from fastgen.merging.unet import downsample_tokens
from fastgen.models import build_pipeline, tiny_denoiser
from fastgen.patching.config import PatchConfig
from fastgen.patching.core import REDUCTION, TokenGroup, joint_attention
from fastgen.patching.registry import architecture_of

torch.set_num_threads(2)

MODELS = ("flux", "sd3", "sd35", "wan", "hunyuan", "framepack")
CONFIGS = {"tome0.3": dict(tome=ToMeConfig(0.3, use_rand=False)), "tome0.5": dict(tome=ToMeConfig(0.5, use_rand=False)),
           "tome0.7": dict(tome=ToMeConfig(0.7, use_rand=False)), "todo2avg": dict(todo=ToDoConfig(2, method="avg")),
           "todo2nearest": dict(todo=ToDoConfig(2))}
BLOCKS = {"flux": ["transformer_blocks.0", "single_transformer_blocks.0"],
          "sd3": ["transformer_blocks.0", "transformer_blocks.1"],
          "sd35": ["transformer_blocks.0", "transformer_blocks.1"],  # block 0: attn and its dual attn2
          "wan": ["blocks.0", "blocks.1"],  # attn1 only: attn2 attends the text
          "hunyuan": ["transformer_blocks.0", "single_transformer_blocks.0"],  # never the text refiner
          "framepack": ["transformer_blocks.0", "single_transformer_blocks.0"]}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=MODELS)
def built(request):
    """(name, model, inputs, unpatched output, output with the merged attentions' outputs zeroed)."""
    model, inputs = tiny_denoiser(request.param)
    ref = run(model, inputs)
    handles = [attn.register_forward_hook(_zero_output)
               for _, _, attn in dit.merging_attentions(model, architecture_of(model))]
    no_attention = run(model, inputs)
    for h in handles:
        h.remove()
    assert torch.equal(run(model, inputs), ref)
    yield request.param, model, inputs, ref, no_attention
    fastgen.unpatch(model)


def _zero_output(module, args, out):
    if isinstance(out, tuple):
        return tuple(None if o is None else torch.zeros_like(o) for o in out)
    return torch.zeros_like(out)


def test_merging_changes_the_output_by_a_bounded_measured_amount(built):
    """Bound: merging approximates the self-attention, so the output must stay closer to the exact one
    than it is with those attentions' outputs dropped altogether (measured 0.02-0.11 on these models;
    merging 0.003-0.094, the module docstring's table); ToMe deviates more as the ratio grows."""
    name, model, inputs, ref, no_attention = built
    bound = rel(no_attention, ref)
    devs = {}
    for key, config in CONFIGS.items():
        with fastgen.patch(model, **config):
            out = run(model, inputs)
        devs[key] = rel(out, ref)
        assert torch.isfinite(out).all()
        assert 1e-4 < devs[key] < bound, (name, key, devs[key], bound)
    assert devs["tome0.3"] <= devs["tome0.5"] <= devs["tome0.7"], devs
    assert torch.equal(run(model, inputs), ref), "unpatch is bit-exact"
    assert not any(m._forward_pre_hooks or m._forward_hooks or REDUCTION in m.__dict__ for m in model.modules())


def test_report_names_the_merging_blocks(built):
    name, model, inputs, ref, _ = built
    cls = type(model).__name__
    with fastgen.patch(model, tome=0.5) as handle:
        assert handle.merging == f"{cls}: 2 block(s) at level 1 (ToMe 0.5 in attention)"
        mp = handle.state.model_patches[0]
        assert [path for path, _, _ in mp.merging.rows] == BLOCKS[name]
        assert {level for _, level, _ in mp.merging.rows} == {1}
    with fastgen.patch(model, tome=ToMeConfig(0.5, use_rand=False), todo=ToDoConfig(2, method="avg")) as handle:
        assert handle.merging == f"{cls}: 2 block(s) at level 1 (ToMe 0.5 in attention, ToDo x2 K/V)"
        both = run(model, inputs)
    assert torch.isfinite(both).all() and not torch.equal(both, ref)


def test_ratio_zero_and_no_merging_part_equal_the_plain_patch(built):
    name, model, inputs, ref, _ = built
    with fastgen.patch(model):
        plain = run(model, inputs)
    with fastgen.patch(model, tome=ToMeConfig(0.0)) as handle:
        assert handle.merging.endswith("no block merges or downsamples tokens")
        assert torch.equal(run(model, inputs), plain)
    reset_warnings()  # SD3 and SD3.5 share a class: said once per class and config
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with fastgen.patch(model, tome=ToMeConfig(0.5, merge_attn=False)):
            assert torch.equal(run(model, inputs), plain)
    assert any("merges nothing" in str(w.message) for w in seen)


def test_seeded_maps_are_reproducible_and_the_seed_matters(built):
    name, model, inputs, ref, _ = built
    outs = []
    for seed in (1, 1, 2):
        with fastgen.patch(model, tome=ToMeConfig(0.5, seed=seed)):
            outs.append(run(model, inputs))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_text_and_other_tokens_are_never_merged(built, monkeypatch):
    """The matching covers exactly the grid's tokens: the last F*H*W of each merging attention's
    hidden_states (Flux single-stream: after the text; FramePack: after clean and history tokens)."""
    name, model, inputs, ref, _ = built
    seen = []
    real = dit.bipartite_match

    def spy(metric, h, w, *args, **kwargs):
        seen.append((metric.shape[1], h * w))
        return real(metric, h, w, *args, **kwargs)

    inputs_seen = []

    def record(module, args, kwargs):
        inputs_seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    monkeypatch.setattr(dit, "bipartite_match", spy)
    hooks = [attn.register_forward_pre_hook(record, with_kwargs=True)
             for _, _, attn in dit.merging_attentions(model, architecture_of(model))]
    try:
        with fastgen.patch(model, tome=ToMeConfig(0.5, use_rand=False)) as handle:
            run(model, inputs)
            grid = handle.state.model_patches[0].merging.size
    finally:
        for h in hooks:
            h.remove()
    n = grid[0] * grid[1] * grid[2]
    assert len(seen) == len(inputs_seen) > 0
    assert all(tokens == cells == n for tokens, cells in seen)
    expected_grid = {"flux": (1, 4, 4), "sd3": (1, 6, 6), "sd35": (1, 6, 6), "wan": (2, 2, 2), "hunyuan": (2, 4, 4),
                     "framepack": (2, 4, 4)}[name]
    assert grid == expected_grid
    if name == "flux":
        assert inputs_seen == [16, 16 + 7]  # the double block's image stream; the single block's [text, image]
    if name == "framepack":
        assert all(s > n for s in inputs_seen)  # clean and history tokens ahead of the noisy ones stay whole


def _flux_reference(attn, hidden, text, rope, red):
    """FluxAttnProcessor's computation with ``red``'s merging of the image tokens after RoPE, written
    from diffusers' pieces and fastgen's reference merge / unmerge."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden, text)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if text is not None:
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        q, k = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1)
        v = torch.cat([ev, v], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    start = q.shape[1] - (red.stop - red.start)
    m = red.matching

    def merged(t):  # (B, S, H, D): text whole, image merged
        img = merge(t[:, start:].flatten(2), m, backend="torch").unflatten(-1, (-1, attn.head_dim))
        return torch.cat([t[:, :start], img], 1).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(merged(q), merged(k), merged(v)).transpose(1, 2).flatten(2)
    out = torch.cat([out[:, :start], unmerge(out[:, start:], m, backend="torch")], 1)
    if text is None:
        return out
    img = attn.to_out[1](attn.to_out[0](out[:, start:]))
    return img, attn.to_add_out(out[:, :start])


def test_flux_merged_attention_equals_the_reference():
    model, inputs = tiny_denoiser("flux")
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
    rope = model.pos_embed(ids)
    image, text = torch.randn(2, 16, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    double, single = model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn
    caught = []
    with fastgen.patch(model, tome=ToMeConfig(0.5, use_rand=False)), torch.no_grad():
        run(model, inputs)  # the model's hook reads the grid
        for attn in (double, single):
            # after the patch's own pre-hook, which sets this call's reduction
            attn.register_forward_pre_hook(lambda m, a: caught.append(m.__dict__[REDUCTION][1]))
        out_double = double(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=rope)
        out_single = single(hidden_states=torch.cat([text, image], 1), image_rotary_emb=rope)
        for attn in (double, single):
            attn._forward_pre_hooks.popitem()
        assert (caught[0].start, caught[0].stop, caught[1].start, caught[1].stop) == (0, 16, 7, 23)
        ref_double = _flux_reference(double, image, text, rope, caught[0])
        ref_single = _flux_reference(single, torch.cat([text, image], 1), None, rope, caught[1])
    for ours, theirs in zip(out_double, ref_double):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_single, ref_single, rtol=1e-5, atol=1e-5)
    assert caught[0].matching.r == 8 and caught[1].matching.r == 8


class _DropHalfOfTheKeys:
    """A Reduction that keeps queries and attends every other key of tokens [start, stop)."""

    def __init__(self, start, stop):
        self.start, self.stop = start, stop

    def queries(self, q):
        return q

    def keys_values(self, k, v):
        return k[:, :, ::2], v[:, :, ::2]

    def output(self, out):
        return out


def test_reduced_groups_keep_a_key_padding_prefix_exact():
    # HunyuanVideo's layout: [video (12: 4 history, 8 reduced), text (5)], padding at the text's end
    g = torch.Generator().manual_seed(0)
    B, H, D, nv, nt = 2, 2, 8, 12, 5
    video = [torch.randn(B, nv, H * D, generator=g) for _ in range(3)]
    text = [torch.randn(B, nt, H * D, generator=g) for _ in range(3)]
    cos, sin = torch.randn(nv, D // 2, generator=g), torch.randn(nv, D // 2, generator=g)
    red = _DropHalfOfTheKeys(4, 12)
    groups = [TokenGroup(*video, rope=(cos, sin, "interleaved"), reduce=red), TokenGroup(*text)]
    config = PatchConfig()
    lengths = [nv + 3, nv + 5]
    vid_out, txt_out = joint_attention(groups, D, config, key_lengths=lengths)
    # reference: the plain groups, keys [history, every other reduced token, text], masked
    from fastgen.patching.core import project_groups

    q, keys, values = project_groups([TokenGroup(*video, rope=(cos, sin, "interleaved")), TokenGroup(*text)], D, config)
    keep = torch.cat([torch.arange(4), torch.arange(4, 12, 2), torch.arange(12, 17)])
    k, v = torch.cat(keys, 2)[:, :, keep], torch.cat(values, 2)[:, :, keep]
    mask = torch.arange(len(keep))[None] < torch.tensor([n - 4 for n in lengths])[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])
    ref = ref.transpose(1, 2).flatten(2)
    torch.testing.assert_close(torch.cat([vid_out, txt_out], 1), ref, rtol=1e-5, atol=1e-6)


def test_wan_spatio_temporal_cells_run_and_differ_from_per_frame_cells():
    model, inputs = tiny_denoiser("wan")
    ref = run(model, inputs)
    outs = {}
    for sf in (1, 2):
        with fastgen.patch(model, tome=ToMeConfig(0.5, sf=sf, use_rand=False)):
            outs[sf] = run(model, inputs)
        assert 0 < rel(outs[sf], ref) < 0.2
    assert not torch.equal(outs[1], outs[2])
    positional = (inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])
    with fastgen.patch(model, tome=ToMeConfig(0.5, sf=2, use_rand=False)), torch.no_grad():
        assert torch.equal(model(*positional, return_dict=False)[0], outs[2])  # the latent given by position
    with fastgen.patch(model, tome=ToMeConfig(0.85, sf=2)):  # up to 7 of each 2x2x2 cell's 8 tokens
        assert torch.isfinite(run(model, inputs)).all()


def test_todo_downsamples_each_frame_on_its_own():
    x = torch.randn(2, 3 * 5 * 6, 4)
    for method in ("avg", "nearest"):
        out = dit.downsample_grid(x, (3, 5, 6), 2, method)
        frames = [downsample_tokens(f, (5, 6), 2, method) for f in x.view(2, 3, 30, 4).unbind(1)]
        assert torch.equal(out, torch.cat(frames, 1))


def test_dit_options_that_do_not_apply_are_said_once_and_ids_that_are_no_grid_skip():
    model, inputs = tiny_denoiser("flux")
    with fastgen.patch(model):
        plain = run(model, inputs)
    with pytest.warns(UserWarning, match="merge_mlp / merge_crossattn do not apply"):
        handle = fastgen.patch(model, tome=ToMeConfig(0.5, merge_mlp=True, merge_crossattn=True))
    assert "ToMe 0.5 in attention" in handle.merging and not torch.equal(run(model, inputs), plain)
    handle.remove()
    shuffled = dict(inputs, img_ids=inputs["img_ids"].flip(0))  # a layout fastgen cannot read as a grid
    with fastgen.patch(model):
        plain = run(model, shuffled)
    with fastgen.patch(model, tome=0.5), pytest.warns(UserWarning, match="no row-major grid"):
        assert torch.equal(run(model, shuffled), plain)


def test_merging_runs_with_fastgens_triton_kernels_too():
    model, inputs = tiny_denoiser("flux")
    ref = run(model, inputs)
    with fastgen.patch(model, tome=ToMeConfig(0.5, use_rand=False)):
        torch_path = run(model, inputs)
    with fastgen.patch(model, tome=ToMeConfig(0.5, use_rand=False), attention_backend="triton",
                       prologue_backend="triton"):
        triton_path = run(model, inputs)
    assert not torch.equal(triton_path, ref)
    torch.testing.assert_close(triton_path, torch_path, rtol=1e-4, atol=1e-4)


def test_flux_pipeline_end_to_end_with_a_step_schedule():
    pipe, call = build_pipeline("flux", "tiny")
    call = dict(call, num_inference_steps=3, output_type="latent")

    def go(seed=0, **patch):
        with fastgen.patch(pipe, **patch) as handle, torch.no_grad():
            out = pipe(**call, generator=torch.Generator().manual_seed(seed)).images
        return out, handle.merging

    plain, _ = go()
    merged, report = go(tome=0.5)
    assert report == "FluxTransformer2DModel: 3 block(s) at level 1 (ToMe 0.5 in attention)"
    assert 0 < rel(merged, plain) < 0.5
    assert torch.equal(go(tome=0.5)[0], merged), "the call's seed gives the same maps"
    assert not torch.equal(go(1, tome=0.5)[0], merged)
    never, _ = go(tome=ToMeConfig(0.5, steps=(0.9, 1.0)))  # steps 0, 1/3, 2/3: none in [0.9, 1)
    assert torch.equal(never, plain)
    last, _ = go(tome=ToMeConfig(0.5, steps=(0.6, 1.0)))
    assert not torch.equal(last, plain) and not torch.equal(last, merged)
    todo, _ = go(todo=2)
    assert 0 < rel(todo, plain) < 0.5
