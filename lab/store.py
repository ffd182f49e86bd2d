"""Artifacts: safetensors + config.json + manifest.json, written atomically, tied to their base.

An artifact directory holds
  weights.safetensors   the trained tensors (never a pickle)
  config.json           the experiment Config that built it
  manifest.json         kind, base name, base fingerprint, sha256 of the weights, metrics
Loading checks the weights' hash and the base fingerprint, so a truncated file or a module
trained on another base is a clear error rather than silent nonsense.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lab import LabError, models_dir

WEIGHTS, CONFIG, MANIFEST = "weights.safetensors", "config.json", "manifest.json"


def recover_interrupted_replace(target: Path) -> bool:
    """Put back the previous version of `target` if a replace was killed between its two renames
    (target moved aside to `.<name>.old-<pid>`, the new one not yet in place). True if it did."""
    target = Path(target)
    if target.exists():
        return False
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.rename(olds[-1], target)  # the newest aside copy is the version that was live
    return True


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target` (two renames: the old one aside,
    the new one in). On error the temp dir is removed and `target` is left as it was; a crash between the
    two renames is undone by `recover_interrupted_replace`, which this and `load_artifact` call first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_replace(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)  # the second rename failed: the previous version goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise LabError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    """A short, stable hash of a JSON-serialisable config (dataclasses via asdict upstream)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_hash(config: dict, base) -> str:
    """The hash a training checkpoint is resumed under: the config and the exact base (its fingerprint). A base
    re-pretrained under the same name keeps every config field, so a config hash alone would resume a
    checkpoint trained on the old base's states."""
    return config_hash({"config": config, "base_fingerprint": base.fingerprint})


def made_on(path: Path, base) -> bool:
    """Whether the artifact at `path` records exactly this base (by fingerprint, not name). False when it has no
    readable manifest or another base: "train what is missing" treats both as missing, so a base
    re-pretrained under the same name gets its artifacts retrained rather than refused at load."""
    try:
        manifest = read_json(Path(path) / MANIFEST)
    except LabError:
        return False
    recorded = manifest.get("base") if isinstance(manifest, dict) else None
    return isinstance(recorded, dict) and recorded.get("fingerprint") == base.fingerprint


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a corrupt or truncated one is a LabError naming the file."""
    path = Path(path)
    if not path.exists():
        raise LabError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LabError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


@dataclass
class Artifact:
    """A trained lab module on disk: tensors, the config that built it, and its provenance."""
    path: Path
    kind: str
    config: dict
    tensors: dict[str, torch.Tensor]
    manifest: dict = field(default_factory=dict)

    @property
    def base_name(self) -> str:
        return manifest_base_name(self.manifest) or "?"


# the packages whose versions can move a number the lab reports (a model's forward, tokenisation, training,
# statistics, the affect lexicon); recorded with every artifact, base and report
ENVIRONMENT_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy", "scipy",
                        "statsmodels", "scikit-learn", "vaderSentiment", "peft")


def environment() -> dict:
    """What produced a number: Python, the platform and the versions of `ENVIRONMENT_PACKAGES` (None when
    one is not installed). A seed repeats a run only within these (a forward's kernels and a model's
    initialisation may change between releases)."""
    return dict(_environment())


@functools.cache
def _environment() -> tuple:
    """Looked up once per process: importlib.metadata scans the installed distributions on every call."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return (("python", platform.python_version()), ("platform", platform.platform(terse=True)),
            *((name, v(name)) for name in ENVIRONMENT_PACKAGES))


def environment_text(env: dict | None = None) -> str:
    """One line for a report: "python 3.11.7, torch 2.13.0+cpu, ..." (missing packages left out)."""
    env = environment() if env is None else env
    return ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and k != "platform")


def save_artifact(path: Path, kind: str, tensors: dict[str, torch.Tensor], config: dict,
                  base=None, metrics: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Artifact:
    """Write an artifact atomically. `base` (a lab.bases.Base) ties it to the weights it was trained on."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, config)
        manifest = {
            "kind": kind,
            "base": ({"name": base.name, "fingerprint": base.fingerprint, "dtype": str(base.dtype).replace("torch.", "")}
                     if base is not None else None),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "config_hash": config_hash(config),
            "metrics": metrics or {},
            "environment": environment(),
        }
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(tmp / name, data)
        write_json(tmp / MANIFEST, manifest)
    return Artifact(path, kind, config, tensors, manifest)


def load_artifact(path: Path, kind: str | None = None, base=None) -> Artifact:
    """Load and verify an artifact. Checks kind, weights hash and (if given) the base fingerprint."""
    path = Path(path)
    recover_interrupted_replace(path)
    if not path.is_dir():
        raise LabError(f"no artifact at {path} (expected a directory with {WEIGHTS}, {CONFIG}, {MANIFEST})")
    manifest = read_json(path / MANIFEST)
    if kind is not None and manifest.get("kind") != kind:
        raise LabError(f"{path} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    weights = path / WEIGHTS
    if not weights.exists():
        raise LabError(f"missing weights file {weights}")
    if sha256_file(weights) != manifest.get("weights_sha256"):
        raise LabError(f"{weights} does not match the sha256 in its manifest: the file is corrupt or truncated")
    if base is not None and manifest.get("base"):
        want = manifest["base"]
        if want["fingerprint"] != base.fingerprint:
            # the fingerprint hashes the weights' bytes: the same model loaded in another dtype differs too
            have_dtype = str(base.dtype).replace("torch.", "")
            dtypes = (f"; it was trained on the base in {want['dtype']}, this one is loaded in {have_dtype}"
                      if want.get("dtype") and want["dtype"] != have_dtype else "")
            raise LabError(f"{path} was trained on base {want['name']!r} (fingerprint {want['fingerprint'][:12]}), "
                           f"but the loaded base is {base.name!r} (fingerprint {base.fingerprint[:12]}){dtypes}")
    tensors = load_safetensors(path / WEIGHTS)
    return Artifact(path, manifest["kind"], read_json(path / CONFIG), tensors, manifest)


def manifests(root: Path | None = None) -> Iterator[tuple[Path, dict]]:
    """(artifact folder, manifest dict) for every artifact under `root` (default models_dir()), one or two
    levels down; unreadable manifests (half-copied, hand-edited, another format) are skipped, so one bad
    folder cannot break a listing."""
    root = models_dir() if root is None else Path(root)
    for man in sorted([*root.glob(f"*/{MANIFEST}"), *root.glob(f"*/*/{MANIFEST}")]):
        try:
            m = read_json(man)
        except (LabError, OSError, ValueError):
            continue
        if isinstance(m, dict):
            yield man.parent, m


def manifest_base_name(manifest: dict) -> str | None:
    base = manifest.get("base")
    return base.get("name") if isinstance(base, dict) else None


def find_artifacts(kind: str, base_name: str) -> dict[str, Path]:
    """The `kind` artifacts on disk trained on `base_name`, by their manifests: {the folder under
    models_dir() that holds it: its path}, sorted by name. Unreadable manifests are skipped."""
    root, out = models_dir(), {}
    for folder, m in manifests(root):
        if m.get("kind") == kind and manifest_base_name(m) == base_name:
            rel = folder.relative_to(root)
            out[rel.parts[0] if rel.parts[0] not in out else rel.as_posix()] = folder
    return dict(sorted(out.items()))
