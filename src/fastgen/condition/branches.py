"""The Flux transformer forward with condition branches (OminiControl2).

The transformer runs a list of token branches: the main one (text + image, as upstream) and one
per condition. A condition branch uses the image stream's weights (with its own LoRA adapter, if
any), its own position ids and a timestep-0 / guidance-1 embedding. Attention is asymmetric by
default: main queries attend to every branch's keys, each condition's queries only to its own.
A condition's K/V then depend on nothing that changes between steps, so the first forward of a
generation stores them per layer (post-norm, post-RoPE) and every later forward drops the
condition branches altogether: main queries read the cached K/V in place as extra attention
segments (``fastgen.ops.attention(extra_kv=..., extra_bias=...)``).

Written against diffusers' own modules (the blocks' norms, projections and feed-forwards are
called as they are), so weights, LoRA layers and fused projections are the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import fastgen.ops as ops
from fastgen._hooks import call_as_forward
from fastgen._validity import ambient_key, modules_key, tensor_key, why_no_reuse
from fastgen.condition.adapters import AdapterSwitch
from fastgen.condition.cache import ConditionKVCache
from fastgen.condition.config import ConditionConfig
from fastgen.patching.config import PatchConfig
from fastgen.patching.core import TokenGroup, heads_view, project_groups, prologue, split_heads_output


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
class BranchState:
    """Everything one generation with conditions needs between transformer calls."""

    branches: list[Branch]
    config: ConditionConfig
    switch: AdapterSwitch
    cache: ConditionKVCache | None = None
    generate: torch.Tensor | None = None  # fill mode: indices of the generated tokens in the canvas
    pooled: torch.Tensor | None = None  # the first call's pooled text embedding (the prompt's)
    batch: int = 1  # the current forward's batch
    n_txt: int = 0  # the current forward's text tokens
    background: object | None = None  # fastgen.edit: captures or supplies extra K/V per layer
    token_split: int | None = None  # fastgen.edit's inversion mask: image tokens are [this many fg, bg]
    forwards: int = 0
    branch_forwards: int = 0  # forwards that ran the condition branches
    cache_mode: str | None = None  # this forward: "store" (fills the cache), "read" (serves it) or None
    _rope: list = field(default_factory=list)
    patch_config: PatchConfig = field(default_factory=PatchConfig)  # the attention settings, built once

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

    def begin_forward(self, model, x: torch.Tensor, guidance) -> bool:
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


def check_transformer(transformer, what: str = "conditions", processors: bool = True, pipe=None) -> None:
    """``ValueError`` unless ``transformer`` is a Flux transformer running Flux's own (or fastgen's)
    attention processors (``processors``): the branch forward is written for it. ``pipe``: the
    pipeline it came from, named in the error."""
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from fastgen.patching.processors.flux import FastgenFluxAttnProcessor

    if not isinstance(transformer, FluxTransformer2DModel):
        got = "no transformer" if transformer is None else f"a {type(transformer).__name__}"
        if pipe is not None:
            denoiser = getattr(pipe, "unet", None)
            got = f"a {type(pipe).__name__} with {got}" + (f" (its denoiser is a {type(denoiser).__name__})"
                                                          if transformer is None and denoiser is not None else "")
        raise ValueError(f"{what}: only Flux is supported, i.e. a pipeline whose transformer is a "
                         f"FluxTransformer2DModel (FluxPipeline, or a pipeline built from its components); got {got}")
    if not processors:
        return
    for name, proc in transformer.attn_processors.items():
        if not isinstance(proc, (FluxAttnProcessor, FastgenFluxAttnProcessor)):
            raise ValueError(f"{name} runs {type(proc).__name__}: {what} replace Flux's attention and would "
                             "silently drop it (IP-Adapter?); unload it first")
        if getattr(proc, "_attention_backend", None) is not None:
            raise ValueError(f"{what}: the condition / KV-Edit forward runs fastgen's attention (the config's "
                             f"attention_backend), not the diffusers backend {proc._attention_backend!s} chosen with "
                             "set_attention_backend; call transformer.reset_attention_backend() first")


def _rope_of(model, ids: torch.Tensor):
    cos, sin = model.pos_embed(ids)
    return cos, sin, "interleaved"


def _start_branches(model, state: BranchState, x_dtype, guidance) -> list[_Live]:
    """Embed every condition branch: x_embedder (its adapter), timestep 0, guidance 1, the pooled
    embedding of the generation's first call, whose batch decides the branches' (1 when every row
    is the same: one cached condition then serves the whole batch and both halves of CFG)."""
    pooled = state.pooled
    if pooled.shape[0] > 1 and torch.equal(pooled, pooled[:1].expand_as(pooled)):
        pooled = pooled[:1]
    if not state._rope:
        state._rope = [_rope_of(model, b.ids) for b in state.branches]
    live = []
    for br, rope in zip(state.branches, state._rope):
        tokens = br.tokens
        bc = max(tokens.shape[0], pooled.shape[0])
        if state.config.attention == "symmetric":
            bc = max(bc, state.batch)  # conditions then attend over the batch's image tokens
        state.switch.select(model, br.adapter, main=False)
        hidden = model.x_embedder(tokens.to(x_dtype)).expand(bc, -1, -1)
        ts = torch.zeros(pooled.shape[0], dtype=x_dtype, device=tokens.device)
        if guidance is None:
            temb = model.time_text_embed(ts, pooled)
        else:
            temb = model.time_text_embed(ts, torch.full_like(ts, 1000.0), pooled)
        live.append(_Live(hidden, temb.expand(bc, -1), rope, br))
    state.switch.select(model, None, main=True)
    return live


def _attend(layer: int, attn, main_groups: list[TokenGroup], conds: list[_Live], cond_groups: list[TokenGroup],
            state: BranchState):
    """Main and condition attention of one layer. Returns (main outputs per group, condition outputs)."""
    cfg = state.patch_config
    d = attn.head_dim
    sizes = [g.query.shape[1] for g in main_groups]
    if state.config.attention == "symmetric":
        return _symmetric(attn, main_groups, conds, cond_groups, state, sizes)

    # Asymmetric: each condition attends to itself; its K/V become segments of the main attention.
    cond_out, entries = [], []
    for live, g in zip(conds, cond_groups):
        qc, kc = prologue(heads_view(g.query, d), heads_view(g.key, d), g.norm_q, g.norm_k, g.rope, None, cfg)
        vc = heads_view(g.value, d)
        cond_out.append(split_heads_output(ops.attention(qc, kc, vc, backend=cfg.attention_backend), [qc.shape[2]])[0])
        entries.append((kc, vc))
        if state.cache_mode == "store":
            state.cache.store(layer, kc, vc)
    if state.cache_mode == "read":
        entries = state.cache.segments(layer)  # (k, v) pairs or fastgen.ops.Fp8KV, read in place
    q, keys, values = project_groups(main_groups, d, cfg)
    biases = [b.bias for b in state.branches][: len(entries)]
    if state.background is not None:
        # image keys/values: the second group of a double block, the tail of a single block's stream
        k_img, v_img = (keys[1], values[1]) if len(keys) == 2 else (keys[0][:, :, state.n_txt :],
                                                                   values[0][:, :, state.n_txt :])
        extra = state.background.attend(layer, k_img, v_img)
        entries = entries + [e for e, _ in extra]
        biases = biases + [b for _, b in extra]
    if state.token_split is not None:
        if entries:
            raise ValueError("the KV-Edit inversion mask takes no extra K/V segments")
        return split_heads_output(_split_attention(q, keys, values, state.n_txt, state.token_split,
                                                   cfg.attention_backend), sizes), cond_out
    segs = list(zip(keys[1:], values[1:])) + entries
    biases = [0.0] * (len(keys) - 1) + biases
    out = ops.attention(q, keys[0], values[0], extra_kv=segs or None, extra_bias=biases or None,
                        backend=cfg.attention_backend)
    return split_heads_output(out, sizes), cond_out


def _symmetric(attn, main_groups: list[TokenGroup], conds: list[_Live], cond_groups: list[TokenGroup],
               state: BranchState, sizes: list[int]):
    """The original OminiControl's attention: every token sees every token, and ``log(scale)`` of
    a condition is added to the logits between that condition's tokens and the text and image
    tokens, in both directions (as its ``c_factor`` bias; none between conditions)."""
    cfg = state.patch_config
    groups = main_groups + cond_groups
    q, keys, values = project_groups(groups, attn.head_dim, cfg)
    n_main, n_groups = sum(sizes), len(main_groups)
    cond_sizes = [g.query.shape[1] for g in cond_groups]
    biases = [c.branch.bias for c in conds]
    segs = list(zip(keys[1:], values[1:]))  # the main groups after the first, then every condition
    if not any(biases):
        out = ops.attention(q, keys[0], values[0], extra_kv=segs or None, backend=cfg.attention_backend)
        every = split_heads_output(out, sizes + cond_sizes)
        return every[: len(sizes)], every[len(sizes) :]
    zeros = [0.0] * (n_groups - 1)
    # text and image queries: + log(scale_c) on condition c's keys
    out_main = ops.attention(q[:, :, :n_main], keys[0], values[0], extra_kv=segs, extra_bias=zeros + biases,
                             backend=cfg.attention_backend)
    # condition c's queries: + log(scale_c) on the text and image keys. The first segment takes no
    # bias, and softmax does not change when a row's logits all move by the same amount: add
    # -log(scale_c) to every condition's keys instead.
    cond_out, start = [], n_main
    for b, n in zip(biases, cond_sizes):
        out = ops.attention(q[:, :, start : start + n], keys[0], values[0], extra_kv=segs,
                            extra_bias=zeros + [-b] * len(conds), backend=cfg.attention_backend)
        cond_out.append(split_heads_output(out, [n])[0])
        start += n
    return split_heads_output(out_main, sizes), cond_out


def _split_attention(q, keys, values, n_txt: int, n_fg: int, backend: str) -> torch.Tensor:
    """KV-Edit's inversion mask, image tokens ordered [foreground, background]: text queries see
    every key, foreground queries text + foreground keys, background ones text + background keys.
    Three launches over slices of the same K/V (segments read in place, nothing concatenated)."""
    if len(keys) == 2:  # double block: text and image keys apart
        (kt, ki), (vt, vi) = keys, values
    else:
        kt, ki, vt, vi = keys[0][:, :, :n_txt], keys[0][:, :, n_txt:], values[0][:, :, :n_txt], values[0][:, :, n_txt:]
    parts = []
    for rows, cols in ((slice(0, n_txt), slice(None)), (slice(n_txt, n_txt + n_fg), slice(0, n_fg)),
                       (slice(n_txt + n_fg, None), slice(n_fg, None))):
        qr, kc, vc = q[:, :, rows], ki[:, :, cols], vi[:, :, cols]
        if qr.shape[2]:
            parts.append(ops.attention(qr, kt, vt, extra_kv=[(kc, vc)] if kc.shape[2] else None, backend=backend))
    return torch.cat(parts, dim=2)


def _image_tail(block, h, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp):
    # FluxTransformerBlock's image-stream update after attention, as upstream writes it.
    h = h + gate_msa.unsqueeze(1) * attn_out
    n = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return h + gate_mlp.unsqueeze(1) * block.ff(n)


def _double_block(layer, block, c, x, temb, rope, conds: list[_Live], state: BranchState):
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    from fastgen.patching.processors.flux import split_rope

    attn, sw = block.attn, state.switch
    n_txt, n_img = c.shape[1], x.shape[1]
    nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
    nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
    q, k, v, eq, ek, ev = _get_qkv_projections(attn, nx, nc)
    main = [TokenGroup(eq, ek, ev, attn.norm_added_q, attn.norm_added_k, split_rope(rope, 0, n_txt)),
            TokenGroup(q, k, v, attn.norm_q, attn.norm_k, split_rope(rope, n_txt, n_txt + n_img))]
    cond_groups, cond_mods = [], []
    for live in conds:
        sw.select(block, live.branch.adapter, main=False)
        nh, *mods = block.norm1(live.hidden, emb=live.temb)
        qc, kc, vc, *_ = _get_qkv_projections(attn, nh, None)
        cond_groups.append(TokenGroup(qc, kc, vc, attn.norm_q, attn.norm_k, live.rope))
        cond_mods.append(mods)
    if conds:
        sw.select(block, None, main=True)
    (txt_out, img_out), cond_out = _attend(layer, attn, main, conds, cond_groups, state)

    x = _image_tail(block, x, attn.to_out[1](attn.to_out[0](img_out.contiguous())), gate_msa, shift_mlp, scale_mlp,
                    gate_mlp)
    c = c + c_gate_msa.unsqueeze(1) * attn.to_add_out(txt_out.contiguous())
    nc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(nc)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    for live, out, mods in zip(conds, cond_out, cond_mods):
        sw.select(block, live.branch.adapter, main=False)
        live.hidden = _image_tail(block, live.hidden, attn.to_out[1](attn.to_out[0](out.contiguous())), *mods)
    if conds:
        sw.select(block, None, main=True)
    return c, x


def _single_stream(block, h, temb, attn_out, mlp, gate):
    out = h + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_out, mlp], dim=2))
    return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


def _single_block(layer, block, h, temb, rope, conds: list[_Live], state: BranchState):
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    attn, sw = block.attn, state.switch
    nh, gate = block.norm(h, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(nh))
    q, k, v, *_ = _get_qkv_projections(attn, nh, None)
    main = [TokenGroup(q, k, v, attn.norm_q, attn.norm_k, rope)]
    cond_groups, cond_side = [], []
    for live in conds:
        sw.select(block, live.branch.adapter, main=False)
        nc, gate_c = block.norm(live.hidden, emb=live.temb)
        mlp_c = block.act_mlp(block.proj_mlp(nc))
        qc, kc, vc, *_ = _get_qkv_projections(attn, nc, None)
        cond_groups.append(TokenGroup(qc, kc, vc, attn.norm_q, attn.norm_k, live.rope))
        cond_side.append((mlp_c, gate_c))
    if conds:
        sw.select(block, None, main=True)
    (out,), cond_out = _attend(layer, attn, main, conds, cond_groups, state)
    h = _single_stream(block, h, temb, out, mlp, gate)
    for live, o, (mlp_c, gate_c) in zip(conds, cond_out, cond_side):
        sw.select(block, live.branch.adapter, main=False)
        live.hidden = _single_stream(block, live.hidden, live.temb, o, mlp_c, gate_c)
    if conds:
        sw.select(block, None, main=True)
    return h


def _controlnet_index(blocks, samples, index, repeat=False):
    if repeat:
        return index % len(samples)
    return index // int(math.ceil(len(blocks) / len(samples)))


def branch_forward(
    model,
    state: BranchState,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor = None,
    pooled_projections: torch.Tensor = None,
    timestep: torch.Tensor = None,
    img_ids: torch.Tensor = None,
    txt_ids: torch.Tensor = None,
    guidance: torch.Tensor = None,
    joint_attention_kwargs: dict | None = None,
    controlnet_block_samples=None,
    controlnet_single_block_samples=None,
    return_dict: bool = True,
    controlnet_blocks_repeat: bool = False,
):
    """``FluxTransformer2DModel.forward`` (same arguments, same result without conditions) with
    the condition branches of ``state``. The LoRA scale in ``joint_attention_kwargs["scale"]`` is
    honoured as upstream; other attention kwargs (IP-Adapter) are not supported here."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    kwargs = dict(joint_attention_kwargs or {})
    lora_scale = kwargs.pop("scale", 1.0)
    if kwargs:
        raise ValueError(f"joint_attention_kwargs {sorted(kwargs)} are not supported with conditions")
    scale_lora_layers(model, lora_scale)
    try:
        # the cache key sees the LoRA scale just applied and the adapters as the caller left them
        state.switch.begin()
        if state.pooled is None:
            state.pooled = pooled_projections.detach()
        run_branches = state.begin_forward(model, hidden_states, guidance)
        if state.background is not None:
            state.background.begin_forward(model, hidden_states)
        state.switch.select(model, None, main=True)
        canvas = None
        if state.generate is not None:  # fill: the pipeline's latents are the canvas, generated are the hole's
            canvas, idx = hidden_states, state.generate.to(hidden_states.device)
            hidden_states = canvas.index_select(1, idx)
        x = model.x_embedder(hidden_states)
        ts = timestep.to(x.dtype) * 1000
        g = guidance.to(x.dtype) * 1000 if guidance is not None else None
        temb = model.time_text_embed(ts, pooled_projections) if g is None else model.time_text_embed(ts, g, pooled_projections)
        c = model.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        if canvas is not None:
            img_ids = img_ids[idx.to(img_ids.device)]
        if img_ids.shape[0] != x.shape[1]:
            raise ValueError(f"{x.shape[1]} image tokens but {img_ids.shape[0]} image ids")
        rope = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        state.batch, state.n_txt = x.shape[0], c.shape[1]
        conds = _start_branches(model, state, x.dtype, guidance) if run_branches else []

        for i, block in enumerate(model.transformer_blocks):
            # each block inside its forward hooks (block-level offloading onloads it there); the
            # hooks see no inputs, which are fastgen's own objects, already on the compute device
            c, x = call_as_forward(block, lambda: _double_block(i, block, c, x, temb, rope, conds, state))
            if controlnet_block_samples is not None:
                x = x + controlnet_block_samples[_controlnet_index(model.transformer_blocks, controlnet_block_samples,
                                                                  i, controlnet_blocks_repeat)]
        n_txt, n_double = c.shape[1], len(model.transformer_blocks)
        h = torch.cat([c, x], dim=1)
        cos, sin = rope
        for j, block in enumerate(model.single_transformer_blocks):
            h = call_as_forward(block, lambda: _single_block(n_double + j, block, h, temb, (cos, sin, "interleaved"),
                                                             conds, state))
            if controlnet_single_block_samples is not None:
                k = _controlnet_index(model.single_transformer_blocks, controlnet_single_block_samples, j)
                h = torch.cat([h[:, :n_txt], h[:, n_txt:] + controlnet_single_block_samples[k]], dim=1)
        x = h[:, n_txt:]
        if state.cache_mode == "store":
            state.cache.filled = True
        state.forwards += 1
        state.branch_forwards += int(run_branches)
        out = model.proj_out(model.norm_out(x, temb))
        if canvas is not None:  # known tokens: zero velocity (Euler keeps them; the pipeline writes them back)
            full = out.new_zeros(canvas.shape[0], canvas.shape[1], out.shape[2])
            out = full.index_copy_(1, idx, out)
    finally:
        state.switch.restore()
        unscale_lora_layers(model, lora_scale)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)
