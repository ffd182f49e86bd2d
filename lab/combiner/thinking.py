"""The thinking step: one (or k) Coconut-style continuous thoughts on a frozen base.

Given a context x_0..x_{n-1}, let h be the *final-normed* state at position n-1 (the vector the
head reads, so head(h) is exactly the base's next-token logits). The first thought appends h as
the input embedding of a new position n and reads the final-normed output there: T_1. Thought
T_j appends T_{j-1} the same way, so T_k costs k extra positions.

Which input, and why (the same rule for every family):
  feed="final_embed_rms" (the default, as published): h, RMS-normalised to the base's input-embedding
  scale (the mean RMS of the token-embedding rows, times `scale`, 1 by default). The published model
  RMS-normalises every input embedding, tokens and the thought alike, so there the thought enters at the
  scale of a token embedding; GPT-2 and the lab bases do not normalise their inputs, so the lab does it
  for the thought. Its direction is h's: the base's own final norm on the last block's output (GPT-2:
  ln_f; Llama/Qwen2: model.norm; Mamba2: norm_f without a gate), which with a tied head points toward
  the tokens the base is about to predict.
  feed="final": h itself, unscaled (Coconut's last hidden state). On the lab's GPT-2 bases |h| is ~20x a
  token embedding's norm, so the thought dominates its position and T_1 comes out nearly h itself
  (cos ~ 1): kept as an option to show that.
  Neither needs parameters, so the combiner at zero init stays a bit-exact identity.

Two equivalent ways to run it (tested to agree): `cached=True` continues the base's own
key/value cache one position per thought (attention families: GPT-2, Llama, Qwen2), `cached=False`
re-runs the whole sequence with `inputs_embeds` through `lab.hooks.forward` for every thought
(any family; Mamba2 always uses it).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from lab import LabError
from lab.hooks import capture, forward

FEEDS = ("final_embed_rms", "final")
CACHED_FAMILIES = ("gpt2", "llama", "qwen2")


def check_k(k: int, k_max: int = 4) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= k_max:
        raise LabError(f"k (latent steps) must be an int in 1..{k_max}, got {k!r}")
    return k


def check_scale(scale) -> float:
    """A feed scale must be a positive finite number: 0 would feed a zero vector, NaN poisons every state."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise LabError(f"the feed scale must be a positive finite number (a multiple of the input-embedding RMS), "
                       f"got {scale!r}")
    return float(scale)


def embedding_rms(base) -> torch.Tensor:
    """The base's input-embedding scale: the mean RMS of its token-embedding rows (a float32 scalar)."""
    return base.embed.weight.detach().float().pow(2).mean(-1).sqrt().mean()


def thought_input(base, h: torch.Tensor, feed: str = "final_embed_rms", scale: float = 1.0) -> torch.Tensor:
    """The input embedding of a thought position from a final-normed state h (B, d), in the base's dtype
    (a half-precision Mamba2 keeps its residual, and so its final state, in float32)."""
    check_scale(scale)
    if feed == "final":
        return h.to(base.dtype)
    if feed == "final_embed_rms":
        rms = h.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8)
        return (h.float() * (scale * embedding_rms(base) / rms)).to(base.dtype)
    raise LabError(f"feed must be one of {FEEDS}, got {feed!r}")


@dataclass
class Thoughts:
    """h: (B, d) final-normed state at the last context position; T: (B, k, d) thoughts T_1..T_k."""
    h: torch.Tensor
    T: torch.Tensor
    forwards: int         # model forwards spent (1 for h, plus one per thought)
    positions: int        # token positions processed per row, summed over those forwards


def _final_last(base, **kw) -> tuple[torch.Tensor, object]:
    with capture(base, layers=[], final=True) as cache:
        out = base.model(**kw)
    return cache["final"][:, -1], out


def _kv_cache_name(base) -> str:
    """The forward's key-value cache argument and output field: `cache` from transformers 5.x (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(type(base.model).forward).parameters else "past_key_values"


@torch.no_grad()
def think(base, ids: torch.Tensor, k: int = 1, feed: str = "final_embed_rms", cached: bool | None = None,
          scale: float = 1.0) -> Thoughts:
    """h and the thoughts T_1..T_k after each row of `ids` (B, n); rows are unpadded contexts."""
    check_k(k)
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise LabError(f"ids must be (B, n) with n >= 1, got {tuple(ids.shape)}")
    n = ids.shape[1]
    base.check_length(n + k)
    if cached is None:
        cached = base.arch in CACHED_FAMILIES
    if cached and base.arch not in CACHED_FAMILIES:
        raise LabError(f"cached thinking is implemented for {CACHED_FAMILIES}, not {base.arch!r}; use cached=False")
    thoughts = []
    if cached:
        name = _kv_cache_name(base)
        h, out = _final_last(base, input_ids=ids, use_cache=True)
        past, x = getattr(out, name), h
        for _ in range(k):  # one new position per thought, attending to the cached context
            x, out = _final_last(base, inputs_embeds=thought_input(base, x, feed, scale)[:, None], use_cache=True,
                                 **{name: past})
            past = getattr(out, name)
            thoughts.append(x)
        return Thoughts(h, torch.stack(thoughts, 1), 1 + k, n + k)
    with capture(base, layers=[], final=True) as cache:
        forward(base, input_ids=ids)
    h = cache["final"][:, -1]
    seq, x, positions = base.embed(ids), h, n  # (B, n, d): exactly what the model embeds from ids
    for _ in range(k):  # full recompute: the whole context plus every thought so far
        seq = torch.cat([seq, thought_input(base, x, feed, scale)[:, None]], 1)
        with capture(base, layers=[], final=True) as cache:
            forward(base, inputs_embeds=seq)
        x = cache["final"][:, -1]
        positions += seq.shape[1]
        thoughts.append(x)
    return Thoughts(h, torch.stack(thoughts, 1), 1 + k, positions)


@torch.no_grad()
def think_every_position(base, ids: torch.Tensor, k: int = 1, feed: str = "final_embed_rms",
                         batch: int = 64, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For one sequence ids (n,) or (1, n): h (n, d) and T (n, k, d) at every position t, each thought
    seeing only x_0..x_t. Rows are right-padded copies of the prefix; causality makes padding exact."""
    check_k(k)
    ids = ids.reshape(-1).to(base.device)
    n = ids.numel()
    if n < 1:
        raise LabError("expected a non-empty token sequence")
    base.check_length(n + k)
    with capture(base, layers=[], final=True) as cache:
        forward(base, input_ids=ids[None])
    hs = cache["final"][0]                                   # (n, d)
    emb = base.embed(ids[None])[0]                           # (n, d)
    out = torch.empty(n, k, base.d_model, dtype=hs.dtype, device=hs.device)
    for s in range(0, n, batch):
        rows = torch.arange(s, min(n, s + batch), device=ids.device)
        L = int(rows.max()) + 1 + k
        seq = torch.zeros(len(rows), L, base.d_model, dtype=emb.dtype, device=hs.device)  # input embeddings
        for r, t in enumerate(rows.tolist()):
            seq[r, : t + 1] = emb[: t + 1]
        x = hs[rows]
        for j in range(k):
            seq[torch.arange(len(rows), device=seq.device), rows + 1 + j] = thought_input(base, x, feed, scale)
            with capture(base, layers=[], final=True) as cache:
                forward(base, inputs_embeds=seq[:, : int(rows.max()) + 2 + j])
            x = cache["final"][torch.arange(len(rows), device=seq.device), rows + 1 + j]
            out[rows, j] = x
    return hs, out
