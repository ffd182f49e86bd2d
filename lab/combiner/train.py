"""Training: cache (h, T_1..T_k_max, next token) features once, then fit the combiner for every
k = 1..k_max by cross-entropy and by ridge, plus the no-thought control; `load` and `train_or_load`
give the fitted combiners back as one `FittedCombiners`.

Every fit is repeated for each of `config.fit_seeds` (the train/validation split of the cached rows and the
batch order; the init is the published zero init). The control is the same CE fit with M frozen at 0 (alpha and beta only): it tells what the *thought*
adds beyond a plain recalibration of the head's input. T_j does not depend on later thoughts, so one
feature cache with k_max thoughts serves every k.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lab import LabError
from lab.combiner.config import KIND, Config
from lab.combiner.features import as_tensors, collect_features, split
from lab.combiner.fit import fit_ce, fit_ridge
from lab.combiner.model import CONTROL, FITS, UNSCALED_FEED, UNSCALED_FEED_FIT, FittedCombiners
from lab.store import Artifact, base_matches, load_artifact, save_artifact


def _check_base_context(config: Config, base) -> None:
    base.check_length(max(config.ctx_max, config.chunk_len) + config.k_max)
    trained = (base.meta.get("preset") or {}).get("seq_len")
    if trained and max(config.ctx_max, config.chunk_len) + config.k_max > trained:
        raise LabError(f"context {max(config.ctx_max, config.chunk_len)} + {config.k_max} thoughts exceeds the "
                       f"{trained} positions {base.name!r} was trained on; lower ctx_max/chunk_len or k_max")


def seed_prefix(name: str, seed_index: int, seed: int) -> str:
    """The tensor prefix of a fit: the first fit seed's under its plain name (what `model[(fit, k)]` is),
    every further seed's with the seed in it."""
    return f"{name}." if seed_index == 0 else f"{name}.seed{seed}."


def seed_features(config: Config, base, i: int, k_max: int, feed: str, scale: float = 1.0, progress: bool = True):
    """The cached training features fit seed number `i` (its index in `fit_seeds`) fits on: with
    feature_samples="per_seed" its own sample of training windows, else the one shared sample."""
    return collect_features(base, config.n_features, k_max, config.ctx_min, config.ctx_max, feed,
                            config.train_docs, config.seed, config.feature_batch, progress=progress,
                            scale=scale, sample=i if config.feature_samples == "per_seed" else 0)


def train(config: Config, base, out_dir: Path | None = None, progress: bool = True) -> Artifact:
    """For every fit seed, cache features (its own sample of training windows, or one shared sample: see
    `feature_samples`), then fit the combiner for every k in 1..k_max by cross-entropy and by
    ridge, the no-thought control, and (with `unscaled_feed_row`) the k=1 CE fit on the unscaled-h feed; saved to
    `out_dir` (default `config.artifact_path()`). Resumable (the CE fits checkpoint beside the artifact until it
    is saved)."""
    _check_base_context(config, base)
    out_dir = Path(out_dir) if out_dir else config.artifact_path()
    ckpt_root = out_dir.with_name(f".{out_dir.name}.ckpt")

    def features(i: int, k_max: int, feed: str, scale: float = 1.0):
        return seed_features(config, base, i, k_max, feed, scale, progress)

    tensors, metrics = {}, {"n_features": config.n_features, "fits": {}, "fit_seeds": list(config.fit_seeds),
                            "seed_fits": {}, "feature_seconds": 0.0}

    def ce(tr, va, seed, name, **kw):
        return fit_ce(base, tr, va, config.ce_steps, config.ce_batch, config.ce_lr, config.ce_weight_decay, seed,
                      ckpt_dir=ckpt_root / f"{name}-s{seed}", desc=f"combiner {name} (seed {seed})", **kw)

    for i, seed in enumerate(config.fit_seeds):
        t1 = time.perf_counter()
        ds = features(i, config.k_max, config.feed, config.feed_scale)
        unscaled = features(i, 1, UNSCALED_FEED) if config.unscaled_feed_row else None
        metrics["feature_seconds"] += round(time.perf_counter() - t1, 1)
        fits = {}
        for k in range(1, config.k_max + 1):
            tr, va = split(as_tensors(ds, k), config.val_fraction, seed)
            t1 = time.perf_counter()
            c_ce, info_ce = ce(tr, va, seed, f"ce-k{k}")
            t2 = time.perf_counter()
            rg, info_rg = fit_ridge(base, tr, va, config.ridge_lambdas)
            info_ce["seconds"], info_rg["seconds"] = round(t2 - t1, 2), round(time.perf_counter() - t2, 2)
            tensors.update(c_ce.tensors(seed_prefix(f"ce.k{k}", i, seed)))
            tensors.update(rg.tensors(seed_prefix(f"ridge.k{k}", i, seed)))
            fits[f"k{k}"] = {"ce": info_ce, "ridge": info_rg}
        # the control: the same CE fit with M frozen at 0 (alpha and beta only; no thought is used)
        tr, va = split(as_tensors(ds, 1), config.val_fraction, seed)
        ctrl, fits[CONTROL] = ce(tr, va, seed, CONTROL, use_thought=False)
        tensors.update(ctrl.tensors(seed_prefix(CONTROL, i, seed)))
        if unscaled is not None:
            tr, va = split(as_tensors(unscaled, 1), config.val_fraction, seed)
            c_unscaled, fits[UNSCALED_FEED_FIT] = ce(tr, va, seed, UNSCALED_FEED_FIT)
            tensors.update(c_unscaled.tensors(seed_prefix(f"{UNSCALED_FEED_FIT}.k1", i, seed)))
        if i == 0:
            metrics["fits"] = fits
        metrics["seed_fits"][str(seed)] = {k: {f: {"val_nats": v["val_nats"]} for f, v in row.items()}
                                           if CONTROL != k and UNSCALED_FEED_FIT != k else {"val_nats": row["val_nats"]}
                                           for k, row in fits.items()}
    art = save_artifact(out_dir, KIND, tensors, config.saved(), base, metrics)
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return art


def load(path_or_artifact: Path | Artifact, base) -> FittedCombiners:
    """The fitted combiners of a trained artifact, verified against the base (by fingerprint); a LabError
    naming what is missing if the artifact lacks any fit."""
    if isinstance(path_or_artifact, Artifact):  # loaded without a base (e.g. to read its config): check it now
        art = path_or_artifact
        if art.kind != KIND:
            raise LabError(f"{art.path} holds a {art.kind!r} artifact, expected {KIND!r}")
        if art.manifest.get("base") and not base_matches(art.manifest, base, art.path):
            raise LabError(f"{art.path} was fitted on another base than {base.name!r} (its fingerprint differs)")
    else:
        art = load_artifact(Path(path_or_artifact), KIND, base)
    config = Config.from_dict(art.config)
    want = ([f"{fit}.k{k}.M" for fit in FITS for k in range(1, config.k_max + 1)] + [f"{CONTROL}.M"]
            + ([f"{UNSCALED_FEED_FIT}.k1.M"] if config.unscaled_feed_row else []))
    missing = [w for w in want if w not in art.tensors]
    fits = (art.manifest.get("metrics") or {}).get("fits") or {}
    missing += [f"metrics.fits.k{k}.{fit}.val_nats" for fit in FITS for k in range(1, config.k_max + 1)
                if not isinstance((fits.get(f"k{k}") or {}).get(fit), dict) or "val_nats" not in fits[f"k{k}"][fit]]
    if missing:
        raise LabError(f"{art.path} lacks the fits {missing[:4]}; retrain it with `lab train combiner`")
    return FittedCombiners.from_artifact(art, config, base)


def train_or_load(config: Config, base, progress: bool = True) -> FittedCombiners:
    """The fitted combiners for exactly this config on this base: loaded from `config.artifact_path()` when
    they are there, else (none yet, another base fingerprint, an unreadable artifact, another config such
    as another seed) trained and saved in its place."""
    path = config.artifact_path()
    model = None
    if (path / "manifest.json").exists():
        try:
            model = load(path, base)
        except LabError:  # another base fingerprint or an artifact missing a fit: retrain
            model = None
    if model is None or model.config.saved() != config.saved():
        model = load(train(config, base, out_dir=path, progress=progress), base)
    model.config = config  # the saved config is this one but for preset_name, which names the folder
    return model
