"""Probes: which layers open which channel (alpha over training), captum attribution of the output to
each channel's input, and the log-probability shift of chosen words (the app's live readout)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from lab import LabError
from lab.channels.encoders import ChannelState
from lab.channels.injection import inject
from lab.figures import style


def alpha_heatmap(alpha, names: Sequence[str], title: str = "ReZero gates alpha (layer x channel)") -> go.Figure:
    """Signed alpha per (layer, channel); colour scale symmetric around 0 (closed gate)."""
    a = np.asarray(alpha.detach().cpu() if torch.is_tensor(alpha) else alpha, dtype=float)  # (L, C)
    m = float(np.abs(a).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=a, x=list(names), y=[f"layer {i}" for i in range(a.shape[0])], zmin=-m, zmax=m,
                               colorscale="RdBu", zmid=0, colorbar=dict(title="alpha"),
                               text=np.round(a, 3), texttemplate="%{text}"))
    fig.update_layout(xaxis_title="channel", yaxis_title="layer (resid_pre)", yaxis_autorange="reversed")
    return style(fig, title)


def alpha_trajectory(history: list[dict], names: Sequence[str]) -> go.Figure:
    """|alpha| of every (channel, layer) over training steps: rows channel/layer, columns step."""
    if not history:
        raise LabError("no alpha history (was the artifact trained with eval_every > 0?)")
    steps = [h["step"] for h in history]
    A = np.abs(np.asarray([h["alpha"] for h in history], dtype=float))  # (S, L, C)
    rows, z = [], []
    for c, n in enumerate(names):
        for layer in range(A.shape[1]):
            rows.append(f"{n} / L{layer}")
            z.append(A[:, layer, c])
    fig = go.Figure(go.Heatmap(z=np.asarray(z), x=steps, y=rows, colorscale="Viridis", colorbar=dict(title="|alpha|")))
    fig.update_layout(xaxis_title="training step", yaxis_title="channel / layer", yaxis_autorange="reversed",
                      height=max(350, 16 * len(rows)))
    return style(fig, "Gate opening over training: |alpha| per channel and layer")


def channel_attribution(model, items, n_steps: int = 16) -> list[dict]:
    """Integrated gradients (captum) of log p(first token of the state's continuation) w.r.t. every
    channel's input vector, baseline = all channels zero. Returns one row per item with each
    channel's share of the total |attribution|.

    Each channel is scored as one input, |sum of its dimensions' signed IG| (= |integral of <x_c, grad_c log p>|
    along the path), which does not grow with the channel's width or depend on its basis, as summing |IG| per
    dimension did (wide text channels dominated); the signed sums add up to log p(channels) - log p(zeroed),
    up to the n_steps integration error."""
    from captum.attr import IntegratedGradients  # noqa: PLC0415  (heavy; only the attribution needs it)

    b, inj = model.base, model.injector
    names, widths = inj.names, [inj.widths[n] for n in inj.names]
    if model.arm != "channel":
        raise LabError("channel attribution needs a channel-arm model")
    rows = []
    for it in items:
        x = model.channels([it.state])
        flat = torch.cat([x[n] for n in names], -1)                           # (1, W)
        ids = torch.tensor([b.tokenizer.encode(it.prompt, add_special_tokens=False)], device=b.device)
        tgt = b.tokenizer.encode(it.candidates[it.label], add_special_tokens=False)[0]

        def f(xs, ids=ids, tgt=tgt):
            parts = dict(zip(names, torch.split(xs, widths, -1)))
            with inject(b, inj, parts, batch=xs.shape[0], site=model.config.site):
                logits = b.model(input_ids=ids.expand(xs.shape[0], -1)).logits[:, -1].float()
            return logits.log_softmax(-1)[:, tgt]

        with torch.enable_grad():
            attr = IntegratedGradients(f).attribute(flat, baselines=torch.zeros_like(flat), n_steps=n_steps)
        per = [abs(float(a.sum())) for a in torch.split(attr[0], widths)]  # one |signed sum| per channel
        tot = sum(per) or 1.0
        rows.append({"capability": it.capability, **{n: p / tot for n, p in zip(names, per)}})
    return rows


def attribution_figure(rows: list[dict], names: Sequence[str]) -> go.Figure:
    caps = list(dict.fromkeys(r["capability"] for r in rows))
    z = [[float(np.mean([r[n] for r in rows if r["capability"] == c])) for n in names] for c in caps]
    fig = go.Figure(go.Heatmap(z=z, x=list(names), y=caps, colorscale="Blues", zmin=0, zmax=1,
                               text=np.round(z, 2), texttemplate="%{text}", colorbar=dict(title="share")))
    fig.update_layout(xaxis_title="channel input (integrated gradients, summed over the channel's dimensions)",
                      yaxis_title="held-out items of capability", yaxis_autorange="reversed")
    return style(fig, "Which channel the output is attributed to (mean share of |channel IG|)")


def logprob_shift(model, prompt: str, state: ChannelState | dict, words: Sequence[str]) -> list[dict]:
    """For each word: log p(' word' | prompt) with the channels, with them zeroed, and the shift."""
    words = [w.strip() for w in words if w and w.strip()]
    if not words:
        raise LabError("give at least one word to score")
    if not prompt or not prompt.strip():
        raise LabError("the prompt is empty")
    conts = [" " + w for w in words]
    on = model.channels([state] * len(words))
    off = model.channels([state] * len(words), zero=True)
    with torch.no_grad():
        lp_on = model.continuation_logprobs([prompt] * len(words), conts, on)
        lp_off = model.continuation_logprobs([prompt] * len(words), conts, off)
    return [{"word": w, "logp_channels": float(a), "logp_zeroed": float(z), "shift": float(a - z)}
            for w, a, z in zip(words, lp_on, lp_off)]


def shift_figure(rows: list[dict]) -> go.Figure:
    fig = go.Figure(go.Bar(x=[r["word"] for r in rows], y=[r["shift"] for r in rows],
                           marker_color=["#2f9c8f" if r["shift"] >= 0 else "#e87a5d" for r in rows]))
    fig.update_layout(xaxis_title="word", yaxis_title="log p with channels - log p zeroed (nats)")
    return style(fig, "Log-probability shift from the channels")
