"""Channel encoders: human-meaningful state -> the channel vectors the injector reads.

    time        (hour in [0, 24), weekday 0..6 or a name)  -> 8 periodic features
    affect      (valence, arousal) in [-1, 1]               -> 2 values
    ethics      named posture per category                  -> one value per category in [-1, 1]
    memory / identity / continuity   text                   -> an embedding of the text

Text embeddings default to the base's own hidden state, mean-pooled over the text's tokens at a chosen
layer (`text_layer`): "embed" (default) = the base's input embedding layer (the stream entering block 0,
without GPT-2's learned position embeddings), centred on the vocabulary's mean embedding; an int i = the
resid_pre of block i; n_layers = the final normed state. Why "embed": a tied unembedding reads the same
space, so a channel that carries "the walnut" can raise " walnut" for entities the adapter never saw in
training, which is what a held-out split with disjoint entities asks. Measured on tiny-gpt2 before any
training (identity projection, gate opened by hand, held-out memory items, chance 1/3): resid_pre 0
(with positions) 0.38, token embeddings 0.48, centred token embeddings 0.58: GPT-2's position
embeddings dominate the mean of a short text, and the vocabulary mean is a shared offset.
Embeddings are L2-normalised and scaled to norm sqrt(width) so every channel's features have
per-dimension RMS ~ 1.

Optionally a sentence-transformers model the user names (`TextEncoder("st:<name or path>")`). It is
never downloaded by the lab: it must already be installed and cached, else a clear LabError.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from lab import LabError, hooks
from lab.corpus import WEEKDAYS

ETHICS_CATEGORIES = ("physical_safety", "privacy", "honesty", "legality", "health", "finance")
ETHICS_POSTURES = {"permissive": -1.0, "relaxed": -0.5, "balanced": 0.0, "careful": 0.5, "cautious": 1.0}
TIME_FEATURES = ("hour_sin", "hour_cos", "hour2_sin", "hour2_cos", "weekday_sin", "weekday_cos",
                 "weekend", "circadian_alertness")
WIDTHS_FIXED = {"affect": 2, "time": len(TIME_FEATURES), "ethics": len(ETHICS_CATEGORIES)}
TEXT_CHANNELS = ("memory", "identity", "continuity")


def _finite_number(name: str, v) -> float:
    # numbers.Real admits numpy scalars (np.float32(8) from a slider array), not bools or tensors
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise LabError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise LabError(f"{name} must be finite, got {v}")
    return v


def weekday_index(weekday: int | str) -> int:
    if isinstance(weekday, str):
        names = [w.lower() for w in WEEKDAYS]
        if weekday.lower() not in names:
            raise LabError(f"unknown weekday {weekday!r}; expected one of {WEEKDAYS} or 0..6 (Monday = 0)")
        return names.index(weekday.lower())
    if isinstance(weekday, bool) or not isinstance(weekday, numbers.Integral) or not 0 <= weekday <= 6:
        raise LabError(f"weekday must be 0..6 (Monday = 0) or a day name, got {weekday!r}")
    return int(weekday)


def encode_time(hour: float, weekday: int | str | None) -> torch.Tensor:
    """(8,): hour on the 24 h circle (and its 2nd harmonic), weekday on the 7-day circle, a weekend
    flag, and a circadian alertness curve peaking mid-afternoon (cos of (hour - 15) / 24 turns).
    weekday None (a state that names no day, e.g. a dialog document): the three weekday features are 0."""
    h = _finite_number("hour", hour)
    if not 0 <= h < 24:
        raise LabError(f"hour must be in [0, 24), got {hour}")
    t = 2 * math.pi * h / 24
    if weekday is None:
        day = [0.0, 0.0, 0.0]
    else:
        d = weekday_index(weekday)
        w = 2 * math.pi * d / 7
        day = [math.sin(w), math.cos(w), 1.0 if d >= 5 else -1.0]
    return torch.tensor([math.sin(t), math.cos(t), math.sin(2 * t), math.cos(2 * t), *day,
                         math.cos(2 * math.pi * (h - 15) / 24)])


def encode_affect(valence: float, arousal: float) -> torch.Tensor:
    """(2,): valence and arousal, each in [-1, 1]."""
    v, a = _finite_number("valence", valence), _finite_number("arousal", arousal)
    for name, x in (("valence", v), ("arousal", a)):
        if not -1 <= x <= 1:
            raise LabError(f"{name} must be in [-1, 1], got {x}")
    return torch.tensor([v, a])


def encode_ethics(postures: str | float | Mapping[str, str | float]) -> torch.Tensor:
    """(6,): one posture per category, -1 permissive .. +1 cautious.

    postures: a posture name or number for every category, or {category: name or number}; categories
    not named are "balanced" (0)."""
    def value(cat, p):
        if isinstance(p, str):
            if p not in ETHICS_POSTURES:
                raise LabError(f"unknown ethics posture {p!r} for {cat!r}; expected one of {list(ETHICS_POSTURES)} "
                               f"or a number in [-1, 1]")
            return ETHICS_POSTURES[p]
        x = _finite_number(f"ethics posture for {cat!r}", p)
        if not -1 <= x <= 1:
            raise LabError(f"ethics posture for {cat!r} must be in [-1, 1], got {x}")
        return x

    if isinstance(postures, Mapping):
        unknown = [c for c in postures if c not in ETHICS_CATEGORIES]
        if unknown:
            raise LabError(f"unknown ethics categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                           f"expected some of {list(ETHICS_CATEGORIES)}")
        return torch.tensor([value(c, postures.get(c, 0.0)) for c in ETHICS_CATEGORIES])
    return torch.tensor([value(c, postures) for c in ETHICS_CATEGORIES])


@dataclass
class ChannelState:
    """One row of human-meaningful channel state; None = that channel is off (zero vector)."""
    memory: str | None = None
    affect: tuple[float, float] | None = None         # (valence, arousal)
    time: tuple[float, int | str | None] | None = None  # (hour, weekday or None)
    ethics: str | float | dict | None = None          # posture name/number or {category: posture}
    identity: str | None = None
    continuity: str | None = None

    def __post_init__(self):
        # the shape of each field is checked here, so ChannelState(affect=0.5) fails at once with a
        # LabError rather than later inside an encoder; the values' ranges are the encoders' to check
        for k in ("affect", "time"):
            v = getattr(self, k)
            if v is not None:
                if not isinstance(v, (list, tuple)) or len(v) != 2:
                    raise LabError(f"channel {k!r} expects a pair "
                                   f"{'(valence, arousal)' if k == 'affect' else '(hour, weekday)'}, got {v!r}")
                setattr(self, k, tuple(v))
        for k in TEXT_CHANNELS:
            v = getattr(self, k)
            if v is not None and not isinstance(v, str):
                raise LabError(f"channel {k!r} expects a text (str), got {type(v).__name__} {v!r}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelState":
        if not isinstance(d, Mapping):
            raise LabError(f"a channel state must be a ChannelState or a mapping channel -> value, got {type(d).__name__}")
        unknown = [k for k in d if k not in cls.__dataclass_fields__]
        if unknown:
            raise LabError(f"unknown channel name(s) {unknown}; channels are {list(cls.__dataclass_fields__)}")
        return cls(**d)


class TextEncoder:
    """Text -> (N, dim) embeddings: the base's mean-pooled hidden state, or a named sentence-transformers model.

    spec: "base" (default; `layer` picks the hidden state) or "st:<model name or local path>".
    """

    def __init__(self, base=None, spec: str = "base", layer: int | str = "embed"):
        self.spec, self.layer, self.base = spec, layer, base
        self._cache: dict[str, torch.Tensor] = {}
        if spec == "base":
            if base is None:
                raise LabError("the 'base' text encoder needs a base")
            if layer != "embed" and (not isinstance(layer, int) or isinstance(layer, bool)
                                     or not 0 <= layer <= base.n_layers):
                raise LabError(f"text_layer must be 'embed' or in 0..{base.n_layers} for {base.name!r} "
                               f"(0..{base.n_layers - 1}: resid_pre of that block, {base.n_layers}: final), got {layer!r}")
            self.dim = base.d_model
            self.name = f"{base.name}:mean-pool-{layer}"
        elif isinstance(spec, str) and spec.startswith("st:") and len(spec) > 3:
            self._st = self._load_sentence_transformer(spec[3:], base.device if base is not None else "cpu")
            self.dim = int(self._st.get_sentence_embedding_dimension())
            self.name = spec
        else:
            raise LabError(f"text encoder must be 'base' or 'st:<sentence-transformers model>', got {spec!r}")

    @staticmethod
    def _load_sentence_transformer(name: str, device):
        try:
            from sentence_transformers import SentenceTransformer  # noqa: PLC0415  (optional, heavy)
        except ImportError:
            raise LabError(f"text encoder 'st:{name}' needs the sentence-transformers package, which is not installed "
                           f"(pip install sentence-transformers, then place the model in the HF cache; "
                           f"the lab never downloads weights). Use text_encoder='base' for the offline default.") from None
        try:
            return SentenceTransformer(name, local_files_only=True, device=str(device))  # beside the base
        except Exception as e:  # missing from the cache, or not a sentence-transformers model
            raise LabError(f"sentence-transformers model {name!r} is not available offline "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           f"put it in the HF cache or pass a local path") from None

    @torch.no_grad()
    def _embed_base(self, texts: list[str]) -> torch.Tensor:
        b = self.base
        ids, mask = b.encode(texts)
        m = mask.unsqueeze(-1).float()
        if self.layer == "embed":
            W = b.embed.weight
            h = b.embed(ids).float() - W.float().mean(0)                       # (B, T, d), centred
            return ((h * m).sum(1) / m.sum(1)).cpu()
        if self.layer == b.n_layers:
            with hooks.capture(b, layers=[], sites=(), final=True) as cache:
                b.model(input_ids=ids, attention_mask=mask)
            h = cache["final"]
        else:
            h = hooks.stream_at(b, self.layer, "resid_pre", input_ids=ids, attention_mask=mask)  # (B, T, d)
        return ((h.float() * m).sum(1) / m.sum(1)).cpu()                      # (B, d)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim), each row L2-normalised then scaled to norm sqrt(dim)."""
        texts = list(texts)
        bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
        if bad:
            raise LabError(f"text channels (memory, identity, continuity) need non-empty strings, got {bad[0]!r}")
        todo = sorted({t for t in texts if t not in self._cache})
        for i in range(0, len(todo), 64):
            chunk = todo[i: i + 64]
            if self.spec == "base":
                e = self._embed_base(chunk)
            else:
                e = torch.as_tensor(self._st.encode(chunk, convert_to_numpy=True)).float()
            e = torch.nn.functional.normalize(e, dim=-1) * math.sqrt(self.dim)
            for t, row in zip(chunk, e):
                self._cache[t] = row
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])


def channel_widths(text_dim: int) -> dict[str, int]:
    """The six channels in their fixed order, with the text channels at the encoder's width."""
    return {"memory": text_dim, "affect": WIDTHS_FIXED["affect"], "time": WIDTHS_FIXED["time"],
            "ethics": WIDTHS_FIXED["ethics"], "identity": text_dim, "continuity": text_dim}


def encode_states(states: Sequence[ChannelState | Mapping], text_encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """A batch of states -> {channel: (B, width)}; a channel that is None in a row is zeros in that row."""
    states = [s if isinstance(s, ChannelState) else ChannelState.from_dict(s) for s in states]
    if not states:
        raise LabError("encode_states needs at least one state")
    B, W = len(states), channel_widths(text_encoder.dim)
    out = {k: torch.zeros(B, w) for k, w in W.items()}
    for k in TEXT_CHANNELS:
        rows = [i for i, s in enumerate(states) if getattr(s, k) is not None]
        if rows:
            out[k][rows] = text_encoder.encode([getattr(states[i], k) for i in rows])
    for i, s in enumerate(states):
        if s.affect is not None:
            out["affect"][i] = encode_affect(*s.affect)
        if s.time is not None:
            out["time"][i] = encode_time(*s.time)
        if s.ethics is not None:
            out["ethics"][i] = encode_ethics(s.ethics)
    return out
