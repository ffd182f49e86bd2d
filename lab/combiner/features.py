"""Cached (h, T_1..T_k, next token) triples as Hugging Face `datasets` (Arrow on disk).

Training features come from random windows of the lab corpus's *training* split (never the held-out
text the evaluators score); each row is one context of random length in [ctx_min, ctx_max], its
final-normed last state h, the thoughts T_1..T_k_max after it, and the token that follows. Since
T_j does not depend on how many thoughts follow it, one cache with k_max thoughts serves every k <= k_max.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value, load_from_disk
from tqdm.auto import tqdm

from lab import LabError, data_dir
from lab.combiner.thinking import check_k, think
from lab.corpus import corpus_tokens
from lab.store import atomic_dir, config_hash

FEATURE_VERSION = 1


def train_stream(tokenizer, n_docs: int, seed: int = 1234) -> np.ndarray:
    """The training split as one int64 token stream (documents separated by EOS)."""
    return corpus_tokens(tokenizer, "train", n_docs, seed).astype(np.int64)  # cached; dtype fits any vocabulary


def _features_schema(d: int, k_max: int, extra: dict | None = None):
    cols = {"h": Sequence(Value("float32"), length=d)}
    cols.update({f"t{j}": Sequence(Value("float32"), length=d) for j in range(1, k_max + 1)})
    cols.update({"target": Value("int64"), **(extra or {})})
    return Features(cols)


def save_features(path: Path, h: np.ndarray, T: np.ndarray, target: np.ndarray, meta: dict,
                  extra: dict[str, np.ndarray] | None = None):
    """Write one feature set atomically: h (n, d), T (n, k, d), target (n,), extra int columns."""
    n, k, d = T.shape
    cols = {"h": h.astype(np.float32), "target": target.astype(np.int64)}
    cols.update({f"t{j + 1}": T[:, j].astype(np.float32) for j in range(k)})
    extra = extra or {}
    cols.update({name: v.astype(np.int64) for name, v in extra.items()})
    ds = Dataset.from_dict(cols, features=_features_schema(d, k, {n_: Value("int64") for n_ in extra}))
    with atomic_dir(path) as tmp:
        ds.save_to_disk(str(tmp / "arrow"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return load_features(path)


def load_features(path: Path, d: int | None = None):
    """The dataset at `path` in torch format; checks the feature width against `d` if given."""
    path = Path(path)
    if not (path / "arrow").is_dir():
        raise LabError(f"no cached features at {path} (expected an Arrow dataset in {path / 'arrow'})")
    ds = load_from_disk(str(path / "arrow")).with_format("torch")
    width = ds.features["h"].length
    if d is not None and width != d:
        raise LabError(f"cached features at {path} have width {width}, but the base has d = {d}: "
                       f"mismatched feature widths (features from another base?)")
    return ds


def feature_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def as_tensors(ds, k: int) -> dict[str, torch.Tensor]:
    """h (n, d), t = T_k (n, d), y (n,) from a features dataset, with width checks."""
    k_max = sum(1 for c in ds.column_names if c.startswith("t") and c[1:].isdigit())
    if not 1 <= k <= k_max:
        raise LabError(f"these features hold thoughts T_1..T_{k_max}; asked for T_{k}")
    cols = ds.select_columns([c for c in ("h", f"t{k}", "target", "bytes") if c in ds.column_names])[:]
    h, t = cols["h"], cols[f"t{k}"]
    if h.shape[-1] != t.shape[-1]:
        raise LabError(f"mismatched feature widths: h has {h.shape[-1]}, T_{k} has {t.shape[-1]}")
    out = {"h": h.float(), "t": t.float(), "y": cols["target"].long()}
    if "bytes" in cols:
        out["bytes"] = cols["bytes"].long()
    return out


@torch.no_grad()
def collect_features(base, n: int, k_max: int = 4, ctx_min: int = 32, ctx_max: int = 120,
                     feed: str = "final_embed_rms", n_docs: int = 20000, seed: int = 0, batch: int = 64,
                     path: Path | None = None, progress: bool = True, scale: float = 1.0, sample: int = 0):
    """Cache n training triples (h, T_1..T_k_max, next token) for `base`; reuse the cache if present.
    `sample` draws another set of windows under the same seed (one per fit seed: the across-seed interval then
    covers which training positions were sampled)."""
    check_k(k_max)
    if n < 2:
        raise LabError(f"need at least 2 feature rows, got n={n}")
    if not 1 <= ctx_min <= ctx_max:
        raise LabError(f"context lengths must satisfy 1 <= ctx_min <= ctx_max, got {ctx_min}, {ctx_max}")
    base.check_length(ctx_max + k_max)
    spec = dict(version=FEATURE_VERSION, base=base.name, fingerprint=base.fingerprint, n=n, k_max=k_max,
                ctx_min=ctx_min, ctx_max=ctx_max, feed=feed, n_docs=n_docs, seed=seed,
                **({} if scale == 1.0 else {"feed_scale": scale}), **({"sample": sample} if sample else {}))
    path = Path(path) if path else data_dir() / "combiner" / f"features-{base.name}-{config_hash(spec)}"
    if (path / "arrow").is_dir():
        return load_features(path, base.d_model)
    stream = train_stream(base.tokenizer, n_docs)
    if len(stream) < ctx_max + 2:
        raise LabError(f"the training stream has {len(stream)} tokens, fewer than ctx_max + 2 = {ctx_max + 2}")
    rng = np.random.default_rng([seed, 7, sample] if sample else [seed, 7])
    hs, Ts, ys, lens = [], [], [], []
    bar = tqdm(total=n, desc=f"features {base.name}", disable=not progress)
    done = 0
    while done < n:
        B = min(batch, n - done)
        L = int(rng.integers(ctx_min, ctx_max + 1))
        starts = rng.integers(0, len(stream) - L - 1, size=B)
        win = np.stack([stream[s: s + L + 1] for s in starts])
        ids = torch.from_numpy(win[:, :L]).to(base.device)
        th = think(base, ids, k_max, feed=feed, scale=scale)
        hs.append(th.h.float().cpu().numpy())
        Ts.append(th.T.float().cpu().numpy())
        ys.append(win[:, L])
        lens.append(np.full(B, L))
        done += B
        bar.update(B)
    bar.close()
    return save_features(path, np.concatenate(hs), np.concatenate(Ts), np.concatenate(ys), spec,
                         extra={"ctx_len": np.concatenate(lens)})


def split(tensors: dict[str, torch.Tensor], val_fraction: float, seed: int) -> tuple[dict, dict]:
    """A seeded train/validation split of feature rows."""
    n = len(tensors["y"])
    if not 0 < val_fraction < 1:
        raise LabError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise LabError(f"{n} feature rows are too few to split off {n_val} for validation")
    perm = torch.from_numpy(np.random.default_rng([seed, 11]).permutation(n))
    va, tr = perm[:n_val], perm[n_val:]
    return {k: v[tr] for k, v in tensors.items()}, {k: v[va] for k, v in tensors.items()}
