"""Base-level inspection used by notebook 00 and the home page: layer-state PCA and activation patching."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from sklearn.decomposition import PCA

from lab import LabError, hooks
from lab.figures import style


@torch.no_grad()
def layer_pca(base, texts: list[str], site: str = "resid_post") -> tuple[go.Figure, dict]:
    """PCA (fit on all layers' last-token states) of each text's state after every layer.
    Returns the figure and the explained-variance ratios."""
    if len(texts) < 2:
        raise LabError(f"layer PCA needs at least 2 texts, got {len(texts)}")
    ids, mask = base.encode(texts)
    with hooks.capture(base, sites=[site]) as cache:
        base.model(input_ids=ids, attention_mask=mask)
    states = cache.stack(site)                                # (L, B, T, d)
    last = mask.sum(1) - 1                                    # last real token of each text
    pts = states[:, torch.arange(len(texts)), last]           # (L, B, d)
    L, B, d = pts.shape
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(pts.reshape(L * B, d).float().cpu().numpy()).reshape(L, B, 2)
    fig = go.Figure()
    for b in range(B):
        label = texts[b] if len(texts[b]) < 40 else texts[b][:37] + "…"
        fig.add_trace(go.Scatter(x=xy[:, b, 0], y=xy[:, b, 1], mode="lines+markers+text", name=label,
                                 text=[str(i) for i in range(L)], textposition="top center"))
    ev = pca.explained_variance_ratio_
    fig.update_layout(xaxis_title=f"PC1 ({ev[0]:.0%})", yaxis_title=f"PC2 ({ev[1]:.0%})")
    return style(fig, f"Last-token state after each layer ({base.name})"), {"explained_variance": ev.tolist()}


@torch.no_grad()
def patching_effect(base, clean: str, corrupt: str, target: str, site: str = "resid_post") -> dict:
    """Activation patching: copy the clean run's stream at each layer (last position) into the corrupt
    run and measure the log-prob of `target` at the last position. 1.0 = fully restored."""
    tid = base.tokenizer.encode(" " + target.strip(), add_special_tokens=False)
    if len(tid) != 1:
        raise LabError(f"target {target!r} must be one token, got {len(tid)} pieces")
    c_ids, _ = base.encode(clean)
    x_ids, _ = base.encode(corrupt)
    if c_ids.shape != x_ids.shape:
        raise LabError(f"clean and corrupt prompts must have the same token length, got {c_ids.shape[1]} and {x_ids.shape[1]}")
    with hooks.capture(base, sites=[site]) as cache:
        lp_clean = base.model(input_ids=c_ids).logits[0, -1].log_softmax(-1)[tid[0]].item()
    lp_corrupt = base.model(input_ids=x_ids).logits[0, -1].log_softmax(-1)[tid[0]].item()
    per_layer = []
    for i in range(base.n_layers):
        with hooks.patch(base, i, cache[f"blocks.{i}.{site}"][:, -1:], positions=[-1], site=site):
            lp = base.model(input_ids=x_ids).logits[0, -1].log_softmax(-1)[tid[0]].item()
        denom = lp_clean - lp_corrupt
        per_layer.append({"layer": i, "logprob": lp, "restored": (lp - lp_corrupt) / denom if abs(denom) > 1e-9 else float("nan")})
    return {"clean_logprob": lp_clean, "corrupt_logprob": lp_corrupt, "layers": per_layer}


def patching_figure(result: dict, title: str) -> go.Figure:
    layers = [r["layer"] for r in result["layers"]]
    fig = go.Figure(go.Bar(x=layers, y=[r["logprob"] for r in result["layers"]], name="patched"))
    fig.add_hline(y=result["clean_logprob"], line_dash="dash", annotation_text="clean")
    fig.add_hline(y=result["corrupt_logprob"], line_dash="dot", annotation_text="corrupt")
    fig.update_layout(xaxis_title="layer patched (last position)", yaxis_title="log p(target)")
    return style(fig, title)
