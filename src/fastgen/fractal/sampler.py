"""Sampling FractalGen models: ``sample`` (one signature for every sampler), the ``SamplingPlan`` the
samplers share, and the ``reference`` sampler.

The reference sampler is the method as the paper defines it (arXiv 2502.17437, sec. 3): a
recursive, depth-first walk that generates one patch's whole subtree at a time. At a node of level
k it runs the level's transformer once per iteration; for each token the iteration predicts, it
hands the token's output (MAR: and its four neighbours') to level k+1, which generates the token's
sub-patch the same way, down to the pixel head, which draws R, G, B. Every image of the batch walks
the tree in step (CFG doubles the rows, conditional first); all randomness comes from the keyed
RNG (``fastgen.fractal.rng``), so any sampler that draws by the same keys — the block sampler, which
batches every patch of a parent iteration into one child call — gives the same images.

What the reference mirrors of the official ``models/*.py`` ``sample`` methods: MAR orders and
masking schedule, CFG layout and schedule, the guiding pixel drawn before a node's first
iteration, temperature multiplying the logits, the probability filter, the AR level's KV cache
(allocated per node, as the official code does) and the pixel head's full recompute per channel.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastgen.fractal import rng
from fastgen.fractal.block import sample_block
from fastgen.fractal.config import AR, MAR
from fastgen.fractal.model import FractalGen, PixelHead, ids_to_values, unpatchify, values_to_uint8
from fastgen.fractal.schedule import CFG_SCHEDULES, LevelSchedule, schedules

SAMPLERS = ("reference", "block")


@dataclass(frozen=True)
class SamplingPlan:
    """A validated sampling request: what every sampler reads.

    Attributes:
        labels: ``(B,)`` int64 class labels on the model's device.
        cfg: CFG scale (1.0: no guidance, no doubled rows).
        cfg_schedule: ``"linear"`` or ``"constant"`` (applies to the top level; below, constant).
        temperature: multiplies the pixel heads' logits.
        filter_threshold: the CFG probability filter (``rng.guided_logits``).
        seed: the keyed RNG's seed, in ``[0, 2**64)``.
        levels: ``LevelSchedule`` per level.
        progress: show a progress bar per top-level iteration.
    """

    labels: torch.Tensor
    cfg: float
    cfg_schedule: str
    temperature: float
    filter_threshold: float
    seed: int
    levels: tuple[LevelSchedule, ...]
    progress: bool

    @property
    def batch(self) -> int:
        return self.labels.shape[0]

    @property
    def guided(self) -> bool:
        """Whether rows are doubled for CFG (``[conditional B; unconditional B]`` at every level)."""
        return self.cfg != 1.0


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _number(name: str, value, low: float, *, strict: bool = False) -> float:
    # numbers.Real: Python and NumPy ints and floats alike; infinity is refused (inf * 0 logits are NaN)
    # and within float32's range: the logits are scaled in float32 (1e39 would be inf there)
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or abs(value) > _FLOAT32_MAX):
        raise ValueError(f"{name} must be a finite number (within float32's range), got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _labels(model: FractalGen, class_labels) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(class_labels, torch.Tensor):
        labels = class_labels
    elif hasattr(class_labels, "__array__") and not isinstance(class_labels, numbers.Number):
        labels = torch.as_tensor(class_labels)  # a NumPy array: its dtype is checked below
    else:
        if isinstance(class_labels, numbers.Number):
            items = [class_labels]
        else:
            try:
                items = list(class_labels)
            except TypeError:
                raise ValueError(f"class_labels must be an int, a sequence of ints or a 1-D integer tensor, "
                                 f"got {class_labels!r}") from None
        # 0-d tensors and arrays (a list of them, as iterating over a tensor gives): their Python numbers
        items = [v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v for v in items]
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
            raise ValueError(f"class_labels must be integers, got {class_labels!r}")
        n = model.config.num_classes
        bad = [int(v) for v in items if not 0 <= v < n]  # before int64: 2**70 does not fit one
        if bad:
            raise ValueError(f"class labels must be in [0, {n}) for this model, got {bad[:8]}")
        labels = torch.tensor([int(v) for v in items], dtype=torch.int64)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
    labels = labels.reshape(-1) if labels.dim() == 0 else labels
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"class_labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
    n = model.config.num_classes
    bad = labels.cpu()
    if bad.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no comparison kernels for these on a CPU
        bad = bad.to(torch.float64) if bad.dtype == torch.uint64 else bad.to(torch.int64)
    bad = bad[(bad < 0) | (bad >= n)]
    if bad.numel():
        raise ValueError(f"class labels must be in [0, {n}) for this model, got {bad.tolist()[:8]}")
    return labels.to(device=device, dtype=torch.int64)


def _num_iters(model: FractalGen, num_iter) -> tuple[int, ...]:
    config = model.config
    if num_iter is None:
        return config.num_iters
    if isinstance(num_iter, numbers.Integral) and not isinstance(num_iter, bool):
        values = tuple(int(num_iter) if lv.kind == MAR else lv.seq_len for lv in config.levels)
    elif (isinstance(num_iter, Sequence) or hasattr(num_iter, "__array__")) and len(num_iter) == config.num_levels:
        values = tuple(v.item() if hasattr(v, "item") else v for v in num_iter)  # NumPy / tensor elements
    else:
        raise ValueError(f"num_iter must be None, an int (every MAR level) or one int per level "
                         f"({config.num_levels}), got {num_iter!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"iterations must be positive integers, got {num_iter!r}")
    values = tuple(int(v) for v in values)
    # As the official samplers: an AR level makes one iteration per token, a MAR level at most L.
    return tuple(lv.seq_len if lv.kind == AR else min(v, lv.seq_len) for lv, v in zip(config.levels, values))


def _seed(seed) -> int:
    if isinstance(seed, torch.Generator):
        # One draw from the generator (on its device), once per call: the keyed RNG takes it from there.
        return int(torch.randint(0, 2 ** 63 - 1, (), generator=seed, device=seed.device))
    rng._check_seed(seed)
    return int(seed)


def make_plan(model: FractalGen, class_labels, *, cfg: float = 1.0, cfg_schedule: str = "linear",
              temperature: float = 1.0, num_iter=None, filter_threshold: float = 1e-4,
              seed: int | torch.Generator = 0, progress: bool = True) -> SamplingPlan:
    """Validate ``sample``'s arguments into a ``SamplingPlan`` (see ``sample``).

    Raises:
        ValueError: as ``sample``.
    """
    if not isinstance(model, FractalGen):
        raise ValueError(f"model must be a fastgen.fractal.FractalGen, got {type(model).__name__}")
    kinds = {(p.dtype, p.device) for p in model.parameters()}
    if len(kinds) != 1:
        found = ", ".join(sorted(f"{dtype} on {device}" for dtype, device in kinds))
        raise ValueError(f"the model's parameters must share one dtype and device (model.to(...)), found {found}")
    if next(model.parameters()).device.type == "meta":
        raise ValueError("the model is on the meta device: load weights into it (load_state_dict(..., assign=True)) "
                         "or build it on a real device")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    filter_threshold = _number("filter_threshold", filter_threshold, 0.0)
    if filter_threshold > 1:
        raise ValueError(f"filter_threshold is a probability, at most 1, got {filter_threshold}")
    return SamplingPlan(labels=_labels(model, class_labels), cfg=_number("cfg", cfg, 1.0), cfg_schedule=cfg_schedule,
                        temperature=_number("temperature", temperature, 0.0, strict=True),
                        filter_threshold=filter_threshold, seed=_seed(seed),
                        levels=schedules(model.config, _num_iters(model, num_iter)), progress=bool(progress))


class ReferenceSampler:
    """The depth-first reference sampler (module docstring): ``ReferenceSampler(model, plan)()`` gives the
    normalised images ``(B, 3, H, W)``.

    Args:
        model: the model.
        plan: from ``make_plan``.
        on_call: called as ``on_call(kind, level, iterations)`` before each model forward, with kind
            ``"level"`` (a level transformer), ``"guide"`` (a guiding-pixel head) or ``"pixel"`` (the
            pixel head), and ``iterations`` the tuple of iteration indices from the top down to the
            iteration (or channel) the forward serves: the forwards that share it are those a block
            sampler makes as one.
    """

    def __init__(self, model: FractalGen, plan: SamplingPlan,
                 on_call: Callable[[str, int, tuple[int, ...]], None] | None = None):
        self.model, self.plan, self.on_call = model, plan, on_call
        self.config = model.config
        self.modules = model.levels
        self.dtype = next(model.parameters()).dtype
        self.images = torch.arange(plan.batch, device=plan.labels.device)
        self._bar = None

    def __call__(self) -> torch.Tensor:
        from tqdm import tqdm

        plan = self.plan
        conds = self.model.class_conditions(plan.labels, plan.guided)
        path = torch.zeros(plan.batch, dtype=torch.int64, device=plan.labels.device)
        with tqdm(total=plan.levels[0].num_iter, desc="fractal (reference)", unit="it",
                  disable=not plan.progress) as self._bar:
            return self.node(0, conds, path, (), plan.cfg)

    def _double(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.plan.guided else x

    def _record(self, kind: str, level: int, iterations: tuple[int, ...]) -> None:
        if self.on_call is not None:
            self.on_call(kind, level, iterations)

    def node(self, k: int, conds: torch.Tensor, path: torch.Tensor, iterations: tuple[int, ...],
             cfg: float) -> torch.Tensor:
        """Generate one node of level ``k`` for every image: ``(B, 3, s, s)`` normalised values.

        Args:
            conds: ``(B', n, C)`` the node's conditions (``B' = 2B`` with CFG).
            path: ``(B,)`` int64 the node's path per image (``rng`` module docstring).
            iterations: the iteration indices of the ancestors, top first.
            cfg: the node's CFG scale (the top level's is the user's, below the top-level
                iteration's scale).
        """
        plan, lv, module = self.plan, self.config.levels[k], self.modules[k]
        sched = plan.levels[k]
        scales = sched.cfg_scales(cfg, plan.cfg_schedule if k == 0 else "constant")
        b, length = path.shape[0], lv.seq_len
        rows = torch.arange(b, device=path.device)
        all_rows = torch.arange(conds.shape[0], device=path.device)  # the conditional rows, then the unconditional
        tokens = torch.zeros(b, length, lv.token_dim, dtype=self.dtype, device=path.device)
        if lv.kind == MAR:
            guide = None
            if lv.guiding_pixel:
                noise = rng.channel_gumbel(plan.seed, self.images, path, level=k, purpose=rng.GUIDE)
                guide = self._double(self.pixel(module.guiding_pixel_loss, conds[:, 0], noise, cfg=cfg,
                                                record=("guide", k, iterations)))
            order = rng.permutation(plan.seed, self.images, path, level=k, length=length)
            masked = torch.ones(b, length, dtype=torch.bool, device=path.device)
        else:
            cache = module.new_cache(conds.shape[0])
        last = k + 1 == self.config.num_levels
        if last:
            # Every child pixel's noise in one draw: keyed by the child's path, so when it is drawn
            # does not matter (and one Philox call per node instead of one per pixel).
            child_paths = path[:, None] * length + torch.arange(length, device=path.device)
            pixel_noise = rng.channel_gumbel(plan.seed, self.images[:, None], child_paths, level=k + 1,
                                             purpose=rng.PIXEL)  # (B, L, 3, 256)
        for s, (start, stop) in enumerate(sched.bounds):
            here = iterations + (s,)
            self._record("level", k, here)
            if lv.kind == MAR:
                feats = module(self._double(tokens), self._double(masked), conds, guide)  # (B', L, 5, D)
                picked = order[:, start:stop]
            else:
                x = module.embed(self._double(tokens), conds, s, s + 1)
                feats = module.hidden(x, cache=cache, pos=s)  # (B', 1, D): token s's one condition
                picked = torch.full((b, 1), s, dtype=torch.int64, device=path.device)
            for j in range(picked.shape[1]):  # one patch's subtree at a time
                tok = picked[:, j]
                child = feats[all_rows, self._double(tok)] if lv.kind == MAR else feats  # (B', 5 | 1, D)
                if last:
                    value = self.pixel(self.model.pixel_head, child[:, 0], pixel_noise[rows, tok], cfg=scales[s],
                                       record=("pixel", k + 1, here))
                else:
                    value = self.node(k + 1, child, path * length + tok, here, scales[s]).flatten(1)
                tokens[rows, tok] = value.to(self.dtype)
            if lv.kind == MAR:
                masked[rows[:, None], picked] = False
            if k == 0:
                self._bar.update()
        return unpatchify(tokens, lv.grid, lv.patch_size)

    def pixel(self, head: PixelHead, cond: torch.Tensor, noise: torch.Tensor, *, cfg: float,
              record: tuple[str, int, tuple[int, ...]]) -> torch.Tensor:
        """Draw R, G, B from ``head`` for every image: ``(B, 3)`` normalised values.

        Args:
            cond: ``(B', C)`` the condition feature.
            noise: ``(B, 3, 256)`` the draw's keyed Gumbel noise (``rng.channel_gumbel``).
            record: ``(kind, level, iterations)`` for ``on_call`` (the channel is appended).

        The head runs in full for each channel (official ``PixelLoss.sample``), no KV cache.
        """
        plan = self.plan
        b = noise.shape[0]
        ids = torch.zeros(b, 3, dtype=torch.int64, device=noise.device)
        kind, level, iterations = record
        for c in range(3):
            self._record(kind, level, iterations + (c,))
            # Positions 0..c recomputed in full (the official head recomputes its whole sequence; the
            # positions after c cannot change channel c's logits, it is causal).
            logits = head.logits(head.hidden(head.embed(cond, self._double(ids), 0, c + 1))[:, c], c)
            logits = rng.guided_logits(logits[:b], logits[b:] if plan.guided else None, cfg=cfg,
                                       temperature=plan.temperature, filter_threshold=plan.filter_threshold)
            ids[:, c] = rng.sample_categorical(logits, noise[:, c])
        return ids_to_values(ids, self.dtype)


def _reference(model: FractalGen, plan: SamplingPlan) -> torch.Tensor:
    return ReferenceSampler(model, plan)()


# The sampler implementations: (model, plan) -> normalised images (B, 3, H, W).
_IMPLEMENTATIONS: dict[str, Callable[[FractalGen, SamplingPlan], torch.Tensor]] = {
    "reference": _reference, "block": sample_block}


def sample(model: FractalGen, class_labels, *, sampler: str = "reference", cfg: float = 1.0,
           cfg_schedule: str = "linear", temperature: float = 1.0, num_iter=None, filter_threshold: float = 1e-4,
           seed: int | torch.Generator = 0, progress: bool = True) -> torch.Tensor:
    """Sample class-conditional images from a FractalGen model.

    Args:
        model: a ``FractalGen`` (any device and float dtype; it runs where its parameters are).
        class_labels: ``B`` class indices (int, sequence or 1-D integer tensor) in ``[0, num_classes)``.
        sampler: ``"reference"`` (depth first, one patch's subtree at a time) or ``"block"``
            (every patch of a parent iteration in one batched call, static caches, CUDA graphs on a
            GPU: ``fastgen.fractal.block``; the same images for one seed, bit for bit in float32 on a CPU).
        cfg: classifier-free guidance scale, >= 1 (1: none). Published: ``PRESET_SAMPLING``.
        cfg_schedule: ``"linear"`` (default; the top level's scale grows with the tokens generated,
            levels below use their top-level iteration's scale) or ``"constant"``.
        temperature: > 0, *multiplies* the pixel heads' logits (official semantics).
        num_iter: iterations per level: None (the config's: MAR 64/16/16 at 256 px, MAR 64/16 and AR
            256/16 at 64 px), an int for every MAR level, or one int per level. AR levels always make one per token; a MAR
            level makes at most one per token.
        filter_threshold: with CFG, conditional probability below which guidance is held back
            (official default 1e-4).
        seed: int (Python or NumPy) in ``[0, 2**64)`` or a ``torch.Generator`` (one number is drawn from it). Image ``i``
            depends on the seed, its label, ``i`` and the settings, not on the rest of the batch.
        progress: a progress bar per top-level iteration.

    Returns:
        uint8 ``(B, 3, H, W)`` on the model's device: an ordinary tensor (sampling runs under
        ``torch.inference_mode``; the result is not an inference tensor unless the caller's own code
        runs in inference mode).

    Raises:
        ValueError: for an unknown sampler, labels out of range, cfg < 1, a non-positive temperature,
            cfg or temperature not finite, an unknown schedule, bad iterations or seed, or a model whose
            parameters do not share one dtype and device.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; the samplers are {SAMPLERS}")
    plan = make_plan(model, class_labels, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                     num_iter=num_iter, filter_threshold=filter_threshold, seed=seed, progress=progress)
    with torch.inference_mode():
        images = values_to_uint8(_IMPLEMENTATIONS[sampler](model, plan))
    # Outside inference mode a clone is an ordinary tensor (users write into images, e.g. a grid's border).
    return images.clone()


def image_grid(images: torch.Tensor, nrow: int | None = None, scale: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 images ``(B, 3, H, W)`` as one grid ``(3, rows * (H s + pad) + pad, nrow * (W s + pad) + pad)``
    on black, each image upscaled ``s`` times (nearest; default: the smallest ``s`` giving 64 px).

    Args:
        images: uint8 ``(B, 3, H, W)``, at least one image of at least one pixel.
        nrow: images per row, an int >= 1 (default ``ceil(sqrt(B))``).
        scale: the upscaling ``s``, an int >= 1 (default: the smallest giving 64 px).
        pad: black pixels between and around the images, an int >= 0 (default 2).

    Raises:
        ValueError: for images that are not uint8 ``(B, 3, H, W)`` or hold no pixel, ``nrow`` / ``scale``
            that are not ints >= 1 (None: the default), or ``pad`` that is not an int >= 0.
    """
    import numbers

    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {got}")
    if images.numel() == 0:
        raise ValueError(f"images must hold at least one image of at least 1 x 1 pixels, got {tuple(images.shape)}")
    for name, value, low in (("nrow", nrow, 1), ("scale", scale, 1), ("pad", pad, 0)):
        if value is None and name != "pad":
            continue  # the default
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            default = "" if name == "pad" else " (or None for the default)"
            raise ValueError(f"{name} must be an int >= {low}{default}, got {value!r}")
    b, _, height, width = images.shape
    nrow = math.ceil(math.sqrt(b)) if nrow is None else int(nrow)
    scale = max(1, -(-64 // max(height, width))) if scale is None else int(scale)
    pad = int(pad)
    rows = -(-b // nrow)
    h, w = height * scale, width * scale
    grid = torch.zeros(3, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    big = images.cpu().repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = big[i]
    return grid

