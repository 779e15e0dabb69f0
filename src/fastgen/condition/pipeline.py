"""``FluxConditionPipeline``: ``FluxPipeline`` with image conditions (OminiControl2).

    pipe = FluxConditionPipeline.from_pipe(flux_pipe)
    image = pipe("a cat", conditions=[Condition(canny, adapter="canny")]).images[0]

The pipeline's own ``__call__`` runs unchanged (schedulers, true CFG, callbacks, progress bar);
for the length of the call a diffusers hook gives the transformer the branch forward of
``fastgen.condition.branches``, and the condition K/V cache lives and dies with the call.
"""

from __future__ import annotations

import functools
import math

import torch

from fastgen import flux_latents as fl
from fastgen.condition.branches import Branch, BranchState, branch_forward
from fastgen.condition.config import Condition, ConditionConfig, Fill
from fastgen._hooks import call_as_forward

HOOK = "fastgen.condition"

try:
    from diffusers import FluxPipeline
    from diffusers.hooks import HookRegistry, ModelHook
except ImportError as exc:  # pragma: no cover - diffusers is a dependency
    raise ImportError(f"fastgen.condition needs diffusers ({exc})") from exc


class _BranchHook(ModelHook):
    """Replaces the transformer's forward by the branch forward while a generation runs."""

    def __init__(self, state: BranchState):
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        # Replacing the forward also skips the hooks beneath this one (offloading): run them around it.
        return call_as_forward(module, functools.partial(branch_forward, module, self.state), *args, skip=HOOK, **kwargs)


def _check_transformer(transformer) -> None:
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from fastgen.patching.processors.flux import FastgenFluxAttnProcessor

    if not isinstance(transformer, FluxTransformer2DModel):
        raise ValueError(f"conditions need a FluxTransformer2DModel, got {type(transformer).__name__}")
    for name, proc in transformer.attn_processors.items():
        if not isinstance(proc, (FluxAttnProcessor, FastgenFluxAttnProcessor)):
            raise ValueError(f"{name} runs {type(proc).__name__}: conditions replace Flux's attention and would "
                             "silently drop it (IP-Adapter?); unload it first")


def _batch_size(prompt, prompt_embeds, num_images_per_prompt) -> int:
    if isinstance(prompt, str):
        n = 1
    elif isinstance(prompt, list):
        n = len(prompt)
    elif prompt_embeds is not None:
        n = prompt_embeds.shape[0]
    else:
        raise ValueError("give a prompt or prompt_embeds")
    return n * (num_images_per_prompt or 1)


def _condition_branch(pipe, cond: Condition, rows: int, cols: int, batch: int, index: int) -> Branch:
    tokens, (r, c) = fl.encode_image(pipe, cond.image, what=f"conditions[{index}].image")
    if tokens.shape[0] not in (1, batch):
        raise ValueError(f"conditions[{index}] has a batch of {tokens.shape[0]} images; give 1 or {batch}")
    if cond.position_scale is not None:
        scale = float(cond.position_scale)
    else:
        scale = rows / r
        if not math.isclose(cols / c, scale, rel_tol=1e-6):
            raise ValueError(f"conditions[{index}] is {r * 16}x{c * 16} px but the output is {rows * 16}x{cols * 16}: "
                             "aspect ratios differ; resize the condition or give position_scale")
    ids = fl.grid_ids(r, c, scale=scale, delta=tuple(float(d) for d in cond.position_delta), device=tokens.device)
    return Branch(tokens, ids, cond.adapter, math.log(cond.scale))


class FluxConditionPipeline(FluxPipeline):
    """``FluxPipeline`` whose ``__call__`` also takes image conditions and a fill region.

    Build one from a loaded pipeline with ``FluxConditionPipeline.from_pipe(pipe)`` (the
    components are shared, nothing is copied) or ``from_pretrained`` like any pipeline.
    """

    @torch.no_grad()
    def __call__(self, *args, conditions=(), fill: Fill | None = None, condition_config: ConditionConfig | None = None,
                 **kwargs):
        """``FluxPipeline.__call__`` plus:

        Args:
            conditions: a list of ``fastgen.Condition`` (any number; each one an extra token
                branch with its own position ids, timestep 0, guidance 1, the prompt's pooled
                embedding and its own LoRA adapter).
            fill: a ``fastgen.condition.Fill``: generate only its masked tokens, with the known
                tokens as a condition, and return the known tokens unchanged.
            condition_config: ``ConditionConfig`` (asymmetric attention and the K/V cache by
                default).

        Everything else is ``FluxPipeline``'s. ``self.last_condition_stats`` then holds what the
        call did: forwards that ran the condition branches, cache bytes, tokens per branch.
        """
        config = ConditionConfig.build(condition_config)
        conditions = list(conditions or [])
        for i, c in enumerate(conditions):
            if not isinstance(c, Condition):
                raise ValueError(f"conditions[{i}] must be a fastgen.Condition, got {type(c).__name__}")
        if fill is not None and not isinstance(fill, Fill):
            raise ValueError(f"fill must be a fastgen.condition.Fill, got {type(fill).__name__}")
        _check_transformer(self.transformer)

        height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
        width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
        kwargs["height"], kwargs["width"] = height, width
        rows, cols = fl.token_grid(self, height, width)
        prompt = args[0] if args else kwargs.get("prompt")
        batch = _batch_size(prompt, kwargs.get("prompt_embeds"), kwargs.get("num_images_per_prompt"))

        branches = [_condition_branch(self, c, rows, cols, batch, i) for i, c in enumerate(conditions)]
        image_ids = known = known_tokens = None
        if fill is not None:
            if kwargs.get("latents") is not None:
                raise ValueError("fill generates its own starting latents; do not pass latents with it")
            known_tokens, (r, c) = fl.encode_image(self, fill.image, what="fill.image")
            if (r, c) != (rows, cols):
                raise ValueError(f"fill.image is {r * 16}x{c * 16} px but the output is {height}x{width}")
            hole = fl.token_mask(fill.mask, height, width, fl.pixels_per_token(self)).to(known_tokens.device)
            known = ~hole
            full_ids = fl.grid_ids(rows, cols, device=known_tokens.device)
            if known.any():
                branches.append(Branch(known_tokens[:, known], full_ids[known], fill.adapter, math.log(fill.scale)))
            image_ids = full_ids[hole]
            if not hole.any():  # nothing to generate: the image itself, without a denoising step
                self.last_condition_stats = dict(forwards=0, branch_forwards=0, cache_bytes=0, cache_reads=0,
                                                 condition_tokens=[b.tokens.shape[1] for b in branches],
                                                 generated_tokens=0)
                return self._fill_result(known_tokens.expand(batch, -1, -1), height, width, kwargs)
            kwargs["latents"] = self._fill_noise(batch, rows, cols, hole, kwargs.get("generator"))

        state = BranchState.create(self.transformer, branches, config, image_ids)
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.register_hook(_BranchHook(state), HOOK)
        try:
            if fill is None:
                out = super().__call__(*args, **kwargs)
            else:
                output_type, return_dict = kwargs.get("output_type", "pil"), kwargs.get("return_dict", True)
                kwargs.update(output_type="latent", return_dict=False)
                generated = super().__call__(*args, **kwargs)[0]
                canvas = known_tokens.to(generated.dtype).expand(generated.shape[0], -1, -1).clone()
                canvas[:, ~known] = generated
                kwargs.update(output_type=output_type, return_dict=return_dict)
                out = self._fill_result(canvas, height, width, kwargs)
        finally:
            registry.remove_hook(HOOK, recurse=False)
            self.last_condition_stats = {
                "forwards": state.forwards, "branch_forwards": state.branch_forwards,
                "cache_bytes": state.cache.nbytes if state.cache is not None else 0,
                "cache_reads": state.cache.reads if state.cache is not None else 0,
                "condition_tokens": [b.tokens.shape[1] for b in branches],
                "generated_tokens": int(image_ids.shape[0]) if image_ids is not None else rows * cols,
            }
            state.clear()
        return out

    def _fill_noise(self, batch, rows, cols, hole, generator):
        # The noise a full generation with this seed would start from, at the generated tokens only.
        from diffusers.utils.torch_utils import randn_tensor

        channels = self.transformer.config.in_channels // 4
        shape = (batch, channels, 2 * rows, 2 * cols)
        noise = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        packed = self._pack_latents(noise, batch, channels, 2 * rows, 2 * cols)
        return packed[:, hole.to(packed.device)]

    def _fill_result(self, canvas, height, width, kwargs):
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

        output_type, return_dict = kwargs.get("output_type", "pil"), kwargs.get("return_dict", True)
        if output_type == "latent":
            image = canvas
        else:
            lat = self._unpack_latents(canvas, height, width, self.vae_scale_factor)
            lat = (lat / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(lat.to(device=self.vae.device, dtype=self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=image) if return_dict else (image,)


def generate(pipe, prompt=None, conditions=(), **kwargs):
    """One generation with conditions on any ``FluxPipeline``: ``FluxConditionPipeline.from_pipe``
    (components shared) then its ``__call__``."""
    cond_pipe = pipe if isinstance(pipe, FluxConditionPipeline) else FluxConditionPipeline.from_pipe(pipe)
    return cond_pipe(prompt, conditions=conditions, **kwargs)
