"""Training RLF on the foundation trainer (accelerate, seeded, exactly resumable, live held-out accuracy)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lab import LabError, models_dir
from lab.rlf.config import Config
from lab.rlf.data import (TASK_VERSION, TRAIN_HOPS, excluded_prompts, shuffled_supervision, train_batch, train_hops_for,
                          validation_set)
from lab.rlf.model import RLF, build, encode_prompts
from lab.store import Artifact, config_hash, load_artifact, save_artifact
from lab.trainer import TrainSpec, fit

KIND = "rlf"


def supervision(model: RLF, problems, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights), both (B, K) with K = the batch's longest path + 1 (its HALT loop).
    Every loop: all K loops supervised (shorter chains keep targeting HALT, as published).
    Answer only: just the value (loop hops-1) and the HALT after it (loop hops)."""
    K = max(p.hops for p in problems) + 1
    targets = model.vocab.targets(problems, K)
    if config.supervision == "every_loop":
        weights = torch.ones_like(targets, dtype=torch.float32)
    else:
        weights = torch.zeros_like(targets, dtype=torch.float32)
        for i, p in enumerate(problems):
            weights[i, p.hops - 1] = weights[i, p.hops] = 1.0
    return targets, weights


def train_spec(config: Config) -> TrainSpec:
    return TrainSpec(steps=config.steps, lr=config.lr, warmup=config.warmup, weight_decay=config.weight_decay,
                     grad_clip=config.grad_clip, seed=config.seed, ckpt_every=config.ckpt_every,
                     eval_every=config.eval_every, config_hash=config_hash(config.to_dict()))


def default_out_dir(config: Config, base) -> Path:
    return models_dir() / config.run_name(base.name)


def train(config: Config, base=None, out_dir: Path | None = None, stop_after: int | None = None,
          progress: bool = True) -> Artifact:
    """Train the gate and core (the base stays frozen) and save the artifact (safetensors + config).
    Resumes from `.<out_dir>.ckpt` if a run was interrupted; stop_after simulates a kill (for tests)."""
    from lab.bases import load_base
    from lab.rlf.evaluation import final_answer_accuracy

    if config.task_version != TASK_VERSION:
        raise LabError(f"config asks for RLF task version {config.task_version}, but this lab generates version "
                       f"{TASK_VERSION} (lab.rlf.data.TASK_VERSION); older task versions cannot be retrained")
    if base is None:
        base = load_base(config.base)
    model = build(config, base)
    out_dir = Path(out_dir) if out_dir else default_out_dir(config, base)
    exclude = excluded_prompts(config.test_n, 0, config.val_n_per_hop)
    val = validation_set(config.val_n_per_hop, tuple(h for h in TRAIN_HOPS if h <= config.max_train_hops))

    def batch_fn(step: int, rank: int, world: int) -> dict:
        probs = train_batch(step, config.batch_size // world, config.seed, config.max_train_hops,
                            config.curriculum_steps, exclude, rank, config.one_hop_count_per_batch)
        if config.shuffle_supervision:
            probs = shuffled_supervision(probs, seed=config.seed * 100_003 + step)
        ids, mask = encode_prompts(base, [p.prompt for p in probs])
        targets, weights = supervision(model, probs, config)
        return {"ids": ids, "mask": mask, "targets": targets, "weights": weights}

    def loss_fn(m, batch):
        return m.loss(batch["ids"], batch["mask"], batch["targets"], batch["weights"])

    def eval_fn(m):
        accs = final_answer_accuracy(m, val, cap=config.infer_cap)
        out = {"val_acc": accs["all"]}
        out.update({f"h{h}": a for h, a in accs.items() if h != "all"})
        return out

    spec = train_spec(config)
    ckpt = out_dir.with_name(f".{out_dir.name}.ckpt")
    t0 = time.perf_counter()
    result = fit(model, batch_fn, loss_fn, spec, ckpt_dir=ckpt, eval_fn=eval_fn,
                 desc=f"rlf {config.core} on {base.name}", stop_after=stop_after)
    if stop_after is not None and stop_after < spec.steps:
        return Artifact(ckpt, KIND, config.to_dict(), model.trainable_tensors(), {"stopped_at": stop_after})
    metrics = {"steps": spec.steps, "seconds": round(result.seconds, 1), "history": result.history,
               "resumed_from": result.resumed_from, "final_val": result.last,
               "curriculum_cap_at_end": train_hops_for(spec.steps - 1, config.max_train_hops, config.curriculum_steps),
               "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
               "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    art = save_artifact(out_dir, KIND, model.trainable_tensors(), config.to_dict(), base=base, metrics=metrics)
    import shutil
    shutil.rmtree(ckpt, ignore_errors=True)  # the artifact supersedes its checkpoint
    return art


def load(path_or_artifact, base=None) -> RLF:
    """An RLF module from an artifact directory; a LabError if it was trained on another base."""
    from lab.bases import load_base

    art = path_or_artifact if isinstance(path_or_artifact, Artifact) else None
    if art is None:
        path = Path(path_or_artifact)
        manifest_base = None
        if base is None:
            from lab.store import read_json
            manifest_base = read_json(path / "manifest.json").get("base") or {}
            cfg = read_json(path / "config.json")
            base = load_base(manifest_base.get("name") or cfg["base"])
        art = load_artifact(path, KIND, base)
    elif base is not None and art.manifest.get("base") and art.manifest["base"]["fingerprint"] != base.fingerprint:
        raise LabError(f"{art.path} was trained on base {art.manifest['base']['name']!r}, "
                       f"but the loaded base is {base.name!r} (fingerprints differ)")
    if base is None:
        base = load_base(art.manifest.get("base", {}).get("name") or art.config["base"])
    config = Config.from_dict(art.config)
    model = build(config, base)
    own = dict(model.named_parameters())
    if set(art.tensors) != {n for n, p in own.items() if p.requires_grad}:
        raise LabError(f"{art.path} holds other tensors than an RLF {config.core} core of this config")
    with torch.no_grad():
        for n, t in art.tensors.items():
            if own[n].shape != t.shape:
                raise LabError(f"{art.path}: tensor {n} has shape {tuple(t.shape)}, this base/config needs "
                               f"{tuple(own[n].shape)} (trained on another base?)")
            own[n].copy_(t)
    model.eval()
    model.artifact = art
    return model


def train_or_load(config: Config, base=None, out_dir: Path | None = None) -> RLF:
    """Load the artifact for this config if it exists (and matches the config), else train it."""
    from lab.bases import load_base
    from lab.store import read_json

    if base is None:
        base = load_base(config.base, train_if_missing=config.preset_name == "smoke")
    out_dir = Path(out_dir) if out_dir else default_out_dir(config, base)
    if (out_dir / "config.json").exists() and read_json(out_dir / "config.json") == config.to_dict():
        return load(out_dir, base)
    return load(train(config, base, out_dir), base)


def artifacts_for(base_name: str) -> dict[str, Path]:
    """RLF artifacts on disk trained on `base_name` ({directory name: path}), the method's first."""
    from lab.store import read_json
    out = {}
    root = models_dir()
    if not root.exists():
        return out
    for d in sorted(root.glob("rlf-*")):
        if not (d / "manifest.json").exists():
            continue
        try:
            man = read_json(d / "manifest.json")
        except LabError:
            continue
        if man.get("kind") == KIND and (man.get("base") or {}).get("name") == base_name:
            try:
                cfg = Config.from_dict(read_json(d / "config.json"))
            except (LabError, TypeError):
                continue
            out[d.name] = (cfg.variant != "full", cfg.seed, cfg.core != "transformer", d)
    # the method itself first (seed 0, transformer core), then other seeds, cores, baselines, controls
    return {name: v[-1] for name, v in sorted(out.items(), key=lambda kv: kv[1][:3])}
