"""Type checks for the experiments' config dataclasses (one rule for all four mechanisms).

A config arrives from the CLI, a notebook, the app or a config.json on disk; a string where a
number belongs would otherwise fail deep inside training with a TypeError that names neither the
field nor what it expects.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields

from lab import LabError

_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
          tuple: "a list", type(None): "null"}


def _matches(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(expected))
    if origin in (tuple, list) or expected in (tuple, list):
        return isinstance(value, (tuple, list))  # JSON gives lists for tuples
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)
    if expected is str:
        return isinstance(value, str)
    if expected is type(None):
        return value is None
    return True  # a type this checker does not know: left to the config's own checks


def _describe(expected) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(expected))
    return _NAMES.get(typing.get_origin(expected) or expected, getattr(expected, "__name__", str(expected)))


def check_field_types(config) -> None:
    """LabError naming the first field whose value does not have its annotated type."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        expected = hints.get(f.name)
        if expected is not None and not _matches(value, expected):
            raise LabError(f"{type(config).__module__}.{type(config).__name__}: {f.name} must be "
                           f"{_describe(expected)}, got {value!r}")
