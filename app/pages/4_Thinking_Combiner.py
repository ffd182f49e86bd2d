"""Thinking combiner: one latent step mixed into the final state; delta bits per byte, live."""

from __future__ import annotations

import streamlit as st

from lab import LabError
from lab.combiner import load
from lab.combiner.bpb import bpb
from lab.combiner.config import KIND
from lab.combiner.evaluate import PUBLISHED_FITTED_DELTA, PUBLISHED_IDENTITY_DELTA, feed_measures
from lab.combiner.explore import delta_at, gains_figure, knob_features, per_token_gains, scale_sweep, scale_sweep_figure
from lab.combiner.model import UNSCALED_FEED, UNSCALED_FEED_FIT
from lab.corpus import documents
from lab.store import find_artifacts
from lab.ui import (
    base_picker,
    cached_base,
    cached_resource,
    disabled_reason,
    export_buttons,
    show_error,
    stop_if_none,
)

st.set_page_config(page_title="Thinking combiner", layout="wide")
st.title("Thinking combiner")
st.caption("h' = (1 + α)·h + M·T_k + β on the final-normed state h; T_k = k continuous thoughts (the normed last "
           "state fed back as the next input embedding). Zero init is a bit-exact identity. Scored by the chunked "
           "last-position evaluator on the lab corpus's held-out text.")


@cached_resource(show_spinner="loading combiners…")
def load_combiners(path: str, base_name: str):
    return load(path, cached_base(base_name))


@cached_resource(show_spinner="thinking over the held-out text…")
def held_out_features(path: str, base_name: str, n_docs: int, feed: str | None = None):
    """Chunk features of the first `n_docs` held-out documents, with the config's feed (or `feed`, k_max=1)."""
    cfg = load_combiners(path, base_name).config
    if feed is not None and feed != cfg.feed:
        cfg = cfg.with_(feed=feed, feed_scale=1.0, k_max=1)
    return knob_features(cfg, cached_base(base_name), n_docs)


@st.fragment
def unscaled_feed_row(path: str, base_name: str, n_docs: int, model, seed: int) -> None:
    """The unscaled feed (h as is) k=1 fit beside the published feed's: scored only on the button (its own features)."""
    cfg, base = model.config, model.base
    comb = model.by_seed[seed].get((UNSCALED_FEED_FIT, 1))
    off = comb is None or cfg.feed == UNSCALED_FEED
    go = st.button("Score the unscaled feed (h as is) on these documents", key="comb-unscaled", disabled=off)
    disabled_reason(off, "this artifact was fitted without the unscaled-feed row (unscaled_feed_row=False)" if comb is None
                    else "this artifact's own feed is already the unscaled one")
    if go and not off:
        feats, base_nats = held_out_features(path, base_name, n_docs, UNSCALED_FEED)
        m, _ = delta_at(base, feats, comb, 1, None, 1.0, cfg.seed, base_nats)
        r, c = feed_measures(base, feats, UNSCALED_FEED)
        st.markdown(f"**unscaled feed, ce k=1:** Δ bpb {m.value_text(4, signed=True)}; |thought input| / |token embedding| "
                    f"{r.value:.2f}, cos(T₁, h) {c.value:.3f} (n = {m.n} positions)")


@st.fragment
def gains_view(base, comb, k: int, cfg, alpha: float, m_scale: float, fit: str) -> None:
    """Per-token gains on any text: a new text reruns only this part."""
    st.subheader("Per-token gains on a sample text")
    sample = st.text_area("Sample text", documents("heldout", 1, seed=99)[0], key="comb-text", height=100)
    rows = per_token_gains(base, comb, sample, k, cfg.feed, alpha, m_scale, scale=cfg.feed_scale)
    fig2 = gains_figure(rows, f"Gain per token (bits; positive = combiner better), {fit} k={k}")
    st.plotly_chart(fig2, width="stretch")
    export_buttons(fig2, "combiner_token_gains", key="comb-exp-gains")
    total = sum(r["gain_bits"] for r in rows)
    st.caption(f"{len(rows)} tokens, {sum(r['bytes'] for r in rows)} bytes; total gain {total:+.2f} bits "
               f"({total / max(1, sum(r['bytes'] for r in rows)):+.4f} bits per byte on this text).")


try:
    base_name = base_picker(key="comb-base", prefer=("tiny-gpt2", "smoke-gpt2"))
    found = {name: str(p) for name, p in find_artifacts(KIND, base_name).items()}
    stop_if_none(found, "combiner", "combiner", base_name)
    path = found[st.selectbox("Trained combiner", list(found), key="comb-artifact")]
    model = load_combiners(path, base_name)
    cfg, base = model.config, model.base

    c1, c2, c3, c4 = st.columns(4)
    fit = c1.radio("Fit", ["ce", "ridge"], horizontal=True, key="comb-fit",
                   help="ce: cross-entropy by AdamW (as published); ridge: closed form on the logit-gradient target")
    k = c2.selectbox("Latent steps k", list(range(1, cfg.k_max + 1)), key="comb-k")
    doc_options = sorted({min(cfg.eval_docs, n) for n in (100, 300, 1000, 3000)})  # distinct: a slider step must change n
    n_docs = c3.select_slider("Held-out documents", doc_options, value=min(cfg.eval_docs, 300), key="comb-docs")
    seeds = list(model.by_seed)
    seed = c4.selectbox("Fit seed", seeds, key="comb-seed", disabled=len(seeds) < 2,
                        help="each fit is repeated per seed (its sample of training windows unless the config shares one, train/validation split, batch order)")
    disabled_reason(len(seeds) < 2, "this artifact was fitted with one seed")
    comb = model.by_seed[seed][(fit, k)]
    fitted_alpha = float(comb.alpha)
    s1, s2 = st.columns(2)
    # the range always holds the fitted value (a ridge fit's line-searched step can put it beyond +-0.5)
    alpha = s1.slider("α (gain on h; fitted value by default)", min(-0.5, round(fitted_alpha, 3)),
                      max(0.5, round(fitted_alpha, 3)), round(fitted_alpha, 3), 0.005, key="comb-alpha")
    m_scale = s2.slider("M-scale (multiplies M and β)", 0.0, 2.0, 1.0, 0.05, key="comb-m-scale")

    feats, base_nats = held_out_features(path, base_name, n_docs)
    m, nats = delta_at(base, feats, comb, k, alpha, m_scale, cfg.seed, base_nats)
    m_ctrl, _ = delta_at(base, feats, model.by_seed[seed][("control", 1)], 1, None, 1.0, cfg.seed, base_nats)
    a, b_, c, d = st.columns(4)
    a.metric("base bpb (chunked)", f"{bpb(base_nats, feats.nbytes):.4f}", help=f"n = {len(feats)} scored positions")
    b_.metric("combiner bpb", f"{bpb(nats, feats.nbytes):.4f}")
    c.metric("Δ bpb vs base [95% CI]", m.value_text(4, signed=True),
             help=f"{m.ci_method} (n = {m.n}); {m.test} p = {m.p_value:.3g}")
    d.metric("Δ bpb, no-thought control [95% CI]", m_ctrl.value_text(4, signed=True),
             help="α and β fitted with M = 0: what recalibration alone buys")
    ratio, cos = feed_measures(base, feats, cfg.feed, cfg.feed_scale)
    st.caption(f"n = {m.n} chunked positions (chunk {cfg.chunk_len} tokens, {n_docs} held-out documents, separator {cfg.separator!r}); "
               f"{m.test} p = {m.p_value:.3g}. Published: identity Δ {PUBLISHED_IDENTITY_DELTA}, "
               f"fitted Δ {PUBLISHED_FITTED_DELTA}. Feed {cfg.feed!r}: |thought input| / |token embedding| "
               f"{ratio.value:.2f}, cos(T₁, h) {cos.value:.3f}. Base bpb here is the chunked last-position evaluator; "
               f"the report puts the sliding-window bpb beside it.")
    unscaled_feed_row(path, base_name, n_docs, model, seed)

    sweep = scale_sweep(base, feats, comb, k, alpha=alpha, seed=cfg.seed, base_nats=base_nats)
    fig = scale_sweep_figure(sweep, label=f"{fit}, k={k}, α={alpha:.3g}", at=m_scale)
    st.plotly_chart(fig, width="stretch")
    export_buttons(fig, "combiner_delta_vs_mscale", key="comb-exp-sweep")

    gains_view(base, comb, k, cfg, alpha, m_scale, fit)
except LabError as e:
    show_error(e)
