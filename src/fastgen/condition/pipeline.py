"""``FluxConditionPipeline``: ``FluxPipeline`` with image conditions (OminiControl2).

    pipe = FluxConditionPipeline.from_pipe(flux_pipe)
    image = pipe("a cat", conditions=[Condition(canny, adapter="canny")]).images[0]

The pipeline's own ``__call__`` runs unchanged (schedulers, true CFG, callbacks, progress bar);
for the length of the call a diffusers hook gives the transformer the branch forward of
``fastgen.flux_branches`` with the conditions' K/V provider (``fastgen.condition.branches``), and
the condition K/V cache lives and dies with the call.
"""

from __future__ import annotations

import functools
import math

import torch

from fastgen import flux_latents as fl
from fastgen._hooks import call_as_forward
from fastgen.condition.adapters import check_adapters
from fastgen.condition.branches import Branch, BranchState, branch_forward
from fastgen.condition.config import Condition, ConditionConfig, Fill
from fastgen.flux_branches import check_transformer

HOOK = "fastgen.condition"
_IP_ADAPTER_ARGS = ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                    "negative_ip_adapter_image_embeds")

# This module subclasses diffusers' FluxPipeline, whose import prints transformers' torchvision
# notices: ``fastgen.condition`` loads it on first use of the pipeline only.
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


def _check_batch(x, batch: int, what: str) -> None:
    if x.shape[0] not in (1, batch):
        raise ValueError(f"{what} is a batch of {x.shape[0]} images but the generation makes {batch} "
                         f"(prompts x num_images_per_prompt): give " + ("1 image" if batch == 1 else f"1 image or {batch}"))


def _condition_ids(cond: Condition, r: int, c: int, rows: int, cols: int, index: int) -> torch.Tensor:
    """A condition's position ids (r x c tokens on the rows x cols output), checked."""
    if cond.position_scale is not None:
        scale = float(cond.position_scale)
    else:
        scale = rows / r
        if not math.isclose(cols / c, scale, rel_tol=1e-6):
            raise ValueError(f"conditions[{index}].image is {r * 16}x{c * 16} px but the output is {rows * 16}x"
                             f"{cols * 16}: aspect ratios differ; resize the condition or give position_scale")
    return fl.grid_ids(r, c, scale=scale, delta=tuple(float(d) for d in cond.position_delta))


def _condition_branch(pipe, cond: Condition, rows: int, cols: int, batch: int, index: int) -> Branch:
    """One condition, checked and encoded (for callers that have not checked it already)."""
    x = fl.image_tensor(pipe, cond.image, what=f"conditions[{index}].image")
    _check_batch(x, batch, f"conditions[{index}].image")
    ids = _condition_ids(cond, *fl.token_grid(pipe, x.shape[2], x.shape[3]), rows, cols, index)
    tokens = fl.encode(pipe, x)
    return Branch(tokens, ids.to(tokens.device), cond.adapter, math.log(cond.scale))


class FluxConditionPipeline(FluxPipeline):
    """``FluxPipeline`` whose ``__call__`` also takes image conditions and a fill region.

    Build one from a loaded pipeline with ``FluxConditionPipeline.from_pipe(pipe)`` (the
    components are shared, nothing is copied) or ``from_pretrained`` like any pipeline.
    """

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """``FluxPipeline.from_pipe`` for a Flux pipeline; keeps its progress-bar settings."""
        check_transformer(kwargs.get("transformer", getattr(pipeline, "transformer", None)),
                          "FluxConditionPipeline.from_pipe", processors=False, pipe=pipeline)
        new = super().from_pipe(pipeline, **kwargs)
        progress = getattr(pipeline, "_progress_bar_config", None)
        if progress is not None:
            new.set_progress_bar_config(**progress)
        return new

    @torch.no_grad()
    def __call__(self, *args, conditions=(), fill: Fill | None = None, condition_config: ConditionConfig | None = None,
                 **kwargs):
        """``FluxPipeline.__call__`` plus:

        Args:
            conditions: a list of ``fastgen.Condition`` (any number; each one an extra token
                branch with its own position ids, timestep 0, guidance 1, the prompt's pooled
                embedding and its own LoRA adapter).
            fill: a ``fastgen.condition.Fill``: generate only its masked tokens, with the known
                tokens as a condition, and return the known tokens unchanged. The output size
                defaults to the fill image's; the schedule is the one ``FluxPipeline`` uses at the
                output size, and the starting noise at the generated tokens is the noise it starts
                from with the same generator.
            condition_config: ``ConditionConfig`` (asymmetric attention and the K/V cache by
                default).

        Everything else is ``FluxPipeline``'s. Every argument of the conditions and of ``fill`` is
        checked before any model runs (``ValueError`` naming the argument and the expected
        shape). ``self.last_condition_stats`` then holds what the call did: forwards, forwards that
        ran the condition branches, cache bytes, reads and refills, tokens per branch.
        """
        config = ConditionConfig.build(condition_config)
        check_transformer(self.transformer)
        if isinstance(conditions, Condition):
            conditions = [conditions]
        if conditions is None:
            conditions = []
        if not isinstance(conditions, (list, tuple)):
            raise ValueError(f"conditions must be a list of fastgen.Condition, got {type(conditions).__name__}")
        conditions = list(conditions)
        for i, c in enumerate(conditions):
            if not isinstance(c, Condition):
                raise ValueError(f"conditions[{i}] must be a fastgen.Condition, got {type(c).__name__}")
        if fill is not None and not isinstance(fill, Fill):
            raise ValueError(f"fill must be a fastgen.condition.Fill, got {type(fill).__name__}")
        fill_x = fl.image_tensor(self, fill.image, "fill.image") if fill is not None else None
        height, width = kwargs.get("height"), kwargs.get("width")
        default = fill_x.shape[2:] if fill_x is not None else (self.default_sample_size * self.vae_scale_factor,) * 2
        height, width = height or int(default[0]), width or int(default[1])
        kwargs["height"], kwargs["width"] = height, width
        px = fl.pixels_per_token(self)
        if height % px or width % px:
            raise ValueError(f"height and width must be multiples of {px} px with conditions, got {height}x{width}")
        rows, cols = height // px, width // px
        prompt = args[0] if args else kwargs.get("prompt")
        batch = _batch_size(prompt, kwargs.get("prompt_embeds"), kwargs.get("num_images_per_prompt"))
        device = self._execution_device
        fl.check_generator(kwargs.get("generator"), batch, device)
        unsupported = sorted(set(kwargs.get("joint_attention_kwargs") or {}) - {"scale"})
        unsupported += [k for k in _IP_ADAPTER_ARGS if kwargs.get(k) is not None]
        if unsupported:
            raise ValueError(f"{unsupported} are not supported with conditions "
                             "(joint_attention_kwargs takes 'scale' only)")

        # every condition checked before any is encoded
        cond_x, cond_ids = [], []
        for i, c in enumerate(conditions):
            x = fl.image_tensor(self, c.image, f"conditions[{i}].image")
            _check_batch(x, batch, f"conditions[{i}].image")
            cond_x.append(x)
            cond_ids.append(_condition_ids(c, x.shape[2] // px, x.shape[3] // px, rows, cols, i))
        check_adapters(self.transformer, [c.adapter for c in conditions] + [fill.adapter if fill else None])
        hole = None
        if fill is not None:
            if kwargs.get("latents") is not None:
                raise ValueError("fill generates its own starting latents; do not pass latents with it")
            if tuple(fill_x.shape[2:]) != (height, width):
                raise ValueError(f"fill.image is {fill_x.shape[2]}x{fill_x.shape[3]} px but the output is "
                                 f"{height}x{width}: give a (3, {height}, {width}) image, or leave height and "
                                 "width out")
            _check_batch(fill_x, batch, "fill.image")
            hole = fl.token_mask(fill.mask, height, width, px, what="fill.mask")

        branches = []
        for c, x, ids in zip(conditions, cond_x, cond_ids):
            tokens = fl.encode(self, x)
            branches.append(Branch(tokens, ids.to(tokens.device), c.adapter, math.log(c.scale)))
        generate = known = known_tokens = None
        if fill is not None:
            known_tokens = fl.encode(self, fill_x)
            hole, known = hole.to(known_tokens.device), ~hole.to(known_tokens.device)
            if known.any():
                full_ids = fl.grid_ids(rows, cols, device=known_tokens.device)
                branches.append(Branch(known_tokens[:, known], full_ids[known], fill.adapter, math.log(fill.scale)))
            if not hole.any():  # nothing to generate: the image itself, without a denoising step
                self.last_condition_stats = dict(forwards=0, branch_forwards=0, cache_bytes=0, cache_reads=0,
                                                 cache_refills=0,
                                                 condition_tokens=[b.tokens.shape[1] for b in branches],
                                                 generated_tokens=0)
                return self._fill_result(known_tokens.expand(batch, -1, -1), height, width, kwargs)
            # The pipeline denoises the whole canvas, so its schedule is FluxPipeline's at this size:
            # the noise it would start from, known tokens in place; the branch forward runs only
            # the hole's tokens and returns zero velocity for the known ones.
            latents = fl.initial_noise(self, batch, rows, cols, kwargs.get("generator"), device,
                                       fl.latent_dtype(self, kwargs.get("prompt_embeds")))
            latents[:, known.to(latents.device)] = known_tokens[:, known].to(latents)
            kwargs["latents"] = latents
            generate = hole.nonzero().flatten().to(device)

        state = BranchState.create(self.transformer, branches, config, generate)
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.register_hook(_BranchHook(state), HOOK)
        try:
            if fill is None:
                out = super().__call__(*args, **kwargs)
            else:
                output_type, return_dict = kwargs.get("output_type", "pil"), kwargs.get("return_dict", True)
                kwargs.update(output_type="latent", return_dict=False)
                canvas = super().__call__(*args, **kwargs)[0]
                canvas[:, known.to(canvas.device)] = known_tokens[:, known].to(canvas)  # exactly, whatever the sampler
                kwargs.update(output_type=output_type, return_dict=return_dict)
                out = self._fill_result(canvas, height, width, kwargs)
        finally:
            registry.remove_hook(HOOK, recurse=False)
            cache = state.cache
            self.last_condition_stats = {
                "forwards": state.forwards, "branch_forwards": state.branch_forwards,
                "cache_bytes": cache.nbytes if cache is not None else 0,
                "cache_reads": cache.reads if cache is not None else 0,
                "cache_refills": cache.refills if cache is not None else 0,
                "condition_tokens": [b.tokens.shape[1] for b in branches],
                "generated_tokens": int(generate.numel()) if generate is not None else rows * cols,
            }
            state.clear()
        return out

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
    """One generation with conditions on any Flux pipeline: ``FluxConditionPipeline.from_pipe``
    (components shared) then its ``__call__``."""
    cond_pipe = pipe if isinstance(pipe, FluxConditionPipeline) else FluxConditionPipeline.from_pipe(pipe)
    return cond_pipe(prompt, conditions=conditions, **kwargs)
