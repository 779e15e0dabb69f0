"""Token merging in one patched model: the per-call facts its merging blocks read.

A ``Merging`` belongs to one model's patch. The model's own hook tells it, at every forward, the
latent size (UNet) or token grid (DiT) and the timestep; blocks then ask it for their grid, whether
merging is on at this step, and the dst map of their grid.

Randomness (``ToMeConfig.use_rand``): the dst maps of a forward are drawn from a generator seeded
with (seed, index of the forward in the generation), where the seed is ``ToMeConfig.seed``, else
the pipeline call's generator's seed (read, never drawn from: the pipeline's own noise is unchanged),
else 0. One map per grid per forward is shared by every block of that grid and by the whole batch,
so both halves of a CFG batch get the same map whatever the batch size (tomesd turns randomness off
for odd batches instead), and one seed gives the same images run after run. Outside a generation
every forward is the first one.
"""

from __future__ import annotations

import torch

from fastgen._validity import capturing
from fastgen._warnings import warn_once
from fastgen.merging.config import ToDoConfig, ToMeConfig
from fastgen.merging.matching import dst_grid

# Where an attention module holds (PatchState, Reduction) of its current call: set by that patch's
# forward pre-hook on the module (``fastgen.merging.dit``), removed by its post-hook, read by the
# processor (``fastgen.patching.core.reduction_of``). The patch is kept with it so that a reduction
# left behind by a forward that raised is never read by another patch's processor.
REDUCTION = "_fastgen_reduction"

_MIX = 0x9E3779B97F4A7C15  # splits (seed, forward) into well-separated generator seeds


class Merging:
    """ToMe / ToDo state of one patched model.

    Attributes:
        tome, todo: the configs (either may be None).
        size: the current forward's latent (H, W) for UNets, token grid (F, H, W) for DiTs.
        rows: the report: (block path, level, what merges there), filled when the patch is built.
    """

    def __init__(self, model, tome: ToMeConfig | None, todo: ToDoConfig | None, state):
        self.model_name = type(model).__name__
        self.tome, self.todo = tome, todo
        # held strongly, as the model's patch holds it: pickled and deep-copied with the model, and
        # its step cache (PatchState gives a copy a fresh one) read through it, never kept apart
        self.state = state
        self.size: tuple[int, ...] | None = None
        self.rows: list[tuple[str, int, str]] = []
        self.first_level = 1
        self._generation = None
        self._forward = -1
        self._step = 0
        self._last_t = None
        self._maps: dict[tuple, torch.Tensor] = {}

    @property
    def patch_state(self):
        """The ``PatchState`` of the patch this merging belongs to."""
        return self.state

    @property
    def cache(self):
        return self.state.kv_cache

    # --- per forward ---------------------------------------------------------------------------

    def begin_forward(self, size: tuple[int, ...], timestep=None) -> None:
        """Called by the model's hook before each forward."""
        generation = self.cache.generations if self.cache.open else None
        if generation is None or generation != self._generation:
            self._generation, self._forward, self._step, self._last_t = generation, -1, 0, None
        self._forward += 1
        if self._needs_steps() and timestep is not None and self._scheduler() is None:
            # no scheduler step_index to follow: the step advances when the timestep changes (two CFG
            # passes of one step share it), read on the host only then
            t = timestep.flatten()[0].item() if torch.is_tensor(timestep) else float(timestep)
            if self._last_t is not None and t != self._last_t:
                self._step += 1
            self._last_t = t
        self.size = tuple(int(s) for s in size)
        self._maps.clear()

    def can_match(self) -> bool:
        """Whether ToMe's matching may run now: not during CUDA-graph capture, where its host-built
        dst map and index lists cannot be copied to the device (said once; ToDo still applies)."""
        if capturing():
            warn_once(f"merging-capture:{self.model_name}",
                      f"ToMe does not merge in {self.model_name} while a CUDA graph is captured (its dst maps are "
                      "drawn on the host at every forward): the captured graph runs unmerged attention")
            return False
        return True

    def _needs_steps(self) -> bool:
        return any(c is not None and c.steps != (0.0, 1.0) for c in (self.tome, self.todo))

    def on(self, config) -> bool:
        """Whether ``config`` (the ToMe or ToDo config) applies at the current step."""
        if config is None:
            return False
        start, stop = config.steps
        if (start, stop) == (0.0, 1.0):
            return True
        position = self._position()
        if position is None:
            warn_once(f"merging-steps:{self.model_name}",
                      f"{type(config).__name__}.steps={config.steps} needs the number of denoising steps, which only "
                      "a patched pipeline's call gives: merging at every step of this call")
            return True
        step, total = position
        return start <= step / total < stop

    def _position(self) -> tuple[int, int] | None:
        """(scheduler steps taken, scheduler steps in all) of the running pipeline call, or None.

        The scheduler's own ``step_index`` over its ``timesteps`` where it keeps one (Euler, Heun,
        DPM-Solver, flow matching: Heun's repeated timesteps count as the steps they are); else the
        timesteps seen change by change over the pipeline's ``_num_timesteps``."""
        pipe = self.state.pipeline if self.cache.open else None
        if pipe is None:
            return None
        scheduler = self._scheduler()
        if scheduler is not None:
            return int(scheduler.step_index or 0), len(scheduler.timesteps)
        total = getattr(pipe, "_num_timesteps", None)
        return (self._step, int(total)) if isinstance(total, int) and total > 0 else None

    def _scheduler(self):
        """The running pipeline call's scheduler where it counts its own steps (``step_index`` over
        its ``timesteps``), else None."""
        pipe = self.state.pipeline if self.cache.open else None
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        timesteps = getattr(scheduler, "timesteps", None)
        if hasattr(scheduler, "step_index") and timesteps is not None and len(timesteps) > 0:
            return scheduler
        return None

    def cells(self, grid: tuple[int, int, int], where: str) -> tuple[int, int, int] | None:
        """``ToMeConfig``'s (sf, sy, sx) cell for an (F, H, W) grid, or None where it does not fit
        (said once per model and grid: nothing merges there). Frames per cell beyond the grid's
        (``sf`` on images) count as 1, said once."""
        tome = self.tome
        F, H, W = grid
        sf = tome.sf
        if sf > F:
            if F == 1:
                warn_once(f"merging-sf:{self.model_name}",
                          f"ToMeConfig.sf={sf} applies to video: {self.model_name}'s image tokens merge in 2-D cells")
            else:
                warn_once(f"merging-sf:{self.model_name}:{F}",
                          f"ToMeConfig.sf={sf} is more than the {F} frames of {self.model_name}'s grid: cells of {F} frames")
            sf = F
        if tome.sy > H or tome.sx > W:
            warn_once(f"merging-cell:{self.model_name}:{grid}",
                      f"token merging skips {where} of {self.model_name}: a ({tome.sy}, {tome.sx}) cell does not fit "
                      f"its {F} x {H} x {W} token grid")
            return None
        return sf, tome.sy, tome.sx

    # --- dst maps ------------------------------------------------------------------------------

    def seed(self) -> int:
        if self.tome is not None and self.tome.seed is not None:
            return self.tome.seed
        gen = self.cache.generator if self.cache.open else None
        if isinstance(gen, (list, tuple)):
            gen = gen[0] if gen else None
        return int(gen.initial_seed()) if isinstance(gen, torch.Generator) else 0

    def dst_mask(self, grid: tuple[int, int, int], cells: tuple[int, int, int] | None = None) -> torch.Tensor:
        """(F * H, W) bool dst mask of a (F, H, W) token grid for the current forward (F = 1 for
        images), with ``cells`` (sf, sy, sx) (default ``ToMeConfig``'s, see ``cells``); the same tensor
        for every block of that grid. Kept on the CPU whatever the model's device: the matching reads
        its layout on the host, which a device mask would cost a synchronisation."""
        tome = self.tome
        cells = cells or (tome.sf, tome.sy, tome.sx)
        key = (grid, cells)
        mask = self._maps.get(key)
        if mask is None:
            gen = None
            if tome.use_rand:
                gen = torch.Generator().manual_seed((self.seed() * _MIX + self._forward) % (1 << 63))
            mask = dst_grid_3d(*grid, *cells, use_rand=tome.use_rand, generator=gen, device="cpu")
            self._maps[key] = mask
        return mask

    # --- the report ----------------------------------------------------------------------------

    def report(self) -> str:
        """Which blocks merge, one line per level."""
        if not self.rows:
            return f"{self.model_name}: no block merges or downsamples tokens"
        levels: dict[tuple[int, str], int] = {}
        for _, level, what in self.rows:
            levels[(level, what)] = levels.get((level, what), 0) + 1
        parts = [f"{n} block(s) at level {level} ({what})" for (level, what), n in sorted(levels.items())]
        return f"{self.model_name}: " + ", ".join(parts)


def dst_grid_3d(f: int, h: int, w: int, sf: int, sy: int, sx: int, *, use_rand: bool,
                generator: torch.Generator | None, device) -> torch.Tensor:
    """(f * h, w) bool mask: one dst token per whole (sf, sy, sx) cell of an (f, h, w) grid, drawn
    from ``generator`` (top-left without randomness); leftover frames, rows and columns stay src.
    For f = sf = 1 it is ``dst_grid`` (tomesd's map for the same generator)."""
    if f == 1 and sf == 1:
        return dst_grid(h, w, sx, sy, use_rand=use_rand, generator=generator, device=device)
    if sf > f or sy > h or sx > w:
        raise ValueError(f"a ({sf}, {sy}, {sx}) cell does not fit in an ({f}, {h}, {w}) token grid")
    fs, hs, ws = f // sf, h // sy, w // sx
    if use_rand:
        pick = torch.randint(sf * sy * sx, (fs, hs, ws, 1), generator=generator).to(device)
    else:
        pick = torch.zeros(fs, hs, ws, 1, dtype=torch.int64, device=device)
    cells = torch.zeros(fs, hs, ws, sf * sy * sx, dtype=torch.bool, device=device).scatter_(3, pick, True)
    cells = cells.view(fs, hs, ws, sf, sy, sx).permute(0, 3, 1, 4, 2, 5).reshape(fs * sf, hs * sy, ws * sx)
    mask = torch.zeros(f, h, w, dtype=torch.bool, device=device)
    mask[: fs * sf, : hs * sy, : ws * sx] = cells
    return mask.view(f * h, w)


def tokens_merged(n: int, ratio: float) -> int:
    """tomesd's r: ``int(n * ratio)`` tokens merged away out of n."""
    return int(n * ratio)
