"""Bits per byte on held-out text: a sliding-window evaluator, its naive per-token check, and the
chunked last-position evaluator (base, identity, fitted combiners), with forwards-per-token costs.

bpb = (nats per token / ln 2) x (tokens / bytes) = sum(nats) / ln 2 / sum(bytes) over the scored
tokens, where a token's bytes are the UTF-8 bytes of its text (from the tokenizer's character offsets;
characters no offset covers go to the next token, so the bytes of all tokens sum to the text's).
Special tokens (a document separator such as <|eos|>) are not text: they count 0 bytes, but their
prediction is still scored, as the base was trained to predict them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lab import LabError
from lab.combiner.fit import ce_nats
from lab.combiner.thinking import think
from lab.corpus import documents, heldout_text
from lab.hooks import forward
from lab.stats import Measure, ratio_of_sums_ci, sign_flip_p, sum_by_unit

LN2 = math.log(2.0)


def tokenize_with_bytes(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, bytes per token) for `text`; bytes sum to len(text.encode('utf-8'))."""
    if not isinstance(text, str) or not text.strip():
        raise LabError("the evaluation text is empty; expected a non-empty string (e.g. lab.corpus.heldout_text())")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    if ids.size < 2:
        raise LabError(f"the evaluation text has {ids.size} token(s); at least 2 are needed to score one")
    cum = np.concatenate([[0], np.cumsum([len(ch.encode("utf-8")) for ch in text])])  # char -> byte offset
    nbytes = np.zeros(len(ids), dtype=np.int64)
    cursor = 0
    for i, (_, e) in enumerate(enc["offset_mapping"]):
        if e > cursor:
            nbytes[i] = cum[e] - cum[cursor]
            cursor = e
    nbytes[-1] += cum[-1] - cum[cursor]  # trailing characters no token covers
    special = np.isin(ids, np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64))
    nbytes[special] = 0
    return ids, nbytes


def heldout_eval_text(n_docs: int, separator: str = "eos", tokenizer=None, seed: int = 1234) -> str:
    """The lab corpus's held-out documents (those of `lab.corpus.heldout_text(n_docs)`) as one text.

    separator="text": exactly `lab.corpus.heldout_text` (documents joined by a blank line).
    separator="eos": the same documents joined by the tokenizer's EOS token, the way the base saw document
    boundaries in pretraining (`lab.corpus.corpus_tokens`). The lab bases never saw a blank line between
    documents, so with "text" the first token of every document costs ~15 nats and those boundary tokens
    dominate a last-position score (a property of the text format, not of the model)."""
    if separator == "text":
        return heldout_text(n_docs, seed)
    if separator == "eos":
        if tokenizer is None or tokenizer.eos_token is None:
            raise LabError("separator='eos' needs a tokenizer with an EOS token")
        return tokenizer.eos_token.join(documents("heldout", n_docs, seed)) + tokenizer.eos_token
    raise LabError(f"separator must be 'eos' or 'text', got {separator!r}")


def bpb(nats, nbytes) -> float:
    nats, nbytes = np.asarray(nats, float), np.asarray(nbytes, float)
    if nbytes.sum() <= 0:
        raise LabError("the scored tokens cover 0 bytes; cannot compute bits per byte")
    return float(nats.sum() / LN2 / nbytes.sum())


def _unit_text(units) -> str:
    return "scored positions" if units is None else "documents"


def bpb_measure(name: str, nats, nbytes, seed: int = 0, units: np.ndarray | None = None, **extra) -> Measure:
    """bpb = sum of bits / sum of bytes, with a bootstrap CI of that ratio over units: `units` gives each scored
    token's document (tokens of one document are correlated: resampling tokens would make the CI too narrow);
    None: each scored position is its own unit (the chunked evaluator's one position per chunk)."""
    nats, nbytes = np.asarray(nats, float), np.asarray(nbytes, float)
    num, den = sum_by_unit(nats / LN2, units), sum_by_unit(nbytes, units)
    lo, hi = ratio_of_sums_ci(num, den, seed=seed)
    return Measure(name, bpb(nats, nbytes), int(num.size), lo, hi,
                   f"bootstrap percentile of sum(bits) / sum(bytes) over {_unit_text(units)}",
                   extra=dict(bytes=int(nbytes.sum()), tokens=int(nats.size), unit=_unit_text(units), **extra))


def delta_measure(name: str, nats_t, nats_c, nbytes, control: str, seed: int = 0,
                  units: np.ndarray | None = None, **extra) -> Measure:
    """delta bpb (treatment - control) on the same scored tokens: sum of the bit differences over the sum of
    bytes, with a paired bootstrap CI of that ratio over units (see `bpb_measure`) and a paired sign-flip
    permutation p of the units' summed differences (their total is the numerator of the delta: the test is of
    the statistic reported)."""
    nats_t, nats_c, nbytes = (np.asarray(a, float) for a in (nats_t, nats_c, nbytes))
    if not nats_t.shape == nats_c.shape == nbytes.shape:
        raise LabError(f"paired arms must score the same tokens, got {nats_t.shape}, {nats_c.shape}, {nbytes.shape}")
    if nbytes.sum() <= 0:
        raise LabError("the scored tokens cover 0 bytes; cannot compute bits per byte")
    diff, den = sum_by_unit((nats_t - nats_c) / LN2, units), sum_by_unit(nbytes, units)
    value = float(diff.sum() / den.sum())
    if np.all(diff == 0):  # e.g. the identity combiner: exactly zero, nothing to resample or test
        lo = hi = value
        p = 1.0
    else:
        lo, hi = ratio_of_sums_ci(diff, den, seed=seed)
        p = sign_flip_p(diff, seed=seed)
    return Measure(name, value, int(diff.size), lo, hi,
                   f"paired bootstrap percentile of sum(bit differences) / sum(bytes) over {_unit_text(units)}",
                   control, bpb(nats_c, nbytes), p, "paired sign-flip permutation (sum over units)",
                   extra=dict(max_abs_token_delta_nats=float(np.abs(nats_t - nats_c).max()), unit=_unit_text(units),
                              tokens=int(nats_t.size), **extra))


def document_units(ids: np.ndarray, eos_id: int | None) -> np.ndarray | None:
    """The document of each scored target ids[1:] in an EOS-separated stream (0..D-1: the count of EOS tokens
    before it; an EOS belongs to the document it ends), or None without an EOS token."""
    if eos_id is None:
        return None
    ends = np.asarray(ids)[:-1] == eos_id                 # an EOS at position j - 1 starts a new document at j
    return np.cumsum(ends).astype(np.int64)


# --- sliding window ----------------------------------------------------------------------------

def check_window(window: int, stride: int, base=None) -> None:
    if not isinstance(window, int) or not isinstance(stride, int) or window < 1 or stride < 1:
        raise LabError(f"window and stride must be positive ints, got window={window!r}, stride={stride!r}")
    if window < stride:
        raise LabError(f"the window ({window}) is shorter than its stride ({stride}): tokens between windows "
                       f"would never be scored; expected window >= stride")
    if base is not None:
        base.check_length(window)


def sliding_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, score_from) over a stream of n tokens: inputs ids[begin:end] predict
    ids[begin+1:end+1]; positions j >= score_from of the window are scored. The first window scores
    everything; later ones only their last `stride` positions, so every target 1..n-1 is scored once
    with at least window - stride tokens of context (or all that precede it)."""
    check_window(window, stride)
    if n_tokens < 2:
        raise LabError(f"need at least 2 tokens to score one, got {n_tokens}")
    plan, begin = [], 0
    while True:
        end = min(begin + window, n_tokens - 1)
        plan.append((begin, end, 0 if begin == 0 else window - stride))
        if end == n_tokens - 1:
            return plan
        begin += stride


def context_starts(n_tokens: int, window: int, stride: int) -> np.ndarray:
    """For each target t = 1..n-1, where the sliding evaluator's context begins. (n-1,)"""
    starts = np.full(n_tokens - 1, -1, dtype=np.int64)
    for b, e, s0 in sliding_plan(n_tokens, window, stride):
        starts[b + s0: e] = b      # targets b+s0+1 .. e  (index t-1)
    return starts


@dataclass
class Scored:
    nats: np.ndarray          # (n_scored,) next-token loss per scored token
    nbytes: np.ndarray        # (n_scored,) UTF-8 bytes of each scored token
    forwards: int             # model forwards
    positions: int            # token positions processed over all forwards

    @property
    def bpb(self) -> float:
        return bpb(self.nats, self.nbytes)

    def cost(self) -> dict:
        n = len(self.nats)
        return {"scored_tokens": n, "forwards": self.forwards, "forwards_per_token": self.forwards / n,
                "positions_per_token": self.positions / n}


@torch.no_grad()
def sliding_window(base, ids: np.ndarray, nbytes: np.ndarray, window: int, stride: int, batch: int = 16,
                   progress: bool = False) -> Scored:
    """Score every token after the first with the sliding-window evaluator (full windows batched)."""
    check_window(window, stride, base)
    plan = sliding_plan(len(ids), window, stride)
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(base.device)
    nats = np.zeros(len(ids) - 1)
    positions = 0
    groups: dict[int, list] = {}
    for p in plan:  # equal-length windows share a batch (all but possibly the last)
        groups.setdefault(p[1] - p[0], []).append(p)
    bar = tqdm(total=len(plan), desc="sliding window", disable=not progress)
    for L, ps in groups.items():
        for s in range(0, len(ps), batch):
            chunk = ps[s: s + batch]
            inp = torch.stack([x[b: e] for b, e, _ in chunk])                 # (B, L)
            tgt = torch.stack([x[b + 1: e + 1] for b, e, _ in chunk])         # (B, L)
            logits = forward(base, input_ids=inp).logits.float()              # (B, L, V)
            loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view(len(chunk), L)
            for r, (b, e, s0) in enumerate(chunk):
                nats[b + s0: e] = loss[r, s0:].cpu().numpy()
            positions += len(chunk) * L
            bar.update(len(chunk))
    bar.close()
    return Scored(nats, np.asarray(nbytes[1:]), len(plan), positions)


@torch.no_grad()
def naive_recompute(base, ids: np.ndarray, nbytes: np.ndarray, starts: np.ndarray | None = None,
                    window: int | None = None) -> Scored:
    """The reference: one forward per target t over ids[start_t : t], reading only the last position.
    `starts` per target (default: the full prefix, or the last `window` tokens)."""
    n = len(ids)
    if starts is None:
        starts = np.zeros(n - 1, dtype=np.int64) if window is None else np.maximum(0, np.arange(1, n) - window)
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(base.device)
    nats, positions = np.zeros(n - 1), 0
    for t in range(1, n):
        ctx = x[int(starts[t - 1]): t][None]
        logits = forward(base, input_ids=ctx).logits[0, -1].float()
        nats[t - 1] = float(F.cross_entropy(logits[None], x[t][None]))
        positions += ctx.shape[1]
    return Scored(nats, np.asarray(nbytes[1:]), n - 1, positions)


# --- chunked last-position ----------------------------------------------------------------------

@dataclass
class ChunkFeatures:
    """Per scored position: h (n, d), T (n, k, d), target (n,), bytes (n,)."""
    h: torch.Tensor
    T: torch.Tensor
    target: torch.Tensor
    nbytes: np.ndarray
    chunk_len: int
    forwards_per_token: int
    positions_per_token: int

    def __len__(self) -> int:
        return len(self.target)


@torch.no_grad()
def chunk_features(base, ids: np.ndarray, nbytes: np.ndarray, chunk_len: int, k: int, feed: str = "final_embed_rms",
                   batch: int = 32, progress: bool = False, scale: float = 1.0) -> ChunkFeatures:
    """Non-overlapping chunks ids[i*L:(i+1)*L]; the token after each chunk is scored. One base forward
    per chunk gives h; k thinking steps give T_1..T_k (one extra position each)."""
    if not isinstance(chunk_len, int) or chunk_len < 1:
        raise LabError(f"chunk_len must be a positive int, got {chunk_len!r}")
    n = (len(ids) - 1) // chunk_len
    if n < 2:
        raise LabError(f"the evaluation text has {len(ids)} tokens: fewer than 2 chunks of {chunk_len} + 1; "
                       f"give a longer text or a shorter chunk_len")
    base.check_length(chunk_len + k)
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    hs, Ts = [], []
    fw = pos = 0
    for s in tqdm(range(0, n, batch), desc="chunked eval", disable=not progress):
        rows = range(s, min(n, s + batch))
        inp = torch.stack([x[i * chunk_len: (i + 1) * chunk_len] for i in rows]).to(base.device)
        th = think(base, inp, k, feed=feed, scale=scale)
        hs.append(th.h.cpu())
        Ts.append(th.T.cpu())
        fw, pos = th.forwards, th.positions
    targets = x[chunk_len: (n + 1) * chunk_len: chunk_len][:n]
    nb = np.asarray(nbytes)[chunk_len: (n + 1) * chunk_len: chunk_len][:n]
    return ChunkFeatures(torch.cat(hs), torch.cat(Ts), targets, nb, chunk_len, fw, pos)


@torch.no_grad()
def score_chunks(base, feats: ChunkFeatures, combiner=None, k: int = 1, **kw) -> np.ndarray:
    """nats per scored position: head(h) for the base (combiner None), head(h') otherwise. (n,)"""
    if combiner is not None and not 1 <= k <= feats.T.shape[1]:
        raise LabError(f"these chunk features hold T_1..T_{feats.T.shape[1]}; asked for k={k}")
    d = {"h": feats.h, "t": feats.T[:, k - 1], "y": feats.target}
    return ce_nats(base, combiner, d, **kw).double().numpy()


def chunked_cost(feats: ChunkFeatures, k: int, thinking: bool) -> dict:
    """Forwards and token positions per scored token of the chunked evaluator (base or with k thoughts)."""
    L = feats.chunk_len
    if not thinking:
        return {"forwards_per_token": 1, "positions_per_token": L}
    cached = feats.positions_per_token == L + feats.T.shape[1]
    return {"forwards_per_token": 1 + k,
            "positions_per_token": L + k if cached else L + sum(L + j for j in range(1, k + 1))}
