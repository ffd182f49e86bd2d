"""Training RLF on the foundation trainer (accelerate, seeded, exactly resumable, live held-out accuracy)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from lab import LabError, models_dir
from lab.bases import load_base
from lab.rlf.config import Config
from lab.rlf.data import (
    TASK_VERSION,
    TRAIN_HOPS,
    excluded_prompts,
    shuffled_supervision,
    train_batch,
    train_hops_for,
    validation_set,
)
from lab.rlf.infer import final_answer_accuracy
from lab.rlf.model import RLF, build, encode_prompts
from lab.store import (
    Artifact,
    base_matches,
    load_artifact,
    made_on,
    manifest_base_name,
    read_json,
    run_hash,
    save_artifact,
)
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


class HopCurriculum:
    """Which hop counts training draws: hops 1..cap(step).

    The fixed schedule opens one more hop every curriculum_steps / max_train_hops steps. With
    curriculum_threshold > 0 the next hop count also opens as soon as the model gets the newest one
    right (every supervised loop) on at least that fraction of its last curriculum_window training
    problems, whichever comes first. Why: on the tiny preset a hop count is learned a few hundred
    steps after it opens, and opening the next one before that stalls both; a fixed schedule must be
    tuned to one learning rate, this one follows the run. It reads the training batches' own logits, so
    it costs no extra pass; its state is checkpointed with the weights (the trainer's `train_state`), so a
    resumed run draws the same batches."""

    def __init__(self, config: Config):
        self.config = config
        self.adaptive_cap = 1
        self.opened_at: dict[int, int] = {}       # hop count -> the first step that drew it
        self.recent: dict[int, list[bool]] = {}   # hop count -> its last `window` training outcomes
        self.next_step = 0

    def cap(self, step: int) -> int:
        c = self.config
        return max(train_hops_for(step, c.max_train_hops, c.curriculum_steps), self.adaptive_cap)

    def hop_weights(self, step: int) -> list[float] | None:
        """hop_sampling "error": hop count h in 1..cap drawn in proportion to 0.1 + its recent training
        error (a hop count not yet seen counts as all wrong), so batches go where the model still fails
        while solved hop counts keep a share against forgetting. "newest": None (train_batch's default)."""
        if self.config.hop_sampling != "error":
            return None
        out = []
        for h in range(1, self.cap(step) + 1):
            window = self.recent.get(h) or [False]
            out.append(0.1 + 1.0 - sum(window) / len(window))
        return out

    def observe(self, step: int, hops: list[int], correct: list[bool], device: torch.device | None = None) -> None:
        """device: the model's (where a distributed reduce of the counts must run: NCCL reduces only
        GPU tensors); the counts are read back on the CPU."""
        c = self.config
        self.next_step = step + 1
        self.opened_at.setdefault(self.cap(step), step)
        if (c.curriculum_threshold <= 0 or self.adaptive_cap >= c.max_train_hops) and c.hop_sampling != "error":
            return
        counts = torch.zeros(c.max_train_hops + 1, 2)
        for h, ok in zip(hops, correct):
            counts[h, 0] += float(ok)
            counts[h, 1] += 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to(device or "cpu")
            torch.distributed.all_reduce(counts)  # every rank sees every rank's outcomes: caps stay equal
            counts = counts.cpu()
        for h in range(1, c.max_train_hops + 1):
            n_ok, n = int(counts[h, 0]), int(counts[h, 1])
            window = self.recent.setdefault(h, [])
            window.extend([True] * n_ok + [False] * (n - n_ok))
            del window[:-c.curriculum_window]
        newest = self.cap(step)
        window = self.recent.get(newest, [])
        if (c.curriculum_threshold > 0 and newest < c.max_train_hops and len(window) >= c.curriculum_window
                and sum(window) >= c.curriculum_threshold * len(window)):
            self.adaptive_cap = newest + 1
            self.opened_at[newest + 1] = step + 1

    def state_dict(self) -> dict:
        return {"adaptive_cap": self.adaptive_cap, "next_step": self.next_step,
                "opened_at": {str(h): s for h, s in self.opened_at.items()},
                "recent": {str(h): w for h, w in self.recent.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.adaptive_cap, self.next_step = int(d["adaptive_cap"]), int(d["next_step"])
        self.opened_at = {int(h): int(s) for h, s in d["opened_at"].items()}
        self.recent = {int(h): [bool(x) for x in w] for h, w in d["recent"].items()}


def train_spec(config: Config, base) -> TrainSpec:
    return TrainSpec(steps=config.steps, lr=config.lr, warmup=config.warmup, weight_decay=config.weight_decay,
                     grad_clip=config.grad_clip, seed=config.seed, ckpt_every=config.ckpt_every,
                     eval_every=config.eval_every, config_hash=run_hash(config.run_dict(), base))


def default_out_dir(config: Config, base) -> Path:
    return models_dir() / config.run_name(base.name)


def train(config: Config, base=None, out_dir: Path | None = None, stop_after: int | None = None,
          progress: bool = True, stop_at_val: float | None = None) -> Artifact:
    """Train the gate, core and loop norm (the paper loop: also the LoRA adapters and the head copy; the base stays frozen) and save the artifact (safetensors + config).
    Resumes from `.<out_dir>.ckpt` if a run was interrupted; stop_after simulates a kill (for tests).
    stop_at_val: stop at the first validation (1..max_train_hops pooled) at or above it, for measuring
    time to accuracy (bench/bench_rlf.py); like stop_after, nothing is saved but the checkpoint."""
    if config.task_version != TASK_VERSION:
        raise LabError(f"config asks for RLF task version {config.task_version}, but this lab generates version "
                       f"{TASK_VERSION} (lab.rlf.data.TASK_VERSION); older task versions cannot be retrained")
    if base is None:
        base = config.load_base()
    model = build(config, base)
    out_dir = Path(out_dir) if out_dir else default_out_dir(config, base)
    exclude = excluded_prompts(config.test_n, 0, config.val_n_per_hop)
    val = validation_set(config.val_n_per_hop, tuple(h for h in TRAIN_HOPS if h <= config.max_train_hops))

    curriculum = HopCurriculum(config)

    def batch_fn(step: int, rank: int, world: int) -> dict:
        probs = train_batch(step, config.batch_size // world, config.seed, config.max_train_hops,
                            config.curriculum_steps, exclude, rank, config.one_hop_count_per_batch,
                            cap=curriculum.cap(step), hop_weights=curriculum.hop_weights(step))
        if config.shuffle_supervision:
            probs = shuffled_supervision(probs, seed=config.seed * 100_003 + step)
        ids, mask = encode_prompts(base, [p.prompt for p in probs])
        targets, weights = supervision(model, probs, config)
        return {"ids": ids, "mask": mask, "targets": targets, "weights": weights, "step": step,
                "hops": [p.hops for p in probs]}

    def loss_fn(m, batch):
        loss, correct = m.loss(batch["ids"], batch["mask"], batch["targets"], batch["weights"], return_correct=True)
        curriculum.observe(batch["step"], batch["hops"], correct.tolist(), device=correct.device)
        return loss

    def eval_fn(m):
        accs = final_answer_accuracy(m, val, cap=config.infer_cap)
        out = {"val_acc": accs["all"]}
        out.update({f"h{h}": a for h, a in accs.items() if h != "all"})
        out["hops_open"] = curriculum.cap(curriculum.next_step)  # what the next batch draws from
        return out

    spec = train_spec(config, base)
    ckpt = out_dir.with_name(f".{out_dir.name}.ckpt")
    t0 = time.perf_counter()
    result = fit(model, batch_fn, loss_fn, spec, ckpt_dir=ckpt, eval_fn=eval_fn,
                 desc=f"rlf {config.core} on {base.name}", stop_after=stop_after, train_state=curriculum, device=base.device,
                 stop_when=None if stop_at_val is None else (lambda m: m["val_acc"] >= stop_at_val),
                 no_decay=None if config.decay == "all" else model.no_decay, progress=progress)
    if stop_after is not None and stop_after < spec.steps:
        return Artifact(ckpt, KIND, config.run_dict(), model.trainable_tensors(), {"stopped_at": stop_after})
    if result.stopped_early:
        return Artifact(ckpt, KIND, config.run_dict(), model.trainable_tensors(),
                        {"stopped_at": result.history[-1]["step"], "history": result.history,
                         "curriculum_opened_at": curriculum.opened_at})
    metrics = {"steps": spec.steps, "seconds": round(result.seconds, 1), "history": result.history,
               "resumed_from": result.resumed_from, "final_val": result.last,
               "curriculum_cap_at_end": curriculum.cap(spec.steps - 1),
               "curriculum_opened_at": curriculum.opened_at,
               "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
               "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    art = save_artifact(out_dir, KIND, model.trainable_tensors(), config.run_dict(), base=base, metrics=metrics)
    shutil.rmtree(ckpt, ignore_errors=True)  # the artifact supersedes its checkpoint
    return art


def load(path_or_artifact, base=None) -> RLF:
    """The RLF module an artifact holds (carrying .config and .artifact), on `base` (default: the base its
    manifest names); a LabError if it was trained on another base."""
    art = path_or_artifact if isinstance(path_or_artifact, Artifact) else None
    if art is None:
        path = Path(path_or_artifact)
        manifest_base = None
        if base is None:
            manifest_base = read_json(path / "manifest.json").get("base") or {}
            cfg = read_json(path / "config.json")
            base = load_base(manifest_base.get("name") or cfg["base"])
        art = load_artifact(path, KIND, base)
    elif base is not None and art.manifest.get("base") and not base_matches(art.manifest, base, art.path):
        raise LabError(f"{art.path} was trained on base {art.manifest['base']['name']!r}, "
                       f"but the loaded base is {base.name!r} (fingerprints differ)")
    if base is None:
        base = load_base(manifest_base_name(art.manifest) or art.config["base"])
    config = Config.from_dict(art.config)
    model = build(config, base).to(base.device)   # build already puts it there; the weights below are copied across
    own = dict(model.named_parameters())
    wanted = {n for n, p in own.items() if p.requires_grad}
    if set(art.tensors) != wanted:
        missing, extra = sorted(wanted - set(art.tensors)), sorted(set(art.tensors) - wanted)
        raise LabError(f"{art.path} holds other tensors than an RLF {config.core} core of this config (missing: "
                       f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'}): it was "
                       f"trained by an older lab; retrain it (`lab train rlf`, or `lab reproduce`)")
    with torch.no_grad():
        for n, t in art.tensors.items():
            if own[n].shape != t.shape:
                raise LabError(f"{art.path}: tensor {n} has shape {tuple(t.shape)}, this base/config needs "
                               f"{tuple(own[n].shape)} (trained on another base?)")
            own[n].copy_(t)
    model.eval()
    model.artifact = art
    return model


def train_or_load(config: Config, base=None) -> RLF:
    """The RLF module for `config` (carrying .config and .artifact): its artifact if one was made with
    this config on exactly this base, else trained now. base=None: `config.load_base()`."""
    if base is None:
        base = config.load_base()
    out_dir = default_out_dir(config, base)
    # a run is its config but for PIPELINE_FIELDS; from_dict fills fields an older artifact lacks with their
    # defaults (which reproduce the old behaviour)
    if ((out_dir / "config.json").exists() and Config.from_dict(read_json(out_dir / "config.json")).run_dict()
            == config.run_dict() and made_on(out_dir, base)):  # another fingerprint (a re-pretrained base): retrain
        model = load(out_dir, base)
    else:
        model = load(train(config, base, out_dir), base)
    model.config = config  # the caller's pipeline sizes; every field that shapes the run is equal
    return model
