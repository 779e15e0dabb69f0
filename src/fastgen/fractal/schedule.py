"""FractalGen's sampling schedules as data: which tokens each iteration of a level predicts, the CFG
scale of each iteration, and how many model calls a sampler makes.

MAR (official ``models/mar.py``, ``MAR.sample``, following MAR, arXiv 2406.11838): a node of ``L``
tokens in ``n = min(n, L)`` iterations keeps ``m_s = max(1, min(m_{s-1} - 1, floor(L cos(pi/2 (s+1)/n))))``
tokens masked after iteration ``s`` (``m_{-1} = L``), so iteration ``s`` predicts the ``m_{s-1} - m_s``
tokens ``order[m_s : m_{s-1}]`` of the node's random order (at least one), and the last iteration
predicts all that remain (``order[0 : m_{n-2}]``). AR (``models/ar.py``): one token per iteration, in
raster order.

CFG (``--cfg_schedule``): ``"linear"`` at the top level, ``1 + (cfg - 1) * (L - m_s) / L`` for a MAR
level (the number of tokens generated once iteration ``s`` is done, and ``m_s >= 1``, so the scale
never quite reaches ``cfg``) and ``1 + (cfg - 1) * (s + 1) / L`` for an AR level; every level below
uses the scale of the top-level iteration it descends from as a constant. ``"constant"``: ``cfg``
everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastgen.fractal.config import AR, MAR, FractalConfig

CFG_SCHEDULES = ("linear", "constant")


def _check_sizes(seq_len, num_iter) -> None:
    for name, value in (("seq_len", seq_len), ("num_iter", num_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def mar_mask_lengths(seq_len: int, num_iter: int) -> tuple[int, ...]:
    """``m_s``: tokens still masked after each MAR iteration (``min(num_iter, seq_len)`` entries; the
    last is 1, the official clamp, although the last iteration predicts every remaining token)."""
    _check_sizes(seq_len, num_iter)
    n = min(num_iter, seq_len)
    masked, out = seq_len, []
    for s in range(n):
        # math.cos in float64, as the official np.cos; the floor of an exact product.
        m = max(1, min(masked - 1, math.floor(seq_len * math.cos(math.pi / 2.0 * (s + 1) / n))))
        out.append(m)
        masked = m
    return tuple(out)


def mar_bounds(seq_len: int, num_iter: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per MAR iteration: it predicts ``order[start:stop]`` of the node's order."""
    lengths = mar_mask_lengths(seq_len, num_iter)
    before = (seq_len,) + lengths[:-1]
    return tuple((0 if s == len(lengths) - 1 else m, b) for s, (m, b) in enumerate(zip(lengths, before)))


def mar_schedule(seq_len: int, num_iter: int) -> tuple[int, ...]:
    """Tokens predicted by each MAR iteration (sums to ``seq_len``; each at least 1)."""
    return tuple(stop - start for start, stop in mar_bounds(seq_len, num_iter))


@dataclass(frozen=True)
class LevelSchedule:
    """One level's iterations, shared by every node of the level.

    Attributes:
        kind: ``"ar"`` or ``"mar"``.
        seq_len: tokens per node.
        bounds: ``(start, stop)`` per iteration: MAR iteration ``s`` predicts ``order[start:stop]``
            of the node's random order; AR iteration ``s`` predicts token ``s`` (``(s, s + 1)``).
        masked_after: tokens still masked after each iteration (``m_s``; AR: ``seq_len - s - 1``),
            what the linear CFG schedule reads.
    """

    kind: str
    seq_len: int
    bounds: tuple[tuple[int, int], ...]
    masked_after: tuple[int, ...]

    @property
    def num_iter(self) -> int:
        return len(self.bounds)

    @property
    def counts(self) -> tuple[int, ...]:
        """Tokens predicted per iteration."""
        return tuple(stop - start for start, stop in self.bounds)

    def cfg_scales(self, cfg: float, schedule: str) -> tuple[float, ...]:
        """CFG scale per iteration: ``"linear"`` (the top level's schedule) or ``"constant"``.

        Raises:
            ValueError: for an unknown schedule.
        """
        if schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
        if schedule == "constant":
            return (float(cfg),) * self.num_iter
        length = self.seq_len
        return tuple(1.0 + (cfg - 1.0) * (length - m) / length for m in self.masked_after)


def level_schedule(kind: str, seq_len: int, num_iter: int) -> LevelSchedule:
    """The schedule of a level of ``kind`` (``"ar"`` or ``"mar"``); AR ignores ``num_iter``."""
    _check_sizes(seq_len, num_iter)
    if kind == AR:
        return LevelSchedule(AR, seq_len, tuple((s, s + 1) for s in range(seq_len)),
                             tuple(seq_len - s - 1 for s in range(seq_len)))
    if kind == MAR:
        return LevelSchedule(MAR, seq_len, mar_bounds(seq_len, num_iter), mar_mask_lengths(seq_len, num_iter))
    raise ValueError(f"kind must be {AR!r} or {MAR!r}, got {kind!r}")


def schedules(config: FractalConfig, num_iters: tuple[int, ...] | None = None) -> tuple[LevelSchedule, ...]:
    """Every level's schedule (``num_iters``: per level, default ``config.num_iters``)."""
    num_iters = config.num_iters if num_iters is None else tuple(num_iters)
    if len(num_iters) != config.num_levels:
        raise ValueError(f"num_iter needs one value per level ({config.num_levels}), got {num_iters!r}")
    return tuple(level_schedule(lv.kind, lv.seq_len, n) for lv, n in zip(config.levels, num_iters))


@dataclass(frozen=True)
class CallCounts:
    """Model calls per image of a full sample (counts of forwards; CFG doubles their rows, not their
    number).

    Attributes:
        sequential: per level, the calls when every patch predicted by one parent iteration is made
            by one batched child call (the number of dependent level calls: the official sampler's
            and the block sampler's count).
        reference: per level, the calls of the depth-first sampler that makes one patch at a time.
        pixel_sequential, pixel_reference: pixel-head forwards (3 per pixel draw: R, G, B), likewise.
        guide_sequential, guide_reference: guiding-pixel-head forwards per level (0 where none).
    """

    sequential: tuple[int, ...]
    reference: tuple[int, ...]
    pixel_sequential: int
    pixel_reference: int
    guide_sequential: tuple[int, ...]
    guide_reference: tuple[int, ...]


def call_counts(config: FractalConfig, num_iters: tuple[int, ...] | None = None) -> CallCounts:
    """``CallCounts`` of ``config`` at ``num_iters`` (default the config's)."""
    sequential, reference, guide_seq, guide_ref = [], [], [], []
    parent_steps, nodes = 1, 1  # dependent parent iterations above this level; nodes of this level
    for lv, sched in zip(config.levels, schedules(config, num_iters)):
        guide_seq.append(3 * parent_steps if lv.guiding_pixel else 0)
        guide_ref.append(3 * nodes if lv.guiding_pixel else 0)
        sequential.append(parent_steps * sched.num_iter)
        reference.append(nodes * sched.num_iter)
        parent_steps, nodes = parent_steps * sched.num_iter, nodes * lv.seq_len
    return CallCounts(tuple(sequential), tuple(reference), 3 * parent_steps, 3 * nodes, tuple(guide_seq),
                      tuple(guide_ref))
