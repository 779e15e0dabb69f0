"""Config dataclasses' shared machinery: constructors that raise ``ValueError`` naming the known
options, and building a config from another one plus overrides."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import fields


def validated(cls):
    """Make a config dataclass's constructor raise ``ValueError`` (naming the known options) for
    unknown or surplus arguments, as ``build`` does, instead of Python's ``TypeError``."""
    init = cls.__init__
    names = [f.name for f in fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; the options are {sorted(names)}")
        if len(args) > len(names):
            raise ValueError(f"{cls.__name__} takes at most {len(names)} positional arguments ({', '.join(names)}), "
                             f"got {len(args)}")
        twice = sorted(set(names[: len(args)]) & set(kwargs))
        if twice:
            raise ValueError(f"{cls.__name__} got {twice} both by position and by name")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def build_config(cls, config, overrides: dict, label: str):
    """``config`` (an instance of the dataclass ``cls``, or None for the defaults) with
    ``overrides`` applied; unknown keys or a config of another type raise ``ValueError``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; the options are {sorted(known)}")
    if config is not None and not isinstance(config, cls):
        raise ValueError(f"config must be a {label}, got {type(config).__name__}")
    return dataclasses.replace(config or cls(), **overrides)
