"""The combiner: h' = (1 + alpha) * h + M @ T + beta, zero at init, read by the frozen head.

h is the final-normed state (what the head reads: the base's own final norm on the last block's output),
so logits = head(h') and at init h' = 1.0 * h + 0 + 0 = h bit for bit: the base's logits exactly (tested
with max |diff| == 0.0 on GPT-2, Mamba2, Llama, Qwen2). Against the model's own `logits` tensor the
difference is <= ~2e-6 (the same head on a (B, d) slice rounds differently in BLAS than on (B, T, d)), so
the evaluators score the base and the identity through the very same `head(h)` path.
The parameters stay float32 on a half-precision base (a bf16 alpha would round 1 + alpha to steps of
2^-8): the combiner computes in its own dtype and hands h' back in h's dtype.
Parameters: 1 + d*d + d (262,657 at d = 512, as published).

`FittedCombiners` is what `load` / `train_or_load` return: every fitted combiner of one artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lab import LabError
from lab.store import Artifact

if TYPE_CHECKING:
    from lab.combiner.config import Config

FITS = ("ce", "ridge")   # cross-entropy by AdamW (as published) and closed-form ridge (fit.py)
CONTROL = "control"      # the CE fit of alpha and beta only (M = 0): what recalibration alone buys
UNSCALED_FEED = "final"       # the feed of the unscaled-feed row: h as the base leaves it (see thinking.py)
UNSCALED_FEED_FIT = "ce_unscaled"  # the k=1 CE fit on features made with UNSCALED_FEED


class Combiner(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        if not isinstance(d, int) or d < 1:
            raise LabError(f"d must be a positive int, got {d!r}")
        self.d = d
        self.alpha = nn.Parameter(torch.zeros(()))     # scalar gain on h
        self.M = nn.Parameter(torch.zeros(d, d))        # (d_out, d_in) mixes the thought in
        self.beta = nn.Parameter(torch.zeros(d))        # bias
        self.init_weights()

    def init_weights(self) -> None:
        """All zeros: the combiner starts as the exact identity on h."""
        with torch.no_grad():
            self.alpha.zero_()
            self.M.zero_()
            self.beta.zero_()

    def check(self, h: torch.Tensor, t: torch.Tensor) -> None:
        if h.shape[-1] != self.d or t.shape[-1] != self.d:
            raise LabError(f"feature widths do not match the combiner: h has width {h.shape[-1]}, "
                           f"T has width {t.shape[-1]}, expected d = {self.d} for both")
        if h.shape != t.shape:
            raise LabError(f"h {tuple(h.shape)} and T {tuple(t.shape)} must have the same shape (B, d)")

    def forward(self, h: torch.Tensor, t: torch.Tensor, alpha: float | None = None,
                m_scale: float = 1.0) -> torch.Tensor:
        """h, t: (B, d) -> h' (B, d). `alpha` overrides the fitted alpha and `m_scale` scales M and beta
        (the app's sliders); the defaults use the fitted values unchanged. Computed in the parameters' dtype
        (h and t cast to it: no-ops when they match), returned in h's dtype."""
        self.check(h, t)
        out_dtype, h, t = h.dtype, h.to(self.M.dtype), t.to(self.M.dtype)
        a = self.alpha if alpha is None else torch.as_tensor(alpha, dtype=h.dtype, device=h.device)
        if m_scale == 1.0:
            mix = F.linear(t, self.M, self.beta)                     # (B, d)
        else:
            mix = F.linear(t, self.M * m_scale, self.beta * m_scale)
        return ((1 + a) * h + mix).to(out_dtype)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{n}": p.detach().clone() for n, p in self.named_parameters()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "", d: int | None = None) -> "Combiner":
        try:
            M = tensors[f"{prefix}M"]
        except KeyError:
            raise LabError(f"no combiner named {prefix!r} in these tensors (have: {sorted(tensors)[:8]}...)") from None
        if d is not None and M.shape != (d, d):
            raise LabError(f"combiner {prefix!r} has M of shape {tuple(M.shape)}, but the base has width d = {d}")
        c = cls(int(M.shape[0]))
        with torch.no_grad():
            for n, p in c.named_parameters():
                p.copy_(tensors[f"{prefix}{n}"])
        return c.requires_grad_(False).eval()


def combined_logits(base, combiner: Combiner, h: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    """Frozen head on h' (no final norm: h is already final-normed; Base.logits casts to the head's dtype). (B, d) -> (B, V)."""
    return base.logits(combiner(h, t, **kw), normed=True)


def build(config: "Config", base) -> Combiner:
    """A zero-init (identity) combiner for this base (float32 parameters on any base dtype)."""
    return Combiner(base.d_model).to(base.device)


@dataclass
class FittedCombiners:
    """One trained artifact, loaded on its base: a combiner per (fit, k) for k = 1..config.k_max, and the
    no-thought control. `model[("ce", 1)]` is the published arm."""

    config: "Config"
    artifact: Artifact
    base: object                                   # the frozen lab.bases.Base the combiners were fitted on
    combiners: dict[tuple[str, int], Combiner]
    control: Combiner
    # per fit seed: {(fit, k): Combiner} with (CONTROL, 1) and, if fitted, (UNSCALED_FEED_FIT, 1); the first seed's
    # are `combiners` and `control`
    by_seed: dict[int, dict[tuple[str, int], Combiner]] | None = None

    @classmethod
    def from_artifact(cls, artifact: Artifact, config: "Config", base) -> "FittedCombiners":
        def get(prefix: str) -> Combiner:
            return Combiner.from_tensors(artifact.tensors, prefix, base.d_model).to(base.device)

        by_seed = {}
        for i, seed in enumerate(config.fit_seeds):
            tag = "" if i == 0 else f"seed{seed}."
            row = {(fit, k): get(f"{fit}.k{k}.{tag}") for fit in FITS for k in range(1, config.k_max + 1)}
            row[(CONTROL, 1)] = get(f"{CONTROL}.{tag}")
            if f"{UNSCALED_FEED_FIT}.k1.{tag}M" in artifact.tensors:
                row[(UNSCALED_FEED_FIT, 1)] = get(f"{UNSCALED_FEED_FIT}.k1.{tag}")
            by_seed[seed] = row
        first = by_seed[config.fit_seeds[0]]
        combs = {key: c for key, c in first.items() if key[0] in FITS}
        return cls(config, artifact, base, combs, first[(CONTROL, 1)], by_seed)

    def __getitem__(self, fit_k: tuple[str, int]) -> Combiner:
        return self.combiners[fit_k]

    @property
    def fits(self) -> dict:
        """The training record per fit: {"k1": {"ce": {...}, "ridge": {...}}, ..., "control": {...}}."""
        return self.artifact.manifest["metrics"]["fits"]

    def fit_table(self) -> list[dict]:
        """One row per k: the validation nats of the base and both fits, and ridge's lambda and step."""
        return [{"k": k, "base val nats": f["ce"]["val_nats_base"], "ce val nats": f["ce"]["val_nats"],
                 "ridge val nats": f["ridge"]["val_nats"], "ridge lambda": f["ridge"]["lambda"],
                 "ridge step": f["ridge"]["step"]} for k, f in self.fits.items() if k.startswith("k")]
