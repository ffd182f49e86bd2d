"""Proprioceptive channels: set the six channels by hand, see the same prompt generated with the channels
and with them zeroed, the log-probability shift of chosen words, and which layers opened which gate.
Display only: the computation is lab.channels."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lab import LabError
from lab.channels import load
from lab.channels.encoders import ETHICS_CATEGORIES, ETHICS_POSTURES, ChannelState
from lab.channels.probes import alpha_heatmap, alpha_trajectory, logprob_shift, shift_figure
from lab.channels.train import KIND_ADAPTER
from lab.corpus import PERSONAS, TOPICS, WEEKDAYS
from lab.store import find_artifacts
from lab.ui import base_picker, cached_base, export_buttons, show_error, stop_if_none

st.set_page_config(page_title="Proprioceptive channels", layout="wide")
st.title("Proprioceptive channels: state in the channel, content in the prompt")
st.markdown(
    "Six state channels (memory, affect, time, ethics, identity, continuity) enter **every layer** of a frozen "
    "base as h ← h + Σ_c α[l,c]·W[l,c]·x_c, with ReZero gates α that start at 0 (bit-identical to the base). "
    "Set the channels below; the prompt stays the same."
)


@st.cache_resource(show_spinner="loading the channel adapter…")
def cached_model(base_name: str, path: str):
    return load(path, cached_base(base_name))


try:
    base_name = base_picker(key="ch-base")
    arts = find_artifacts(KIND_ADAPTER, base_name)
    stop_if_none(arts, "channel adapter", "channels", base_name)
    artifact = st.selectbox("Adapter", list(arts), key="ch-art")
    model = cached_model(base_name, str(arts[artifact]))

    st.subheader("Channels")
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        on_affect = st.checkbox("affect", True, key="ch-on-affect")
        valence = st.slider("valence", -1.0, 1.0, 1.0, 0.1, key="ch-valence")
        arousal = st.slider("arousal", -1.0, 1.0, 0.0, 0.1, key="ch-arousal")
    with c2:
        on_time = st.checkbox("time", True, key="ch-on-time")
        hour = st.slider("hour", 0.0, 23.5, 8.0, 0.5, key="ch-hour")
        weekday = st.selectbox("weekday", WEEKDAYS, key="ch-weekday")
    with c3:
        on_ethics = st.checkbox("ethics", True, key="ch-on-ethics")
        posture = st.select_slider("posture", list(ETHICS_POSTURES), value="cautious", key="ch-posture")
        cats = st.multiselect("categories", list(ETHICS_CATEGORIES), default=list(ETHICS_CATEGORIES), key="ch-cats")
    with c4:
        names = [f"{n} the {r}" for n, r in PERSONAS]
        on_identity = st.checkbox("identity", True, key="ch-on-identity")
        persona = st.selectbox("persona", names, key="ch-persona")
        on_continuity = st.checkbox("continuity", False, key="ch-on-cont")
        thread = st.selectbox("active thread", TOPICS, key="ch-thread")

    items_txt = st.text_input("The prompt's three items (comma-separated)", "walnut, copper, maple", key="ch-items")
    items = [s.strip() for s in items_txt.split(",") if s.strip()]
    if len(items) < 2:
        raise LabError(f"give at least two comma-separated items, got {items_txt!r}")
    on_memory = st.checkbox("memory", True, key="ch-on-memory")
    salient = st.radio("salient item (memory channel)", items, horizontal=True, key="ch-salient")
    default_prompt = f"In the box there is a {', a '.join(items[:-1])} and a {items[-1]}. Mara felt"
    prompt = st.text_area("Prompt (the same for both columns)", default_prompt, key="ch-prompt")
    words_txt = st.text_input("Words to score", ", ".join(items + ["joyful", "gloomy", "morning", "night",
                                                                    "carefully", "gladly"]), key="ch-words")
    gen_tokens = int(st.number_input("Tokens to generate", 1, 64, 12, key="ch-gen"))

    pname, prole = PERSONAS[names.index(persona)]
    state = ChannelState(
        memory=f"I remember the {salient}." if on_memory else None,
        affect=(valence, arousal) if on_affect else None,
        time=(hour, weekday) if on_time else None,
        ethics={c: posture for c in cats} if on_ethics else None,
        identity=f"I am {pname}, a {prole}." if on_identity else None,
        continuity=f"We were just talking about {thread}." if on_continuity else None,
    )

    on = model.channels([state])
    off = model.channels([state], zero=True)
    left, right = st.columns(2)
    left.markdown("**With the channels**")
    left.code(prompt + model.generate([prompt], on, gen_tokens)[0], language=None)
    right.markdown("**Channels zeroed (the base)**")
    right.code(prompt + model.generate([prompt], off, gen_tokens)[0], language=None)

    words = [w.strip() for w in words_txt.split(",") if w.strip()]
    rows = logprob_shift(model, prompt, state, words)
    fig = shift_figure(rows)
    st.plotly_chart(fig, key="ch-shift")
    export_buttons(fig, "channels_logprob_shift", key="ch-shift-exp")
    st.dataframe(pd.DataFrame(rows).round(4), hide_index=True)

    st.subheader("Which layers opened which channel")
    hm = alpha_heatmap(model.injector.alpha, model.injector.names)
    st.plotly_chart(hm, key="ch-alpha")
    export_buttons(hm, "channels_alpha", key="ch-alpha-exp")
    hist = model.artifact.manifest.get("metrics", {}).get("alpha_history")
    if hist:
        tr = alpha_trajectory(hist, model.injector.names)
        with st.expander("Gate opening over training"):
            st.plotly_chart(tr, key="ch-traj")
            export_buttons(tr, "channels_alpha_trajectory", key="ch-traj-exp")
except LabError as e:
    show_error(e)
