"""Image conditions as a client of the Flux branch forward (OminiControl2).

A condition is a token branch: it runs the image stream's weights of every block (with its own
LoRA adapter, if any), its own position ids and a timestep-0 / guidance-1 embedding, next to the
main branch (text + image, as upstream). ``BranchState`` is the conditions' ``KVProvider`` of
``fastgen.flux_branches``: in every layer it runs its branches through the block and gives their
K/V to the text and image queries as extra segments. Attention is asymmetric by default: main
queries attend to every branch's keys, each condition's queries only to its own. A condition's
K/V then depend on nothing that changes between steps, so the first forward of a generation
stores them per layer (post-norm, post-RoPE) and every later forward drops the condition branches
altogether: main queries read the cached K/V in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastgen.ops as ops
from fastgen import flux_branches
from fastgen._validity import ambient_key, modules_key, tensor_key, why_no_reuse
from fastgen.condition.adapters import AdapterSwitch
from fastgen.condition.cache import ConditionKVCache
from fastgen.condition.config import ConditionConfig
from fastgen.flux_branches import Forward, KVProvider, Layer, Segment, rope_of
from fastgen.patching.config import PatchConfig
from fastgen.patching.core import split_heads_output


@dataclass
class Branch:
    """One condition, prepared: packed tokens (1 or B, N, C), ids (N, 3), adapter, logit bias."""

    tokens: torch.Tensor
    ids: torch.Tensor
    adapter: str | None = None
    bias: float = 0.0


@dataclass
class _Live:
    """A condition branch during one forward: its hidden states, embedding and RoPE tables."""

    hidden: torch.Tensor
    temb: torch.Tensor
    rope: tuple
    branch: Branch


@dataclass
class BranchState(KVProvider):
    """Everything one generation with conditions needs between transformer calls; the conditions'
    K/V provider in ``fastgen.flux_branches.branch_forward``."""

    branches: list[Branch]
    config: ConditionConfig
    switch: AdapterSwitch
    cache: ConditionKVCache | None = None
    generate: torch.Tensor | None = None  # fill mode: indices of the generated tokens in the canvas
    pooled: torch.Tensor | None = None  # the first call's pooled text embedding (the prompt's)
    forwards: int = 0
    branch_forwards: int = 0  # forwards that ran the condition branches
    cache_mode: str | None = None  # this forward: "store" (fills the cache), "read" (serves it) or None
    _rope: list = field(default_factory=list)
    patch_config: PatchConfig = field(default_factory=PatchConfig)  # the attention settings, built once
    _run: bool = False  # this forward runs the branches
    _live: list[_Live] | None = None  # the branches during this forward, started at its first layer

    @classmethod
    def create(cls, model, branches: list[Branch], config: ConditionConfig, generate=None) -> BranchState:
        switch = AdapterSwitch(model, [b.adapter for b in branches])
        cache = ConditionKVCache(config.cache_dtype) if (config.use_cache and branches) else None
        return cls(branches, config, switch, cache, generate, patch_config=config.patch_config())

    def cache_key(self, model, x: torch.Tensor, guidance) -> tuple:
        """What the condition K/V depend on besides the branches' own tokens and ids: the ambient
        state (grad / inference mode, autocast), the state of every module the branches run (LoRA
        scale and adapters included: the key is taken after the call's LoRA scale is applied and
        before any branch switches adapters), the pooled embedding, the compute dtype and device."""
        return (ambient_key(), modules_key(condition_modules(model)), tensor_key(self.pooled), x.dtype, x.device,
                guidance is None, tuple((tensor_key(b.tokens), tensor_key(b.ids)) for b in self.branches))

    def _plan(self, model, x: torch.Tensor, guidance) -> bool:
        """Decide how this forward uses the cache (``cache_mode``); True when it runs the branches.

        The cache serves a forward only under the key it was filled under, and neither serves nor
        stores while reuse is unsafe (``torch.compile`` tracing, CUDA-graph capture, autograd,
        training-mode dropout: ``fastgen._validity.why_no_reuse``); the branches then run as
        without a cache."""
        self.cache_mode = None
        if not self.branches:
            return False
        if self.cache is None or why_no_reuse(condition_modules(model)) is not None:
            return True
        key = self.cache_key(model, x, guidance)
        if self.cache.serves(key):
            self.cache_mode = "read"
            return False
        self.cache.refill(key)
        self.cache_mode = "store"
        return True

    # --- the K/V provider ---------------------------------------------------------------------

    def begin_forward(self, forward: Forward) -> None:
        # the cache key sees the LoRA scale just applied and the adapters as the caller left them
        self.switch.begin()
        if self.pooled is None:
            self.pooled = forward.pooled_projections.detach()
        self._run = self._plan(forward.model, forward.hidden_states, forward.guidance)
        self.switch.select(forward.model, None, main=True)

    def extra_kv(self, layer: Layer) -> list[Segment]:
        if self.cache_mode == "read":  # (k, v) pairs or fastgen.ops.Fp8KV, read in place
            return [Segment(e, b.bias) for e, b in zip(self.cache.segments(layer.index), self.branches)]
        if not self._run:
            return []
        if self._live is None:
            self._live = self._start_branches(layer.forward)
        sw, block = self.switch, layer.block
        groups, pending = [], []
        for live in self._live:
            sw.select(block, live.branch.adapter, main=False)
            g, p = layer.project(live.hidden, live.temb, live.rope)
            groups.append(g)
            pending.append(p)
        sw.select(block, None, main=True)
        qkv = [layer.qkv(g) for g in groups]
        if self.config.attention == "symmetric":
            outs = _symmetric(layer, qkv, [live.branch.bias for live in self._live])
        else:  # each condition attends to itself
            outs = [ops.attention(q, k, v, backend=layer.forward.config.attention_backend,
                                  autotune=layer.forward.config.autotune) for q, k, v in qkv]
        for live, out, p in zip(self._live, outs, pending):
            sw.select(block, live.branch.adapter, main=False)
            live.hidden = layer.finish(live.hidden, split_heads_output(out, [out.shape[2]])[0], p)
        sw.select(block, None, main=True)
        if self.cache_mode == "store":
            for _, k, v in qkv:
                self.cache.store(layer.index, k, v)
        return [Segment((k, v), live.branch.bias) for (_, k, v), live in zip(qkv, self._live)]

    def _start_branches(self, forward: Forward) -> list[_Live]:
        """Embed every condition branch: x_embedder (its adapter), timestep 0, guidance 1, the
        pooled embedding of the generation's first call, whose batch decides the branches' (1 when
        every row is the same: one cached condition then serves the whole batch and both halves of
        CFG). Run at the first layer, once the forward's compute dtype and batch are known."""
        model, pooled = forward.model, self.pooled
        if pooled.shape[0] > 1 and torch.equal(pooled, pooled[:1].expand_as(pooled)):
            pooled = pooled[:1]
        if not self._rope:
            self._rope = [rope_of(model, b.ids) for b in self.branches]
        live = []
        for br, rope in zip(self.branches, self._rope):
            tokens = br.tokens
            bc = max(tokens.shape[0], pooled.shape[0])
            if self.config.attention == "symmetric":
                bc = max(bc, forward.batch)  # conditions then attend over the batch's image tokens
            self.switch.select(model, br.adapter, main=False)
            hidden = model.x_embedder(tokens.to(forward.dtype)).expand(bc, -1, -1)
            ts = torch.zeros(pooled.shape[0], dtype=forward.dtype, device=tokens.device)
            if forward.guidance is None:
                temb = model.time_text_embed(ts, pooled)
            else:
                temb = model.time_text_embed(ts, torch.full_like(ts, 1000.0), pooled)
            live.append(_Live(hidden, temb.expand(bc, -1), rope, br))
        self.switch.select(model, None, main=True)
        return live

    def end_forward(self, forward: Forward, completed: bool) -> None:
        if completed:
            if self.cache_mode == "store":
                self.cache.filled = True
            self.forwards += 1
            self.branch_forwards += int(self._run)
        self._live = None
        self.switch.restore()

    def clear(self) -> None:
        if self.cache is not None:
            self.cache.clear()
        self.pooled = None
        self._rope = []


def condition_modules(model) -> list:
    """The modules a condition branch runs: the image stream of every block (double blocks'
    context-stream modules excepted; their attention's added projections come along, harmlessly)."""
    mods = [model.x_embedder, model.time_text_embed]
    for b in model.transformer_blocks:
        mods += [b.norm1, b.attn, b.norm2, b.ff]
    mods += list(model.single_transformer_blocks)
    return mods


def _symmetric(layer: Layer, qkv: list[tuple], biases: list[float]) -> list[torch.Tensor]:
    """The condition queries' side of the original OminiControl's attention: every token sees every
    token, and ``log(scale)`` of a condition is added to the logits between that condition's tokens
    and the text and image tokens, in both directions (as its ``c_factor`` bias; none between
    conditions). The text and image queries' side is the branch forward's own attention, with each
    condition's K/V a segment of bias ``log(scale)``. ``qkv``: each condition's (q, k, v), (B, H, N,
    D); returns each condition's attention output, (B, H, N, D)."""
    keys, values = layer.keys, layer.values
    segs = list(zip(keys[1:], values[1:])) + [(k, v) for _, k, v in qkv]  # the main groups after the first
    zeros = [0.0] * (len(keys) - 1)
    # condition c's queries: + log(scale_c) on the text and image keys. The first segment takes no
    # bias, and softmax does not change when a row's logits all move by the same amount: add
    # -log(scale_c) to every condition's keys instead.
    return [ops.attention(q, keys[0], values[0], extra_kv=segs, extra_bias=zeros + [-b] * len(qkv),
                          backend=layer.forward.config.attention_backend,
                                  autotune=layer.forward.config.autotune) for (q, _, _), b in zip(qkv, biases)]


def branch_forward(model, state: BranchState, *args, **kwargs):
    """``FluxTransformer2DModel.forward`` (same arguments, same result without conditions) with
    the condition branches of ``state``: ``fastgen.flux_branches.branch_forward`` with ``state`` as
    its K/V provider, under its attention settings and, in fill mode, over the generated tokens."""
    return flux_branches.branch_forward(model, [state], *args, config=state.patch_config, image_tokens=state.generate,
                                        **kwargs)
