"""``fastgen.tune``: decide the automatic backends of a pipeline ahead of time."""

from __future__ import annotations

import contextlib

import torch

from fastgen.ops import autotune as tuning
from fastgen.ops.autotune import Decision


def _is_compiled(module) -> bool:
    # Anywhere inside: torch.compile(model) wraps it (OptimizedModule, ``_orig_mod``), model.compile()
    # compiles in place (``_compiled_call_impl``), and a forward replaced by torch.compile(fn) carries
    # dynamo's ``_torchdynamo_orig_callable``; blocks may be compiled one by one (regional compilation).
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
               or hasattr(vars(m).get("forward"), "_torchdynamo_orig_callable") for m in module.modules())


def tune(pipe, *, num_inference_steps: int = 2, config=None, **call_kwargs) -> list[Decision]:
    """Make the ``backend="auto"`` decisions of every attention and prologue shape ``pipe`` meets at
    one size, so the first real generation at that size spends nothing on them.

    Runs ``pipe`` once for ``num_inference_steps`` steps (``output_type="latent"``, under
    ``torch.inference_mode()``) with fastgen patched in: by ``config`` (a ``PatchConfig``) for the
    duration of the call if the pipeline is not patched, else as it is. Decisions are measured on the
    pipeline's device and stored in the decisions file (``fastgen.ops.autotune``), where every later
    process finds them. Timings do not depend on the prompt, but shapes do: pass the call arguments
    that set them (``height``, ``width``, ``num_frames``, ``num_images_per_prompt``,
    ``guidance_scale`` for CFG batches, ``max_sequence_length``).

    Args:
        pipe: a diffusers pipeline fastgen supports.
        num_inference_steps: steps to run (default 2: the first step also fills caches, the
            second runs what every later step runs).
        config: the ``PatchConfig`` to patch with if ``pipe`` is not patched (default: defaults).
        **call_kwargs: the pipeline call's arguments; ``prompt`` defaults to ``""`` when neither it
            nor ``prompt_embeds`` is given.

    Returns:
        The decisions made or read during the call (empty where there is nothing to decide, e.g.
        on a CPU, where PyTorch runs every attention).

    Raises:
        RuntimeError: when autotuning is off (``FASTGEN_AUTOTUNE=0``): nothing would be decided.
        ValueError: for ``num_inference_steps`` below 1; for a pipeline whose denoiser is already
            compiled (``torch.compile`` bakes the backends in when it traces: tune first, then compile).
    """
    from fastgen.patching import is_patched, patch
    from fastgen.patching.generation import pipeline_models
    from fastgen.patching.registry import architecture_of

    if not tuning.enabled():
        raise RuntimeError("fastgen.tune: autotuning is off (FASTGEN_AUTOTUNE=0), so nothing would be decided; "
                           "unset it to measure")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    compiled = [type(getattr(m, "_orig_mod", m)).__name__ for m in pipeline_models(pipe)
                if architecture_of(getattr(m, "_orig_mod", m)) is not None and _is_compiled(m)]
    if compiled:
        raise ValueError(f"fastgen.tune: {', '.join(compiled)} is compiled already, and torch.compile fixes the "
                         "backends when it traces (no timing runs while it does): call fastgen.tune before "
                         "torch.compile, then compile")
    if "prompt" not in call_kwargs and "prompt_embeds" not in call_kwargs:
        call_kwargs["prompt"] = ""
    start = len(tuning.TUNER.log)
    scope = contextlib.nullcontext() if is_patched(pipe) else patch(pipe, config)
    with scope, torch.inference_mode():
        pipe(num_inference_steps=num_inference_steps, output_type="latent", **call_kwargs)
    return tuning.TUNER.log[start:]
