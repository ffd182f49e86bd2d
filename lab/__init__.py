"""Latent Lab: train, probe and demo latent-state mechanisms in language models."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"


class LabError(Exception):
    """A user-facing error: the message names the bad value and what was expected."""


def lab_home() -> Path:
    """Where models/, data/ and results/ live: $LAB_HOME, else the checkout this package sits in."""
    env = os.environ.get("LAB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists() and os.access(repo, os.W_OK):
        return repo
    return Path.home() / ".latent-lab"


def models_dir() -> Path:
    return lab_home() / "models"


def data_dir() -> Path:
    return lab_home() / "data"


def results_dir() -> Path:
    return lab_home() / "results"
