"""Cached last-layer states for training the inner link, on disk as a Hugging Face `datasets` Arrow
table (memory-mapped, so a cache larger than RAM trains the same way).

One row per (document, position t):  h = the base's last-layer hidden state at t (the final-normed
stream, what HF calls hidden_states[-1] and what the head reads), target = the next token y_{t+1},
doc and pos for grouping. Beside the table sits `cache.json` with the base's fingerprint: a cache
made on another base (or with another tokenizer) is a LabError, not silently wrong training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from lab import LabError, data_dir
from lab.corpus import documents
from lab.hooks import capture, forward
from lab.store import atomic_dir, read_json, write_json

TABLE, META = "states.arrow", "cache.json"
FORMAT_VERSION = 1


def _features(d: int):
    return datasets.Features({
        "h": datasets.List(datasets.Value("float32"), length=d),  # (d,) last-layer state at t
        "target": datasets.Value("int32"),                          # y_{t+1}
        "doc": datasets.Value("int32"),
        "pos": datasets.Value("int32"),
    })


@dataclass
class StateCache:
    """A memory-mapped table of (h, target, doc, pos) rows plus its metadata."""
    path: Path
    table: object          # datasets.Dataset, numpy-formatted
    meta: dict

    def __len__(self) -> int:
        return len(self.table)

    @property
    def d(self) -> int:
        return int(self.meta["d_model"])

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (B, d) float32, target (B,) long) for the given row indices."""
        b = self.table[np.asarray(idx, dtype=np.int64)]
        return torch.from_numpy(np.asarray(b["h"], dtype=np.float32)), torch.from_numpy(b["target"].astype(np.int64))

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.table[name])


@torch.no_grad()
def last_layer_states(base, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The final-normed last-layer stream (B, T, d) for token ids."""
    with capture(base, layers=[], final=True) as cache:
        forward(base, input_ids=ids.to(base.device), attention_mask=None if mask is None else mask.to(base.device))
    return cache["final"]


def build_cache(base, path: Path, split: str = "train", n_docs: int = 2000, seed: int = 1234,
                max_tokens: int = 128, batch: int = 32) -> StateCache:
    """Run the base over `n_docs` corpus documents of `split` and write every (h_t, y_{t+1}) row."""
    if n_docs < 1:
        raise LabError(f"a state cache needs n_docs >= 1, got {n_docs}")
    path = Path(path)
    docs = documents(split, n_docs, seed)
    tok = base.tokenizer
    max_tokens = min(max_tokens, base.max_len or max_tokens)
    rows = [tok.encode(t, add_special_tokens=False)[:max_tokens] for t in docs]
    n_rows = 0
    with atomic_dir(path) as tmp:
        writer = ArrowWriter(features=_features(base.d_model), path=str(tmp / TABLE))
        for i in tqdm(range(0, len(rows), batch), desc=f"cache {split} states ({base.name})", leave=False):
            chunk = [r for r in rows[i: i + batch] if len(r) >= 2]
            if not chunk:
                continue
            T = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(chunk):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            h = last_layer_states(base, ids.to(base.device), mask.to(base.device)).float().cpu().numpy()  # (B, T, d)
            hs, tg, dc, ps = [], [], [], []
            for j, r in enumerate(chunk):
                n = len(r) - 1  # positions with a next token
                hs.append(h[j, :n])
                tg.append(np.asarray(r[1:], dtype=np.int32))
                dc.append(np.full(n, i + j, dtype=np.int32))
                ps.append(np.arange(n, dtype=np.int32))
            hs = np.concatenate(hs)  # (N, d)
            writer.write_table(pa.table({
                "h": pa.FixedSizeListArray.from_arrays(pa.array(hs.ravel()), base.d_model),
                "target": pa.array(np.concatenate(tg)), "doc": pa.array(np.concatenate(dc)),
                "pos": pa.array(np.concatenate(ps))}))
            n_rows += len(hs)
        writer.finalize()
        if n_rows == 0:
            raise LabError(f"no (state, next token) pairs from {n_docs} {split!r} documents: every document "
                           f"was shorter than 2 tokens")
        write_json(tmp / META, {"format": FORMAT_VERSION, "base": base.name, "fingerprint": base.fingerprint,
                                "d_model": base.d_model, "split": split, "n_docs": n_docs, "seed": seed,
                                "max_tokens": max_tokens, "rows": n_rows, "site": "final (last-layer, final-normed)"})
    return load_cache(path, base)


def load_cache(path: Path, base=None) -> StateCache:
    """Open a cache memory-mapped; with `base`, check it was made on exactly that base."""
    path = Path(path)
    if not (path / META).exists() or not (path / TABLE).exists():
        raise LabError(f"no inner-link state cache at {path} (expected {TABLE} and {META}); build one with "
                       f"lab.innerlink.cache.build_cache")
    meta = read_json(path / META)
    if meta.get("format") != FORMAT_VERSION:
        raise LabError(f"{path} is a state cache of format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    if base is not None:
        if not base.has_fingerprint(meta["fingerprint"]):
            raise LabError(f"the state cache at {path} was made on base {meta['base']!r} (fingerprint "
                           f"{meta['fingerprint'][:12]}), but the loaded base is {base.name!r} (fingerprint "
                           f"{base.fingerprint[:12]}): its states mean nothing for this base; rebuild the cache")
        if meta["d_model"] != base.d_model:
            raise LabError(f"the state cache at {path} has width {meta['d_model']}, the base has d={base.d_model}")
    try:
        table = datasets.Dataset.from_file(str(path / TABLE)).with_format("numpy")
    except Exception as e:  # pyarrow raises several types for a truncated file
        raise LabError(f"{path / TABLE} is not a readable Arrow table (corrupt or truncated?): {e}") from None
    if len(table) != meta["rows"]:
        raise LabError(f"{path / TABLE} has {len(table)} rows but its {META} says {meta['rows']}: truncated?")
    return StateCache(path, table, meta)


def cache_path(base, split: str, n_docs: int, seed: int, max_tokens: int = 128) -> Path:
    """Where the cache of these states lives: named by everything that decides its rows (a cache cut at
    another `max_tokens` holds other rows, so it must not be found under the same name)."""
    return (data_dir() / "innerlink"
            / f"states-{base.name}-{base.fingerprint[:10]}-{split}-{n_docs}-{seed}-{max_tokens}tok")


def get_cache(base, split: str, n_docs: int, seed: int = 1234, max_tokens: int = 128) -> StateCache:
    """Load the cache for (base, split, n_docs, seed, max_tokens), building it the first time."""
    p = cache_path(base, split, n_docs, seed, max_tokens)
    if not (p / META).exists():
        return build_cache(base, p, split, n_docs, seed, max_tokens)
    cache = load_cache(p, base)
    wanted = {"split": split, "n_docs": n_docs, "seed": seed, "max_tokens": max_tokens}
    differ = {k: (cache.meta.get(k), v) for k, v in wanted.items() if cache.meta.get(k) != v}
    if differ:  # a directory renamed or copied by hand: its rows are not the ones asked for
        raise LabError(f"the state cache at {p} was built with "
                       + ", ".join(f"{k}={have!r}" for k, (have, _) in differ.items()) + ", but "
                       + ", ".join(f"{k}={want!r}" for k, (_, want) in differ.items())
                       + " was asked for; delete it to rebuild")
    return cache


def caches(config, base) -> tuple[StateCache, StateCache]:
    """(train, held-out) state caches a Config names, each built the first time it is asked for."""
    train = get_cache(base, "train", config.train_docs, config.cache_seed, config.max_tokens)
    held = get_cache(base, "heldout", config.heldout_docs, config.cache_seed, config.max_tokens)
    return train, held
