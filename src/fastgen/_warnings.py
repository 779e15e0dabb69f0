"""One warning per distinct reason: fastgen never falls back silently, and never nags."""

from __future__ import annotations

import warnings

_seen: set[str] = set()


class FastgenFallbackWarning(UserWarning):
    """fastgen could not use the requested fast path and used a slower, correct one instead."""


def warn_once(key: str, message: str) -> None:
    if key in _seen:
        return
    _seen.add(key)
    warnings.warn(message, FastgenFallbackWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which warnings were shown (for tests and long-lived processes)."""
    _seen.clear()
