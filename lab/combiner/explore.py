"""Live analysis of fitted combiners, for the app page and notebook 04: delta bpb under the alpha / M-scale
knobs, the sweep over M-scale, per-token gains on any text, and a logit lens on the thoughts."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch

from lab import figures
from lab.combiner import bpb as B
from lab.combiner.config import Config
from lab.combiner.evaluate import eval_features
from lab.combiner.fit import ce_nats
from lab.combiner.model import Combiner
from lab.combiner.thinking import think, think_every_position
from lab.stats import Measure

M_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the M-scale sweep of the app and notebook 04
KNOB_DOCS = 1000  # at most this many held-out documents behind the live knobs, so a slider move stays quick


def knob_features(config: Config, base, n_docs: int | None = None):
    """(ChunkFeatures, base nats) of the first `n_docs` held-out documents (default: min(eval_docs, KNOB_DOCS)),
    the positions the knobs below are scored on."""
    n_docs = min(config.eval_docs, KNOB_DOCS) if n_docs is None else n_docs
    _, _, feats = eval_features(config.with_(eval_docs=n_docs), base)
    return feats, B.score_chunks(base, feats)


def delta_at(base, feats, comb: Combiner, k: int, alpha: float | None = None, m_scale: float = 1.0,
             seed: int = 0, base_nats: np.ndarray | None = None) -> tuple[Measure, np.ndarray]:
    """Delta bpb of one combiner (with the alpha / M-scale knobs) vs the base on chunk features, and its nats."""
    base_nats = B.score_chunks(base, feats) if base_nats is None else base_nats
    nats = B.score_chunks(base, feats, comb, k, alpha=alpha, m_scale=m_scale)
    return B.delta_measure(f"delta bpb (k={k}, alpha={'fitted' if alpha is None else f'{alpha:.3g}'}, "
                           f"M-scale={m_scale:.3g})", nats, base_nats, feats.nbytes, "base (chunked)", seed=seed), nats


def scale_sweep(base, feats, comb: Combiner, k: int, scales=M_SCALES, alpha: float | None = None, seed: int = 0,
                base_nats: np.ndarray | None = None) -> list[Measure]:
    """Delta bpb (with CI) against the M-scale knob, for the figure beside the sliders."""
    base_nats = B.score_chunks(base, feats) if base_nats is None else base_nats
    return [delta_at(base, feats, comb, k, alpha, float(s), seed, base_nats)[0] for s in scales]


def scale_sweep_figure(sweep: list[Measure], scales=M_SCALES, label: str = "", at: float | None = None):
    """Delta bpb with its CI against M-scale (`scale_sweep`'s measures); `at` marks the current setting."""
    fig = figures.line(list(scales), {"Δ bpb": [m.value for m in sweep]}, f"Δ bpb vs M-scale{f' ({label})' if label else ''}",
                       "M-scale", "Δ bits per byte", error={"Δ bpb": ([m.ci_low for m in sweep], [m.ci_high for m in sweep])})
    if at is not None:
        fig.add_vline(x=at, line_dash="dot")
    return fig


@torch.no_grad()
def per_token_gains(base, comb: Combiner, text: str, k: int = 1, feed: str = "final_embed_rms",
                    alpha: float | None = None, m_scale: float = 1.0, scale: float = 1.0) -> list[dict]:
    """For each token of `text` after the first: its base loss, the combiner's loss (the thought seeing
    only the prefix) and the gain in bits (positive = the combiner predicts it better)."""
    ids, nb = B.tokenize_with_bytes(base.tokenizer, text)
    x = torch.from_numpy(ids).to(base.device)
    hs, T = think_every_position(base, x, k, feed, scale=scale)
    feats = {"h": hs[:-1], "t": T[:-1, k - 1], "y": x[1:]}
    b_n = ce_nats(base, None, feats).numpy()
    c_n = ce_nats(base, comb, feats, alpha=alpha, m_scale=m_scale).numpy()
    toks = [base.tokenizer.decode([int(t)]) for t in ids[1:]]
    return [{"pos": i + 1, "token": tok, "bytes": int(nb[i + 1]), "base_bits": float(b_n[i] / B.LN2),
             "combiner_bits": float(c_n[i] / B.LN2), "gain_bits": float((b_n[i] - c_n[i]) / B.LN2)}
            for i, tok in enumerate(toks)]


def gains_figure(rows: list[dict], title: str):
    """Bars of `per_token_gains`: the gain in bits per token (teal: the combiner is better)."""
    fig = go.Figure(go.Bar(x=[f"{r['pos']}:{r['token']!r}" for r in rows], y=[r["gain_bits"] for r in rows],
                           marker_color=["#2f9c8f" if r["gain_bits"] >= 0 else "#e87a5d" for r in rows],
                           hovertext=[f"base {r['base_bits']:.2f} bits, combiner {r['combiner_bits']:.2f} bits"
                                      for r in rows]))
    fig.update_layout(xaxis_title="token (position: text)", yaxis_title="gain in bits (base - combiner)")
    return figures.style(fig, title)


@torch.no_grad()
def thought_lens(base, text: str, k: int = 4, top: int = 5, feed: str = "final_embed_rms",
                 scale: float = 1.0) -> list[dict]:
    """What h and each thought T_j would predict through the frozen head (a logit lens on the thoughts),
    with the cosine of each to h: how far a thought moves from the state it came from."""
    ids, _ = base.encode(text)
    th = think(base, ids, k, feed=feed, scale=scale)
    rows = []
    for name, v in [("h", th.h[0])] + [(f"T_{j + 1}", th.T[0, j]) for j in range(k)]:
        p = torch.softmax(base.logits(v, normed=True).float(), -1)
        pv, pi = p.topk(top)
        rows.append({"state": name, "cos_to_h": float(torch.nn.functional.cosine_similarity(v.float(), th.h[0].float(), 0)),
                     "norm": float(v.float().norm()),
                     "top_tokens": ", ".join(f"{base.tokenizer.decode([int(i)])!r} {float(q):.2f}" for q, i in zip(pv, pi))})
    return rows
