"""The Flux branch forward's K/V provider interface, through providers written here: a fixed K/V
segment with a bias against diffusers' own forward with the segment added to its attention, and a
replay of a condition cache against the conditions' own cached forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgen.condition import ConditionConfig
from fastgen.condition.branches import BranchState
from fastgen.condition.branches import branch_forward as condition_forward
from fastgen.edit import InversionMask
from fastgen.flux_branches import KVProvider, Segment, branch_forward
from fastgen.patching.config import PatchConfig
from helpers import DEVICE
from test_condition import _branches, _forward_inputs, _rel, _tiny_flux_pipeline


@pytest.fixture(scope="module")
def model():
    return _tiny_flux_pipeline().transformer


def _attention_layers(model) -> list:
    return [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]


class FixedKV(KVProvider):
    """One fixed (k, v) segment per layer, each (1, H, N, D), with a logit bias; records every
    layer's fresh image keys and the forward's begin and end."""

    def __init__(self, segments: list[tuple[torch.Tensor, torch.Tensor]], bias: float):
        self.segments, self.bias = segments, bias
        self.image_keys: dict[int, torch.Tensor] = {}
        self.calls: list = []

    def begin_forward(self, forward) -> None:
        self.calls.append("begin")

    def extra_kv(self, layer) -> list[Segment]:
        self.image_keys[layer.index] = layer.image_kv()[0].clone()
        return [Segment(self.segments[layer.index], self.bias)]

    def end_forward(self, forward, completed: bool) -> None:
        self.calls.append(("end", completed))


def _upstream_with_segments(model, segments, bias, inputs, monkeypatch):
    """diffusers' own forward and attention processors, each attention over its keys plus the
    layer's segment (``bias`` on its logits): (output, each layer's image keys (B, H, N_img, D))."""
    from diffusers.models.transformers import transformer_flux

    n_txt = inputs["encoder_hidden_states"].shape[1]
    layer, image_keys = [0], {}

    def attend(query, key, value, attn_mask=None, **_):  # (B, S, H, D), post-norm and post-RoPE
        i, batch = layer[0], key.shape[0]
        image_keys[i] = key[:, n_txt:].transpose(1, 2)
        k, v = (t.transpose(1, 2).expand(batch, -1, -1, -1) for t in segments[i])
        mask = torch.zeros(query.shape[1], key.shape[1] + k.shape[1], device=query.device)
        mask[:, key.shape[1] :] = bias
        q, k, v = (t.transpose(1, 2) for t in (query, torch.cat([key, k], 1), torch.cat([value, v], 1)))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", attend)
    hooks = [attn.register_forward_pre_hook(lambda m, a, i=i: layer.__setitem__(0, i))
             for i, attn in enumerate(_attention_layers(model))]
    try:
        return model(**inputs).sample, image_keys
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_a_third_provider_is_its_segments_in_upstream_attention(model, backend, monkeypatch):
    inputs = _forward_inputs(None)  # batch 2; the segments are batch 1, broadcast
    g = torch.Generator().manual_seed(8)
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    segments = [tuple(torch.randn(1, heads, 5, head_dim, generator=g).to(DEVICE) for _ in "kv")
                for _ in _attention_layers(model)]
    provider = FixedKV(segments, bias=0.7)
    with torch.no_grad():
        out = branch_forward(model, [provider], config=PatchConfig(attention_backend=backend), **inputs).sample
        plain = model(**inputs).sample
        ref, ref_keys = _upstream_with_segments(model, segments, 0.7, inputs, monkeypatch)
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    assert _rel(plain, ref) > 1e-3, "the segments change the output: the test can tell"
    assert provider.calls == ["begin", ("end", True)]
    assert sorted(provider.image_keys) == sorted(ref_keys) == list(range(3))
    for i, k in ref_keys.items():
        assert _rel(provider.image_keys[i], k) <= 1e-5, (i, _rel(provider.image_keys[i], k))


def test_a_provider_replaying_a_condition_cache_is_the_cached_condition_forward(model):
    inputs = _forward_inputs(None)

    class Replay(KVProvider):
        def __init__(self, state: BranchState):
            self.cache, self.biases = state.cache, [b.bias for b in state.branches]

        def extra_kv(self, layer) -> list[Segment]:
            return [Segment(e, b) for e, b in zip(self.cache.segments(layer.index), self.biases)]

    state = BranchState.create(model, _branches(2), ConditionConfig(attention_backend="triton"))
    with torch.no_grad():
        condition_forward(model, state, **inputs)  # fills the cache
        ref = condition_forward(model, state, **inputs).sample  # serves it
        out = branch_forward(model, [Replay(state)], config=state.patch_config, **inputs).sample
    assert state.branch_forwards == 1
    assert torch.equal(out, ref)


def test_two_providers_computing_one_attention_raise(model):
    with pytest.raises(ValueError, match="two K/V providers"), torch.no_grad():
        branch_forward(model, [InversionMask(4), InversionMask(4)], **_forward_inputs(None, batch=1))
