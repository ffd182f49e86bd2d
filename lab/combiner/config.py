"""The thinking-combiner experiment's `Config` and its presets (smoke | quick | tiny | paper).

Contexts stay inside what the base was trained on (tiny: 128 positions): chunk 120 + up to 4 thoughts,
sliding window 128 / stride 32 (published: 2048 / 64, on a 2048-context base).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lab import LabError, models_dir
from lab.combiner.bpb import check_window
from lab.combiner.thinking import FEEDS, check_k, check_scale
from lab.config import ExperimentConfig

KIND = "combiner"   # the artifact kind in its manifest
PUBLISHED_CE = dict(ce_steps=80, ce_lr=1e-3, ce_weight_decay=0.01)   # Config.preset(name, **PUBLISHED_CE)


@dataclass
class Config(ExperimentConfig):
    MECHANISM: ClassVar[str] = KIND
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": dict(base="smoke-gpt2", n_features=1024, ctx_min=16, ctx_max=48, train_docs=2000,
                      ce_steps=40, ce_batch=256, eval_docs=300, chunk_len=48, window=64, stride=16,
                      check_tokens=60, ridge_lambdas=(1e-2, 1e-1)),
        # the main job: the tiny experiment on the quick base, half the features and held-out text
        "quick": dict(base="quick-gpt2", n_features=8192, train_docs=10000, eval_docs=4000,
                      ridge_lambdas=(1e-3, 1e-2, 1e-1), ce_lr=3e-4, ce_weight_decay=0.1),  # `--sweep --preset quick`
        "tiny": dict(),
        "paper": dict(base="Qwen/Qwen2.5-0.5B", n_features=16384, ctx_min=512, ctx_max=2048, chunk_len=2048,
                      window=2048, stride=64, eval_docs=20000, feature_batch=8, eval_batch=4, check_tokens=0),
    }

    k_max: int = 4                   # combiners are fitted for every k = 1..k_max latent steps
    feed: str = "final_embed_rms"    # thought input: h at the input-embedding scale, as published (see thinking.py)
    feed_scale: float = 1.0          # the thought input's RMS, as a multiple of the mean token-embedding RMS
    unscaled_feed_row: bool = True        # also fit and score k=1 with feed="final" (h unscaled, ~20x a token embedding)
    fit_seeds: tuple = (0, 1, 2)     # every fit is repeated per seed (its sample of training windows, train/validation
                                     # split and batch order; the init is the published zero init for all): across-seed
                                     # intervals
    feature_samples: str = "per_seed"  # "per_seed": each fit seed draws its own training windows; "shared": one sample
                                       # for all seeds (3x cheaper features; the interval then leaves sampling out)
    # features (training split of the lab corpus)
    n_features: int = 16384          # cached (h, T, next token) triples, as published
    ctx_min: int = 32                # context lengths drawn uniformly in [ctx_min, ctx_max]
    ctx_max: int = 120
    train_docs: int = 20000          # training documents the windows are drawn from
    feature_batch: int = 64
    val_fraction: float = 0.1        # of the features, for early numbers, ridge lambda and step length
    # cross-entropy fit (the published recipe: AdamW lr 1e-3, batch 512, 80 steps, weight decay 0.01, is
    # PUBLISHED_CE; `python bench/bench_combiner.py --sweep` picks lr, steps and weight decay on the validation split)
    # the validation-best point of `--sweep --preset tiny` (lr 3e-5, 80 steps, weight decay 0.01; weight decay
    # barely moves it, and every point with a larger lr x steps ends above it: the published recipe ends 0.0053
    # nats above the identity start on tiny-gpt2's validation split)
    ce_steps: int = 80
    ce_batch: int = 512
    ce_lr: float = 3e-5
    ce_weight_decay: float = 0.01
    # ridge fit
    ridge_lambdas: tuple = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # relative to the mean diagonal of T^T T
    # evaluation on lab.corpus.heldout_text(eval_docs)
    eval_docs: int = 8000
    separator: str = "eos"           # between held-out documents: the base's EOS ("eos") or heldout_text's blank line ("text")
    chunk_len: int = 120             # chunked last-position evaluator; chunk_len + k_max <= trained context
    window: int = 128                # sliding-window evaluator (the base only)
    stride: int = 32
    sliding_max_tokens: int = 0      # 0: the whole held-out text; else its first N tokens
    check_tokens: int = 200          # sliding vs naive per-token recompute on this many tokens (0: skip)
    eval_batch: int = 32

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        # a saved config without the field fitted every seed on one shared sample
        return {"feature_samples": "shared", **saved}

    def check(self) -> None:
        try:
            check_k(self.k_max)
        except LabError as e:
            raise LabError(f"{self.label()}: k_max: {e}") from None
        self.require_one_of("separator", ("eos", "text"))
        self.require_one_of("feed", FEEDS)
        try:
            check_scale(self.feed_scale)
        except LabError as e:
            raise LabError(f"{self.label()}: feed_scale: {e}") from None
        self.require_one_of("feature_samples", ("per_seed", "shared"))
        if not self.fit_seeds or len(set(self.fit_seeds)) != len(self.fit_seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in self.fit_seeds):
            raise LabError(f"{self.label()}: fit_seeds must be distinct ints, got {self.fit_seeds!r}")
        check_window(self.window, self.stride)
        if not 1 <= self.ctx_min <= self.ctx_max:
            raise LabError(f"{self.label()}: need 1 <= ctx_min <= ctx_max, got {self.ctx_min}, {self.ctx_max}")
        self.require_positive("n_features", "train_docs", "feature_batch", "ce_steps", "ce_batch", "ce_lr", "eval_docs",
                              "chunk_len", "eval_batch")
        self.require_nonnegative("ce_weight_decay", "sliding_max_tokens", "check_tokens")
        if not 0 < self.val_fraction < 1:
            raise LabError(f"{self.label()}: val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not self.ridge_lambdas or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                             for v in self.ridge_lambdas):
            raise LabError(f"{self.label()}: ridge_lambdas must be a non-empty list of positive numbers, "
                           f"got {self.ridge_lambdas!r}")

    def artifact_path(self) -> Path:
        """Where this config's fitted combiners live: models/combiner-<preset>-<base>."""
        return models_dir() / f"{KIND}-{self.preset_name}-{Path(self.base).name}"

    def saved(self) -> dict:
        """The config as its artifact records it. `preset_name` only names the artifact's folder, not what it
        holds, so it is left out: the saved config (and its hash) is what determines the weights."""
        return {k: v for k, v in self.to_dict().items() if k != "preset_name"}
