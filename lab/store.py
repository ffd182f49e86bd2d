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
import glob
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lab import LabError, models_dir

WEIGHTS, CONFIG, MANIFEST = "weights.safetensors", "config.json", "manifest.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: alive
    return True


def _leftover_pid(name: str, tag: str) -> int | None:
    """The process id in a leftover's name (`.<target>.old-<pid>`, `.<target>.tmp-<pid>-<random>`), if any."""
    tail = name.rsplit(f".{tag}-", 1)[-1].split("-", 1)[0]
    return int(tail) if tail.isdigit() else None


def recover_interrupted_replace(target: Path) -> bool:
    """Put back the previous version of `target` if a replace was killed between its two renames
    (target moved aside to `.<name>.old-<pid>`, the new one not yet in place). True if it did."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        return False
    olds = list(target.parent.glob(f".{glob.escape(target.name)}.old-*"))
    if not olds:
        return False
    olds.sort(key=lambda p: p.stat().st_mtime)
    os.rename(olds[-1], target)  # the newest aside copy is the version that was live
    return True


STALE_TMP_SECONDS = 6 * 3600  # a temp folder with no process id in its name is a crash's after this long


def is_leftover(name: str) -> bool:
    """Whether a folder name is a store's temporary or aside copy (`.<name>.tmp-*` / `.<name>.old-*`)."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def clean_leftovers(root: Path) -> list[Path]:
    """Undo what a killed save left in `root` (not recursive): an aside copy whose target is missing goes
    back (`recover_interrupted_replace`); an aside copy whose target is there, and a temp folder, of a process
    that is gone, are removed. Returns the paths it removed or restored. A read-only folder is left as it is."""
    root = Path(root)
    done = []
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    except OSError:
        return done
    for p in entries:
        if not is_leftover(p.name):
            continue
        tag = "old" if ".old-" in p.name else "tmp"
        target = root / p.name[1:].rsplit(f".{tag}-", 1)[0]
        pid = _leftover_pid(p.name, tag)
        try:
            if pid is not None and _pid_alive(pid):
                continue  # a save in progress (this process's or another's)
            if tag == "tmp" and pid is None and time.time() - p.stat().st_mtime < STALE_TMP_SECONDS:
                continue  # no process id to ask: only an old one is surely a crash's
            if tag == "old" and not target.exists():
                if recover_interrupted_replace(target):
                    done.append(target)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            done.append(p)
        except OSError:
            continue
    return done


# what marks a folder as the lab's own, by the file the lab writes last into it
_LAB_MARKERS = {"manifest.json": "artifact", "lab_base.json": "base", "trainer.json": "checkpoint",
                "cache.json": "state cache", "meta.json": "feature cache", "tokenizer.json": "tokenizer"}


def folder_kind(path: Path) -> str | None:
    """What the lab wrote at `path`, by its marker file: "artifact <kind>", "base", "checkpoint", a cache, "empty"
    (an empty folder), or None (not a folder the lab recognises: a file, a link, a user's folder)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    names = set(os.listdir(path))
    if not names:
        return "empty"
    if MANIFEST in names:
        try:
            m = read_json(path / MANIFEST)
        except LabError:
            return None
        return f"artifact {m['kind']}" if isinstance(m, dict) and isinstance(m.get("kind"), str) else None
    for marker, kind in _LAB_MARKERS.items():
        if marker in names:
            return kind
    return None


def check_replaceable(target: Path, names=None, kind: str | None = None) -> None:
    """LabError (naming the path, nothing touched) unless `target` is absent, an empty folder, or a folder the lab
    wrote that a new version may replace: of the same kind (`folder_kind`), holding only names the new version
    writes too (`names`: the new version's top-level entries, when known)."""
    target = Path(target)
    if not (target.exists() or target.is_symlink()):
        return
    what = ("a symbolic link" if target.is_symlink() else "a file" if not target.is_dir() else None)
    if what:
        raise LabError(f"{target} is {what}, not a folder the lab wrote: refusing to replace it (nothing was "
                       f"changed). Choose another output path, or move it away yourself.")
    have = folder_kind(target)
    if have == "empty":
        return
    if have is None:
        raise LabError(f"{target} already exists and is not a folder the lab wrote (no readable manifest.json, "
                       f"lab_base.json or trainer.json): refusing to replace it (nothing was changed). "
                       f"Choose another output path, or move it away yourself.")
    if kind is not None and have != kind:
        raise LabError(f"{target} holds a {have}, not a {kind}: refusing to replace it (nothing was changed). "
                       f"Choose another output path.")
    if names is not None:
        extra = sorted(set(os.listdir(target)) - set(names))
        if extra:
            shown = ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else "")
            raise LabError(f"{target} holds files the lab did not write there ({shown}): refusing to replace it "
                           f"(nothing was changed). Move them away, or choose another output path.")


@contextlib.contextmanager
def atomic_dir(target: Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target` (two renames: the old one aside,
    the new one in). On error the temp dir is removed and `target` is left as it was; a crash between the
    two renames is undone by `recover_interrupted_replace`, which this and `load_artifact` call first.

    Only what the lab wrote is ever replaced (`check_replaceable`): an existing `target` must be empty, or of the
    same kind as the new version (`kind`, checked before the body runs, else the new version's own marker) and
    hold nothing the new version does not write. Anything else is a LabError, with `target` untouched."""
    target = Path(target)
    with contextlib.suppress(OSError):
        recover_interrupted_replace(target)
    check_replaceable(target, kind=kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    old = None
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            new_kind = folder_kind(tmp)
            check_replaceable(target, names=os.listdir(tmp), kind=new_kind if new_kind != "empty" else None)
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


def base_matches(manifest: dict, base, path: Path | None = None) -> bool:
    """Whether `manifest` records exactly `base` (by fingerprint, not name). A manifest written before fingerprints
    left out paths and names records the base's legacy fingerprint (`Base.legacy_fingerprints`): it is recognised,
    and its manifest (at `path`, when writable) re-fingerprinted once, so the artifact is never retrained for it."""
    recorded = manifest.get("base") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("fingerprint"), str):
        return False
    if recorded["fingerprint"] == base.fingerprint:
        return True
    legacy = getattr(base, "legacy_fingerprints", None)
    if manifest.get("fingerprint_scheme") or legacy is None or recorded["fingerprint"] not in legacy():
        return False
    recorded["fingerprint"] = base.fingerprint
    manifest["fingerprint_scheme"] = FINGERPRINT_SCHEME
    if path is not None:
        with contextlib.suppress(OSError):  # a read-only home: recognised in memory, each time
            write_json(Path(path) / MANIFEST, manifest)
    return True


def made_on(path: Path, base) -> bool:
    """Whether the artifact at `path` records exactly this base (by fingerprint, not name). False when it has no
    readable manifest or another base: "train what is missing" treats both as missing, so a base
    re-pretrained under the same name gets its artifacts retrained rather than refused at load."""
    try:
        manifest = read_json(Path(path) / MANIFEST)
    except LabError:
        return False
    return base_matches(manifest, base, path)


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


FINGERPRINT_SCHEME = 2  # base fingerprints of weights and architecture only (`lab.bases.Base.fingerprint`)


def _config_diff(saved, now, prefix: str = "") -> list[str]:
    """The fields that differ between two JSON configs, as "field: saved -> now"."""
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return [] if saved == now else [f"{prefix or 'config'}: {json.dumps(saved, default=str)[:60]} -> "
                                        f"{json.dumps(now, default=str)[:60]}"]
    out = []
    for k in sorted(set(saved) | set(now), key=str):
        name = f"{prefix}.{k}" if prefix else str(k)
        if k not in now:
            out.append(f"{name}: removed (was {json.dumps(saved[k], default=str)[:60]})")
        elif k not in saved:
            out.append(f"{name}: added ({json.dumps(now[k], default=str)[:60]})")
        elif json.dumps(saved[k], sort_keys=True, default=str) != json.dumps(now[k], sort_keys=True, default=str):
            out += _config_diff(saved[k], now[k], name)
    return out


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise LabError(f"{where}: tensor(s) {', '.join(sorted(bad)[:5])} hold NaN or inf values (a diverged "
                       f"training?); retrain it with a lower learning rate")


def save_artifact(path: Path, kind: str, tensors: dict[str, torch.Tensor], config: dict,
                  base=None, metrics: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Artifact:
    """Write an artifact atomically. `base` (a lab.bases.Base) ties it to the weights it was trained on.

    An existing `path` is replaced only if it is an artifact of the same `kind` holding only an artifact's files
    (`check_replaceable`); anything else is a LabError naming it, with nothing touched. Tensors with NaN or inf
    are refused: nothing is saved from a diverged training."""
    path = Path(path)
    if not isinstance(kind, str) or not kind:
        raise LabError(f"an artifact kind must be a non-empty string, got {kind!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _check_finite(tensors, f"refusing to save the {kind!r} artifact {path}")
    names = {WEIGHTS, CONFIG, MANIFEST, *(extra_files or {})}
    with contextlib.suppress(OSError):
        recover_interrupted_replace(path)
    check_replaceable(path, names=names, kind=f"artifact {kind}")
    with atomic_dir(path, kind=f"artifact {kind}") as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, config)
        manifest = {
            "kind": kind,
            "base": ({"name": base.name, "fingerprint": base.fingerprint, "dtype": str(base.dtype).replace("torch.", "")}
                     if base is not None else None),
            "fingerprint_scheme": FINGERPRINT_SCHEME,
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "config_hash": config_hash(config),
            # a copy of the config, so a config.json edited later is named field by field at load
            "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "shapes": {k: list(v.shape) for k, v in sorted(tensors.items())},
            "metrics": metrics or {},
            "environment": environment(),
        }
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(tmp / name, data)
        write_json(tmp / MANIFEST, manifest)
    return Artifact(path, kind, config, tensors, manifest)


def load_artifact(path: Path, kind: str | None = None, base=None) -> Artifact:
    """Load and verify an artifact: its kind, the weights' hash, config.json against the manifest's config hash
    (naming the changed fields), the tensors against their recorded shapes and for NaN/inf, and (if given)
    the base fingerprint."""
    path = Path(path)
    with contextlib.suppress(OSError):  # a read-only home: nothing to put back here
        recover_interrupted_replace(path)
    if not path.is_dir():
        raise LabError(f"no artifact at {path} (expected a directory with {WEIGHTS}, {CONFIG}, {MANIFEST})")
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        raise LabError(f"{path / MANIFEST} is not an artifact manifest (expected a JSON object with a 'kind'); "
                       f"the file is corrupt or was edited")
    if kind is not None and manifest.get("kind") != kind:
        raise LabError(f"{path} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    weights = path / WEIGHTS
    if not weights.exists():
        raise LabError(f"missing weights file {weights}")
    if sha256_file(weights) != manifest.get("weights_sha256"):
        raise LabError(f"{weights} does not match the sha256 in its manifest: the file is corrupt or truncated")
    config = read_json(path / CONFIG)
    if "config_hash" in manifest and config_hash(config) != manifest["config_hash"]:
        saved = manifest.get("config")
        changed = _config_diff(saved, config) if saved is not None else []
        what = (f"changed: {'; '.join(changed[:5])}" if changed else
                "its hash differs from the one recorded at save (this manifest keeps no copy to name the field)")
        raise LabError(f"{path / CONFIG} is not the config this artifact was trained with ({what}); "
                       f"restore the file or retrain the artifact")
    if base is not None and manifest.get("base") and not base_matches(manifest, base, path):
        want = manifest["base"]
        # the fingerprint hashes the weights' bytes: the same model loaded in another dtype differs too
        have_dtype = str(base.dtype).replace("torch.", "")
        dtypes = (f"; it was trained on the base in {want['dtype']}, this one is loaded in {have_dtype}"
                  if want.get("dtype") and want["dtype"] != have_dtype else "")
        raise LabError(f"{path} was trained on base {want.get('name')!r} (fingerprint {str(want.get('fingerprint'))[:12]}), "
                       f"but the loaded base is {base.name!r} (fingerprint {base.fingerprint[:12]}){dtypes}")
    tensors = load_safetensors(path / WEIGHTS)
    shapes = manifest.get("shapes")
    if isinstance(shapes, dict):
        have = {k: list(v.shape) for k, v in tensors.items()}
        if have != shapes:
            diff = sorted(set(have) ^ set(shapes)) or [k for k in sorted(have) if have[k] != shapes.get(k)]
            raise LabError(f"{weights} holds other tensors than its manifest records ({', '.join(diff[:5])}): "
                           f"the artifact was edited; retrain it")
    _check_finite(tensors, f"{path}")
    return Artifact(path, manifest["kind"], config, tensors, manifest)


def _artifact_folders(root: Path) -> list[Path]:
    """Folders one or two levels under `root` that hold a manifest, crash leftovers (`.tmp-*`/`.old-*`) left out
    and cleaned first (`clean_leftovers`)."""
    clean_leftovers(root)
    with contextlib.suppress(OSError):
        for sub in sorted(root.iterdir()) if root.is_dir() else []:
            if sub.is_dir() and not sub.name.startswith("."):
                clean_leftovers(sub)
    out = []
    for man in sorted([*root.glob(f"*/{MANIFEST}"), *root.glob(f"*/*/{MANIFEST}")]):
        rel = man.parent.relative_to(root)
        if not any(part.startswith(".") for part in rel.parts):  # crash leftovers, checkpoints: never listed
            out.append(man.parent)
    return out


def _read_manifest(folder: Path) -> tuple[dict | None, str]:
    try:
        m = read_json(folder / MANIFEST)
    except (LabError, OSError, ValueError) as e:
        return None, str(e)
    if not isinstance(m, dict) or not isinstance(m.get("kind"), str):
        return None, f"{folder / MANIFEST} is not an artifact manifest (a JSON object with a 'kind')"
    return m, ""


def manifests(root: Path | None = None) -> Iterator[tuple[Path, dict]]:
    """(artifact folder, manifest dict) for every artifact under `root` (default models_dir()), one or two
    levels down; unreadable manifests (half-copied, hand-edited, another format) are skipped, so one bad
    folder cannot break a listing (`broken_artifacts` lists them). Crash leftovers are never listed."""
    root = models_dir() if root is None else Path(root)
    for folder in _artifact_folders(root):
        m, _ = _read_manifest(folder)
        if m is not None:
            yield folder, m


def broken_artifacts(root: Path | None = None) -> list[tuple[Path, str]]:
    """(folder, why) for every folder under `root` with a manifest.json that is not a readable artifact manifest."""
    root = models_dir() if root is None else Path(root)
    out = []
    for folder in _artifact_folders(root):
        m, why = _read_manifest(folder)
        if m is None:
            out.append((folder, why))
    return out


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
