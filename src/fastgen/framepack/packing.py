"""FramePack's history packing inside diffusers' ``HunyuanVideoFramepackTransformer3DModel``, fused
and reused across the steps of a section: installed per instance by ``fastgen.patch``.

Upstream, every step of a section recomputes what does not depend on the step:

- three Conv3d patchifies of the history (clean 1x, 2x, 4x; the 2x and 4x inputs replicate-padded
  by a copy first), then three ``torch.cat`` that rebuild the whole packed sequence around the
  noisy tokens (``_pack_history_states``);
- four RoPE tables on the full-resolution grid (``rope``), two of them replicate-padded and
  average-pooled for the 2x and 4x tokens.

Here the history is patchified at every rate by one fused launch into one context buffer
``[4x, 2x, 1x]`` (``fastgen.ops.framepack.patchify_pack``), the packed RoPE tables of the whole
sequence come from one fused pooling launch (``fastgen.ops.framepack.rope_pool``), and a step only
patchifies its noisy latents and joins them to the context with one copy. Inside a generation
(``fastgen.generation``, a patched pipeline's call) the context and the tables are computed once
per section and served again while the very same history and index tensors come in (the
``StepCache`` rules: identity, in-place version, parameters, ambient state).

Exact: the fused ops compute the same convolutions and averages (fp32 accumulation; the pooled
tables differ from ``avg_pool3d``'s by summation order, ~1e-7). Upstream's own code runs instead
whenever this would not be the very same computation: autograd on (training), autocast (upstream's
Conv3d runs in the autocast dtype), ``torch.compile`` tracing, a history rate missing, or inputs
fastgen did not produce.
"""

from __future__ import annotations

import torch

from fastgen._hooks import places_own_weights, remove_diffusers_hook

_PACK_HOOK = "fastgen_history_pack"
_ROPE_HOOK = "fastgen_framepack_rope"
_METHOD = "_pack_history_states"

# diffusers' _pack_history_states pools the 2x and 4x tables with these kernels in post-patch grid
# units (the 2x / 4x convolutions' (2, 4, 4) / (4, 8, 8) over the noisy tokens' (1, 2, 2))
_POOL_2X, _POOL_4X = (2, 2, 2), (4, 4, 4)


def _upstream_only() -> bool:
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return True
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


class _RopeTables(tuple):
    """diffusers' (cos, sin) of ``rope`` for these frame indices, remembering them (``source``) so
    the packing can pool from the indices instead of from the tables."""

    source: tuple


def _model_hook_base():
    from diffusers.hooks import ModelHook

    return ModelHook


class _HistoryPatchify(_model_hook_base()):
    def __init__(self, packing: HistoryPacking):
        super().__init__()
        self.packing = packing

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        names = ("latents_clean", "latents_clean_2x", "latents_clean_4x")
        values = dict(zip(names, args), **kwargs)
        xs = [values.get(n) for n in names]
        convs = (module.proj, module.proj_2x, module.proj_4x)
        if (len(values) != 3 or not all(torch.is_tensor(x) and x.dim() == 5 and x.shape[2] > 0 for x in xs)
                or _upstream_only()
                # a LoRA (PEFT wraps the convolution) or any other module computes more than its
                # weight says: it must be called
                or not all(type(c) is torch.nn.Conv3d for c in convs)
                or not _floor_free(xs[0], module.proj.kernel_size)
                # a hook that puts a convolution's weights in place when it runs (sequential or
                # leaf-level offload): the convolutions must be called, not read
                or any(places_own_weights(c) for c in convs)):
            self.packing.recent = None
            return forward(*args, **kwargs)
        return self.packing.patchify(module, *xs)


class _CachedRope(_model_hook_base()):
    def __init__(self, packing: HistoryPacking):
        super().__init__()
        self.packing = packing

    def new_forward(self, module, frame_indices, height, width, device):
        forward = self.fn_ref.original_forward
        if not torch.is_tensor(frame_indices) or frame_indices.dim() != 1 or _upstream_only():
            return forward(frame_indices=frame_indices, height=height, width=width, device=device)
        cos, sin = self.packing.cached(module, frame_indices, f"rope:{height}x{width}:{device}",
                                       lambda: forward(frame_indices=frame_indices, height=height, width=width,
                                                       device=device))
        out = _RopeTables((cos, sin))
        out.source = (frame_indices, height, width)
        return out


class HistoryPacking:
    """The per-instance packing of one FramePack transformer (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache, reuse: bool = True):
        # cache: the patch's fastgen.patching.kv_cache.StepCache (not imported: fastgen.patching imports this)
        self.model, self.cache, self.reuse = model, cache, reuse
        self.recent = None  # (clean, 2x, 4x views, context buffer) of the forward running now
        self.hooked: list[tuple[torch.nn.Module, str, bool]] = []

    # --- install / uninstall ------------------------------------------------------------------

    def install(self) -> None:
        from diffusers.hooks import HookRegistry

        embedder = getattr(self.model, "clean_x_embedder", None)
        if embedder is None:  # a FramePack transformer built without history embedders
            return
        for module, name, hook in ((embedder, _PACK_HOOK, _HistoryPatchify(self)),
                                   (self.model.rope, _ROPE_HOOK, _CachedRope(self))):
            had = hasattr(module, "_diffusers_hook")
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
            self.hooked.append((module, name, had))
        upstream = getattr(type(self.model), _METHOD)
        self.model.__dict__[_METHOD] = lambda *a, **k: self.pack(upstream, *a, **k)

    def uninstall(self) -> None:
        for module, name, had in self.hooked:
            remove_diffusers_hook(module, name, had)
        self.hooked.clear()
        self.model.__dict__.pop(_METHOD, None)
        self.recent = None

    # --- the work ------------------------------------------------------------------------------

    def cached(self, module, inputs, slot: str, compute):
        if not self.reuse:
            return compute()
        return self.cache.get(module, inputs, compute, (module,), slot=slot)

    def patchify(self, embedder, clean, x2, x4):
        from fastgen.ops.framepack import patchify_pack

        convs = (embedder.proj_4x, embedder.proj_2x, embedder.proj)

        def compute():
            buf = patchify_pack([x4, x2, clean], [c.weight for c in convs], [c.bias for c in convs])
            n4 = _tokens(x4, convs[0].kernel_size)
            n2 = _tokens(x2, convs[1].kernel_size)
            # the three parts as upstream returns them, views of one buffer in packed order
            return buf, buf[:, n4 + n2:], buf[:, n4:n4 + n2], buf[:, :n4]

        buf, c1, c2, c4 = self.cached(embedder, (clean, x2, x4), "packed", compute)
        self.recent = (c1, c2, c4, buf)
        return c1, c2, c4

    def pack(self, upstream, hidden_states, latents_clean=None, latents_history_2x=None, latents_history_4x=None,
             image_rotary_emb=None, image_rotary_emb_clean=None, image_rotary_emb_history_2x=None,
             image_rotary_emb_history_4x=None, height=None, width=None):
        args = (hidden_states, latents_clean, latents_history_2x, latents_history_4x, image_rotary_emb,
                image_rotary_emb_clean, image_rotary_emb_history_2x, image_rotary_emb_history_4x, height, width)
        recent, self.recent = self.recent, None
        tables = (image_rotary_emb_history_4x, image_rotary_emb_history_2x, image_rotary_emb_clean, image_rotary_emb)
        if (recent is None or _upstream_only()
                or not (latents_clean is recent[0] and latents_history_2x is recent[1] and latents_history_4x is recent[2])
                or not all(isinstance(t, _RopeTables) for t in tables)
                or any(t.source[1:] != tables[-1].source[1:] for t in tables)):
            return upstream(self.model, *args)
        from fastgen.ops.framepack import rope_pool

        rope = self.model.rope
        indices = tuple(t.source[0] for t in tables)
        grid_h, grid_w = height, width  # upstream passes the post-patch grid here
        device = hidden_states.device  # upstream's tables live there, whatever device the indices are on

        def compute():
            return rope_pool([i.to(device) for i in indices], (_POOL_4X, _POOL_2X, (1, 1, 1), (1, 1, 1)),
                             grid_h, grid_w, tuple(rope.rope_dim), float(rope.theta))

        tables = self.cached(rope, indices, f"pooled:{grid_h}x{grid_w}:{device}", compute)
        # one copy per step: the context buffer is never written, so nothing that kept an earlier
        # step's sequence (a cache hook, a callback) sees it change
        return torch.cat([recent[3], hidden_states], dim=1), tuple(tables)


def _floor_free(x: torch.Tensor, kernel) -> bool:
    # upstream's 1x convolution is not padded: a size that is no kernel multiple drops the trailing
    # rows there, where the fused op would pad them (never at sizes the pipeline makes)
    return all(n % k == 0 for n, k in zip(x.shape[2:], kernel))


def _tokens(x: torch.Tensor, kernel) -> int:
    kt, kh, kw = kernel
    return -(-x.shape[2] // kt) * -(-x.shape[3] // kh) * -(-x.shape[4] // kw)
