"""`ExperimentConfig`: the one config base every mechanism's `Config` subclasses.

A mechanism writes its fields as a dataclass with commented defaults, its presets as one dict of
overrides per name, and its own checks in `check()`:

    @dataclass
    class Config(ExperimentConfig):
        MECHANISM: ClassVar[str] = "innerlink"
        PRESETS: ClassVar[dict[str, dict]] = {"smoke": dict(base="smoke-gpt2", steps=80), "tiny": {}}
        steps: int = 1500                # optimiser steps

        def check(self):
            self.require_positive("steps")

and gets the same `preset(name, **overrides)`, `with_(**changes)`, `to_dict()` / `from_dict()` and
validation as every other mechanism. A config arrives from the CLI, a notebook, the app or a
config.json on disk; a bad value fails here, naming the field, not deep inside training.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lab import LabError
from lab.pretrain import ensure_base
from lab.trainer import MAX_LR

PRESET_NAMES = ("smoke", "quick", "tiny", "paper")  # the order presets are listed in
PRESET_HELP = " | ".join(PRESET_NAMES)             # the CLIs' --preset help

_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
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
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if expected is str:
        return isinstance(value, str)
    if expected is type(None):
        return value is None
    return True  # a type this checker does not know: left to the config's own checks


def _describe(expected) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(expected))
    return _TYPE_NAMES.get(typing.get_origin(expected) or expected, getattr(expected, "__name__", str(expected)))


def check_field_types(config) -> None:
    """LabError naming the first field whose value does not have its annotated type."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        expected = hints.get(f.name)
        if expected is not None and not _matches(value, expected):
            raise LabError(f"{config.label()}: {f.name} must be {_describe(expected)}, got {value!r}")


def suggest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class ExperimentConfig:
    """Fields every experiment has; subclasses add their own (all with defaults) and fill the class vars."""

    MECHANISM: ClassVar[str] = ""
    # preset name -> the fields it changes from the dataclass defaults; written the same way in every mechanism
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # (preset, base) -> values picked for that base under that preset (explicit overrides still win)
    PER_BASE: ClassVar[dict[tuple[str, str], dict[str, Any]]] = {}
    # preset -> what its numbers cannot say that the full experiment's can (the report carries it as a note)
    PRESET_NOTES: ClassVar[dict[str, str]] = {}

    preset_name: str = "custom"      # the preset this config came from (names its artifacts)
    base: str = "tiny-gpt2"          # the frozen base: a lab preset, a local HF directory or a hub id
    seed: int = 0                    # initialisation, data order and controls

    def __post_init__(self):
        # JSON gives lists where a field holds a tuple; keep tuples so configs compare and hash alike
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        check_field_types(self)
        if not 0 <= self.seed < 2**32:
            raise LabError(f"{self.label()}: seed must be a whole number in [0, 2**32), got {self.seed}")
        if not self.base.strip() or len(self.base) > 1000:
            raise LabError(f"{self.label()}: base must be a base preset, a folder or a hub id, got {self.base[:80]!r}")
        self.check_training_fields()
        self.check()

    # --- what a subclass overrides ---
    def check(self) -> None:
        """The mechanism's own value checks (raise LabError naming the field and what it expects)."""

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        """A saved config dict in the current form (defaults for fields older configs did not have)."""
        return saved

    # --- the one API ---
    @classmethod
    def label(cls) -> str:
        return f"{cls.MECHANISM or cls.__name__} config"

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def _check_names(cls, names) -> None:
        known = cls.field_names()
        bad = [k for k in names if k not in known]
        if bad:
            hints = "".join(suggest(k, known) for k in bad)
            raise LabError(f"unknown {cls.label()} field(s) {bad}{hints}; fields are {sorted(known)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ExperimentConfig":
        """The named preset, with `overrides` on top. An override of None keeps the preset's value, so
        command-line options that were not given pass straight through."""
        if name not in cls.PRESETS:
            raise LabError(f"unknown {cls.MECHANISM or cls.__name__} preset {name!r}{suggest(name, cls.PRESETS)}; "
                           f"presets are: {', '.join(cls.PRESETS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        cls._check_names(overrides)
        values = dict(cls.PRESETS[name])
        base = overrides.get("base", values.get("base", cls.base))
        values.update(cls.PER_BASE.get((name, base), {}))
        values.update(overrides)
        return cls(**{**values, "preset_name": name})

    def with_(self, **changes) -> "ExperimentConfig":
        """A copy with `changes` applied and validated."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The config as it is written to config.json (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> "ExperimentConfig":
        """The config a config.json holds; keys this version does not know (e.g. a format tag) are ignored."""
        if not isinstance(saved, dict):
            raise LabError(f"a {cls.label()} must be a JSON object, got {type(saved).__name__}")
        saved = cls.upgrade(dict(saved))
        known = cls.field_names()
        return cls(**{k: v for k, v in saved.items() if k in known})

    def load_base(self, **load_kw):
        """The base this config runs on, by the one policy every pipeline uses: a lab preset that is not on
        disk yet is pretrained first (progress bar, resumable); any other name or folder loads as it is."""
        return ensure_base(self.base, **load_kw)

    def check_training_fields(self) -> None:
        """What a training step needs of the fields every mechanism names alike, checked for any config that has
        them: steps and batch sizes >= 1 (0 is an error, never "the preset's default"), learning rates (`lr`,
        `*_lr`) finite in (0, MAX_LR], `grad_clip` >= 0 (0: no clipping; a negative one flips the gradient),
        warm-up and evaluation/checkpoint intervals >= 0."""
        names = self.field_names()
        for k in sorted(names):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k in ("steps", "batch_size"):
                if v < 1:
                    raise LabError(f"{self.label()}: {k} must be >= 1, got {v!r}")
            elif k == "lr" or k.endswith("_lr"):
                if not (math.isfinite(v) and 0 < v <= MAX_LR):
                    raise LabError(f"{self.label()}: {k} must be a learning rate in (0, {MAX_LR:g}], got {v!r}")
            elif k in ("grad_clip", "warmup", "eval_every", "ckpt_every"):
                if not (math.isfinite(v) and v >= 0):
                    raise LabError(f"{self.label()}: {k} must be >= 0, got {v!r}")

    # --- small checks the mechanisms share, each naming the field ---
    def require_positive(self, *names: str) -> None:
        for k in names:
            v = getattr(self, k)
            if not v > 0:
                raise LabError(f"{self.label()}: {k} must be > 0, got {v!r}")

    def require_nonnegative(self, *names: str) -> None:
        for k in names:
            v = getattr(self, k)
            if not v >= 0:
                raise LabError(f"{self.label()}: {k} must be >= 0, got {v!r}")

    def require_one_of(self, name: str, choices) -> None:
        v = getattr(self, name)
        if v not in choices:
            raise LabError(f"{self.label()}: {name} must be one of {tuple(choices)}, got {v!r}{suggest(v, choices)}")

    def require_range(self, name: str, lo, hi) -> None:
        v = getattr(self, name)
        if not lo <= v <= hi:
            raise LabError(f"{self.label()}: {name} must be in [{lo}, {hi}], got {v!r}")
