"""`Config`: everything that defines a channels experiment, and its presets (smoke | quick | tiny | paper).

A config is saved as config.json beside each artifact. Which artifacts count as the same training run is
decided by views of it: `training_dict(arm)` for the adapter and text arms, `native_view` for the native track.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lab import LabError
from lab.channels.data import CAPABILITIES
from lab.channels.injection import MODES
from lab.config import ExperimentConfig

ARMS = ("channel", "text")


@dataclass
class Config(ExperimentConfig):
    """Everything that defines a channels experiment (saved as config.json beside each artifact).
    `base` is the frozen base of the adapter track (a preset, HF dir or hub name)."""

    MECHANISM: ClassVar[str] = "channels"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: tests and CI notebooks, on smoke-gpt2
        "smoke": dict(base="smoke-gpt2", steps=30, batch_size=16, eval_every=10, n_heldout=12, gen_tokens=6,
                      n_attribution=3, native_d=32, native_layers=2, native_steps=12, native_seq=32,
                      native_batch=8, native_docs=1000, native_seeds=2, compare_modes=()),
        # the main job: both adapter arms on the quick base (same shape as tiny-gpt2, so tiny's swept gate lr),
        # shorter training, fewer held-out items and shorter generations (a trained response is ~10 tokens); no
        # native track (three seeds of four models take ~40 min) and no xattn arm (both are in tiny): ~210 s on 2 cores
        "quick": dict(base="quick-gpt2", lr=0.12, steps=400, n_heldout=60, gen_tokens=12, n_attribution=12,
                      native=False, compare_modes=()),
        # the CPU experiment: minutes on tiny-gpt2, and the adapter track on tiny-mamba2 when it is on disk.
        # The gates' lr from a sweep on the validation split: `python bench/bench_channels.py --lr-sweep
        # --lrs=6e-2,0.12,0.24` (0.12 lowest; the text arm's in `text_lr`). Three native training seeds:
        # one run cannot tell a gap of a few thousandths of a nat from seed noise; the same for the adapter arms.
        "tiny": dict(base="tiny-gpt2", lr=0.12, native_seeds=3, adapter_seeds=3, extra_bases=("tiny-mamba2",)),
        # a GPU and a real HF base with a real sentence encoder (as published: BGE-M3)
        "paper": dict(base="gpt2", text_encoder="st:BAAI/bge-m3", steps=20_000, batch_size=64, lr=1e-3,
                      n_heldout=500, gen_tokens=24, native_d=768, native_layers=12, native_heads=12,
                      native_steps=50_000, native_seq=512, native_batch=32, native_docs=2_000_000),
    }
    PER_BASE: ClassVar[dict[tuple[str, str], dict[str, Any]]] = {
        # both arms' learning rates on tiny-mamba2 (at tiny-gpt2's, both arms' validation loss rose after step 200
        # there), from a sweep: `python bench/bench_channels.py --lr-sweep --base=tiny-mamba2`
        ("tiny", "tiny-mamba2"): dict(lr=6e-2, text_lr=1e-4, extra_bases=()),
    }

    # held-out corpus windows the native track's loss is scored on, by the native models' own preset (read from
    # their saved configs, so a class value rather than a field)
    NATIVE_WINDOWS: ClassVar[dict[str, int]] = {"smoke": 64}
    NATIVE_WINDOWS_DEFAULT: ClassVar[int] = 256

    PRESET_NOTES: ClassVar[dict[str, str]] = {
        "quick": "quick preset: the additive adapter and its text arm only, on the quick base; the xattn arm, the "
                 "adapter seeds and the native track (channels during pretraining, against channel-less baselines) "
                 "run in the tiny preset."}

    FORMAT: ClassVar[int] = 5  # bump when an arm's adapter layout or the encoder changes: stale artifacts are retrained

    mode: str = "additive"           # "additive" (gated projection) or "xattn" (multi-token cross-attention)
    site: str = "resid_pre"          # where the channels enter each block
    n_tokens: int = 4                # xattn: key/value tokens per channel
    n_heads: int = 4                 # xattn: attention heads
    text_encoder: str = "base"       # "base" (mean-pooled hidden state) or "st:<sentence-transformers model>"
    text_layer: int | str = "embed"  # base encoder: "embed" (centred input embeddings), or an int resid_pre (encoders.py)
    proj_lr_ratio: float = 0.1       # projections learn at this fraction of the gates' rate (reparametrised)
    text_init: str = "identity"      # text channels' projection at init: "identity" (base encoder, additive) or "random"
    capabilities: tuple = CAPABILITIES
    # what the adapter is trained to say: "response" (a short templated response that uses the marked item or the
    # state's register, as the published adapter trained on full responses) or "word" (the one-word target alone:
    # a departure kept as an option, whose generation beyond the first word is the frozen base's)
    targets: str = "response"
    # other injection modes trained like `mode` (first adapter seed) and reported beside it, marked "[<mode>]"
    # (one equal to `mode` is skipped)
    compare_modes: tuple = ("xattn",)
    # adapter training
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 50
    eval_every: int = 100            # steps between alpha snapshots / held-out loss on the progress bar
    train_text_arm: bool = True      # also train the equally-trained text arm (channel-vs-text experiment)
    # the text arm's LoRA lr (same steps, batches and schedule as the injector), from a sweep:
    # `python bench/bench_channels.py --lr-sweep --arm=text`, read on the validation split (training templates and
    # entities, its own draws: `data.validation_items`), never on the held-out pools. On tiny-gpt2, mean validation
    # loss of the last four evaluations: 3e-4 0.888, 1e-3 0.750, 3e-3 0.665, 6e-3 0.677
    text_lr: float = 3e-3
    # independent training runs of the adapter and text arms (seeds seed, seed+1, ...): claims about training are
    # tested across them (paired t), as the native track's are
    adapter_seeds: int = 1
    # the xattn mode's lr: its q/k/v/o maps are full-rate parameters (no reparametrised slow projection), so the
    # gates' additive rate would blow them up. From `python bench/bench_channels.py --lr-sweep --mode=xattn
    # --lrs=1e-3,3e-3,1e-2` on the validation split (tiny-gpt2, last four evaluations: 0.801, 0.779, 0.913).
    xattn_lr: float = 3e-3
    # evaluation
    n_heldout: int = 240             # held-out items per selection capability / prompt pairs per register one
    gen_tokens: int = 20             # greedy tokens per generation (a whole trained response)
    n_attribution: int = 24          # held-out items per capability for captum attributions
    # native track: a small GPT-2 trained from scratch with channels from layer 1 (corpus documents carry their
    # generator's state as channels), vs channel-less baselines: width-matched (d = native_d) and two bracketing its
    # parameter count
    native: bool = True
    native_d: int = 128
    native_layers: int = 4
    native_heads: int = 4
    native_steps: int = 800
    native_seq: int = 96             # corpus window length
    native_batch: int = 16           # corpus windows per step (plus as many channel items)
    native_lr: float = 2e-3
    native_docs: int = 20_000        # lab-corpus training documents
    # independent training runs of the three native models (seeds seed, seed+1, ...): whether training with channels
    # helps is a question about training runs, so the report's test of it is across these, not across windows
    native_seeds: int = 1
    # other bases whose adapter track (no text arm, no native track, no attribution) joins this config's report
    # when they are on disk, marked "[<base>]". Which report an artifact joins is not part of its training, so
    # this field is left out of config.json (`to_dict`).
    extra_bases: tuple = ()

    def check(self) -> None:
        self.require_one_of("text_init", ("identity", "random"))
        self.require_one_of("mode", MODES)
        self.require_one_of("targets", ("response", "word"))
        if isinstance(self.compare_modes, str) or any(m not in MODES for m in self.compare_modes):
            raise LabError(f"{self.label()}: compare_modes must be a tuple of injection modes from {MODES}, "
                           f"got {self.compare_modes!r}")
        bad = [c for c in self.capabilities if c not in CAPABILITIES]
        if bad or not self.capabilities:
            raise LabError(f"{self.label()}: unknown capabilities {bad}; expected a non-empty subset of {CAPABILITIES}")
        for k in ("steps", "batch_size", "n_heldout", "gen_tokens", "native_steps", "native_d", "native_layers",
                  "native_batch", "native_seq", "native_seeds", "adapter_seeds"):
            if getattr(self, k) < 1:
                raise LabError(f"{self.label()}: {k} must be a positive int, got {getattr(self, k)!r}")
        if self.base in self.extra_bases or not all(isinstance(b, str) and b.strip() for b in self.extra_bases):
            raise LabError(f"{self.label()}: extra_bases must be base names other than base ({self.base!r}), "
                           f"got {self.extra_bases!r}")

    @classmethod
    def native_windows(cls, preset: str) -> int:
        """How many held-out windows score the native models of `preset`."""
        return cls.NATIVE_WINDOWS.get(preset, cls.NATIVE_WINDOWS_DEFAULT)

    def arm_lr(self, arm: str) -> float:
        """The learning rate an arm trains at: the text arm's, the xattn injector's, or the additive gates'."""
        return self.text_lr if arm == "text" else (self.xattn_lr if self.mode == "xattn" else self.lr)

    def adapter_seed_list(self) -> list[int]:
        """The adapter and text arms' training seeds: seed, seed + 1, ... (`adapter_seeds` of them)."""
        return [self.seed + k for k in range(self.adapter_seeds)]

    def on_base(self, name: str) -> "Config":
        """This config on another base, as that base joins the report: the preset's values for that base
        (`PER_BASE`), no text arm, no native track, no further bases."""
        return self.with_(**{**self.PER_BASE.get((self.preset_name, name), {}),
                             "base": name, "train_text_arm": False, "native": False, "extra_bases": (),
                             "adapter_seeds": 1, "compare_modes": ()})

    def to_dict(self) -> dict:
        """The config as written to config.json: every field but `extra_bases`, plus the artifact `format`."""
        d = super().to_dict()
        del d["extra_bases"]
        d["format"] = self.FORMAT
        return d

    # the other arm's training knobs: changing the text arm's lr must not retrain the injector, nor the reverse.
    # (Evaluation settings stay in: `evaluate` reads them from the artifact's config.)
    _OTHER_ARM: ClassVar[dict[str, tuple[str, ...]]] = {"channel": ("text_lr",),
                                                        "text": ("lr", "proj_lr_ratio", "text_init", "xattn_lr")}

    def training_dict(self, arm: str) -> dict:
        """`to_dict` without the other arm's or the native track's training knobs: what decides whether an
        artifact on disk is this arm's, and what keys its checkpoints."""
        return self.training_view(self.to_dict(), arm)

    @classmethod
    def training_view(cls, saved: dict, arm: str) -> dict:
        """The same restriction of a saved config dict (its format kept, so a stale layout still differs)."""
        if arm not in ARMS:
            raise LabError(f"arm must be one of {ARMS}, got {arm!r}")
        drop = set(cls._OTHER_ARM[arm])
        # the native track's knobs and whether a text arm is trained at all shape neither arm's training: adding
        # native seeds, or a base joining another's report (no text arm, no native track), must not retrain an adapter
        drop |= {f.name for f in fields(cls) if f.name.startswith("native")} | {"train_text_arm", "adapter_seeds",
                                                                                 "compare_modes"}
        return {k: v for k, v in saved.items() if k not in drop}

    # what the native track's three models do not depend on: the adapter arms' training and evaluation knobs, and how
    # many native seeds there are (a property of the track, not of one run)
    _NOT_NATIVE: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "lr", "warmup", "eval_every", "train_text_arm",
                                               "text_lr", "n_heldout", "gen_tokens", "n_attribution", "native",
                                               "native_seeds", "adapter_seeds", "compare_modes", "xattn_lr")

    @classmethod
    def native_view(cls, saved: dict) -> dict:
        """A saved config dict without `_NOT_NATIVE`: what decides whether a native model on disk is this run's
        (another adapter lr or step count must not retrain three seeds of three models)."""
        return {k: v for k, v in saved.items() if k not in cls._NOT_NATIVE}
