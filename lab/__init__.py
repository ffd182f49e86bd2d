"""Latent Lab: train, probe and demo latent-state mechanisms in language models."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

__version__ = "0.1.0"


class LabError(Exception):
    """A user-facing error: the message names the bad value and what was expected."""


def thread_count(role: str = "work") -> int:
    """The torch intra-op thread count a lab process uses: $LAB_THREADS if set, else every core for work
    (training, evaluation, notebooks) and one thread for the app, whose forwards are small and which usually
    runs beside a training."""
    env = os.environ.get("LAB_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise LabError(f"LAB_THREADS must be a whole number >= 1, got {env!r}")
        return int(env)
    return 1 if role == "app" else max(1, os.cpu_count() or 1)


def configure_threads(role: str = "work") -> int:
    """Set torch's intra-op threads for this process by `thread_count(role)`; returns the count."""
    import torch  # noqa: PLC0415 -- lab/__init__ stays importable without loading torch

    n = thread_count(role)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n




DOWNLOADS_ENV = "LAB_ALLOW_DOWNLOADS"


def downloads_allowed() -> bool:
    """The one switch for the network: the lab downloads a base from the Hugging Face hub only when
    $LAB_ALLOW_DOWNLOADS is 1 (and the name is a hub id). Otherwise it runs offline."""
    return os.environ.get(DOWNLOADS_ENV, "").strip().lower() in ("1", "true", "yes")


# Offline by default: the Hugging Face libraries read this when they are first imported, so every load the lab
# (or a library it calls) makes uses the local cache only, unless downloads are allowed.
if not downloads_allowed():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def _writable(path: Path) -> bool:
    """Whether files can be made at `path`: the folder itself if it exists, else its nearest existing parent."""
    path = Path(path)
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK)


_warned_fallback: set[str] = set()


def data_dir() -> Path:
    """Where the lab's caches and generated datasets go: LAB_HOME/data, or, when LAB_HOME is read-only, a cache
    folder of this user ($XDG_CACHE_HOME or ~/.cache, else the system temp folder), with a warning."""
    home = lab_home()
    if _writable(home / "data"):
        return home / "data"
    tag = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for root in (cache_root / "latent-lab", Path(tempfile.gettempdir()) / f"latent-lab-{os.getuid()}"):
        if _writable(root):
            out = root / tag / "data"
            if str(home) not in _warned_fallback:
                _warned_fallback.add(str(home))
                warnings.warn(f"LAB_HOME {home} is read-only: caches and generated data go to {out}", stacklevel=2)
            return out
    raise LabError(f"LAB_HOME {home} is read-only and no cache folder is writable; set LAB_HOME to a writable folder")


def results_dir() -> Path:
    return lab_home() / "results"
