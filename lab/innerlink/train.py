"""Training the inner link (and, from it, the state-reconstruction map), loading, and "train what is missing".

Training is "graph-free" as in RecursiveMAS/ARM: the base never enters the graph; each step reads a
batch of cached last-layer states h_t and next tokens y_{t+1} from the Arrow cache and minimises
L_in = 1 − cos(R_in(h_t), Emb(y_{t+1})), with Emb the base's (frozen) input embedding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lab import LabError, models_dir
from lab.innerlink import reconstruct
from lab.innerlink.cache import caches
from lab.innerlink.config import LINK_FIELDS, Config
from lab.innerlink.handoff import PERSONA_HALVES, items_for
from lab.innerlink.model import InnerLink, build, cosine_loss
from lab.store import Artifact, load_artifact, made_on, read_json, run_hash, save_artifact
from lab.trainer import TrainSpec, fit

KIND = "innerlink"


def artifact_dir(preset: str, base) -> Path:
    """Where a preset's inner link on this base lives: models/innerlink-<preset>-<base>."""
    return models_dir() / f"innerlink-{preset}-{base.name}"


def train(config: Config, base, out_dir: Path | None = None, stop_after: int | None = None) -> Artifact | None:
    """Fit R_in on the cached train states (seeded, resumable through lab.trainer.fit); save it to `out_dir`
    (default: the config's preset folder). With `stop_after` short of the last step: None (a checkpoint)."""
    train_cache, held = caches(config, base)
    link = build(config, base)
    emb = base.embed.weight.detach()  # (V, d), frozen target space
    spec = TrainSpec(steps=config.steps, lr=config.lr, warmup=min(config.warmup, config.steps // 2),
                     seed=config.seed, ckpt_every=max(50, config.steps // 5), eval_every=max(20, config.steps // 5),
                     config_hash=run_hash(config.to_dict(), base))
    n_eval = min(config.eval_rows, len(held))
    eval_h, eval_y = held.rows(np.arange(n_eval))

    def batch_fn(step: int, rank: int, world: int) -> dict:
        rng = np.random.default_rng([config.seed, step, rank])
        h, y = train_cache.rows(rng.integers(0, len(train_cache), max(1, config.batch_size // world)))
        return {"h": h, "y": y}

    def loss_fn(model, batch):
        return cosine_loss(model(batch["h"]), emb[batch["y"]])

    def eval_fn(model):
        return {"heldout_cos": float(1 - cosine_loss(model(eval_h.to(base.device)), emb[eval_y.to(base.device)]))}

    out_dir = Path(out_dir) if out_dir else artifact_dir(config.preset_name, base)
    ckpt = out_dir.with_name(f".{out_dir.name}.ckpt")
    result = fit(link, batch_fn, loss_fn, spec, ckpt_dir=ckpt, eval_fn=eval_fn, desc=f"inner link on {base.name}",
                 stop_after=stop_after, device=base.device)
    if stop_after is not None and stop_after < spec.steps:
        return None
    art = save_artifact(out_dir, KIND, {k: v for k, v in link.state_dict().items()}, config.to_dict(), base,
                        metrics={"history": result.history, "seconds": round(result.seconds, 2),
                                 "train_rows": len(train_cache), "n_params": link.n_params()})
    shutil.rmtree(ckpt, ignore_errors=True)
    return art


def load(path_or_artifact, base) -> InnerLink:
    """The inner link saved at a path (or an Artifact), in eval mode on the base's device, carrying its
    `.config` and `.artifact`; checks kind, hash and base fingerprint."""
    art = path_or_artifact if isinstance(path_or_artifact, Artifact) else load_artifact(Path(path_or_artifact), KIND, base)
    link = InnerLink.from_tensors(art.tensors)
    if link.d != base.d_model:
        raise LabError(f"the inner link at {art.path} has width {link.d}, the base {base.name!r} has d={base.d_model}")
    link = link.to(base.device).eval()
    link.config, link.artifact = Config.from_dict(art.config), art
    return link


def _is_current(path: Path, config: Config, base, fields: tuple[str, ...] | None = None) -> bool:
    """An artifact at `path` made on exactly `base` (by fingerprint: a re-pretrained base keeps its name)
    from `config` (on `fields` only, if given)."""
    try:
        return (path / "config.json").exists() and made_on(path, base) and config.matches(read_json(path / "config.json"), fields)
    except LabError:
        return False


def train_or_load(config: Config, base, *, recon: bool = True) -> InnerLink:
    """The config's inner link, trained if missing (or made from other link fields); with `recon`, also the
    state-reconstruction map trained from it, if missing or made from another config (it is saved in
    `reconstruct.artifact_dir(config.preset_name, base)`; `reconstruct.load_recon` loads it), and the open-set
    map (trained on half the personas) when `config.open_set_recon`.

    The returned link's `.config` is `config`: the saved link matches it on every field that decides the
    link (`LINK_FIELDS`); the rollout and hand-off fields are this config's."""
    path = artifact_dir(config.preset_name, base)
    art = path if _is_current(path, config, base, LINK_FIELDS) else train(config, base, out_dir=path)
    link = load(art, base)
    link.config = config
    if recon:
        recon_dir = reconstruct.artifact_dir(config.preset_name, base)
        if not _is_current(recon_dir, config, base):
            reconstruct.train_recon(config, base, link, items_for(config), out_dir=recon_dir)
        if wants_open_set(config):
            open_dir = reconstruct.artifact_dir(config.preset_name, base, open_set=True)
            if not _is_current(open_dir, config, base):
                reconstruct.train_recon(config, base, link, items_for(config, answers=PERSONA_HALVES[1]),
                                        out_dir=open_dir, open_set=True)
    return link


def wants_open_set(config: Config) -> bool:
    """Whether the config asks for the open-set reconstruction map (persona tasks only)."""
    return bool(config.open_set_recon) and config.handoff_task != "pointer"
