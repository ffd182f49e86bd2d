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
from lab.ui import (
    base_picker,
    cached_base,
    cached_resource,
    compare_outputs,
    disabled_reason,
    export_buttons,
    logprob_strip,
    prefix_scores,
    show_error,
    stop_if_none,
    token_pieces,
)

st.set_page_config(page_title="Proprioceptive channels", layout="wide")
st.title("Proprioceptive channels: state in the channel, content in the prompt")
st.markdown(
    "Six state channels (memory, affect, time, ethics, identity, continuity) enter **every layer** of a frozen "
    "base as h ← h + Σ_c α[l,c]·W[l,c]·x_c, with ReZero gates α that start at 0 (bit-identical to the base). "
    "Set the channels below; the prompt stays the same."
)


@cached_resource(show_spinner="loading the channel adapter…")
def cached_model(base_name: str, path: str):
    return load(path, cached_base(base_name))


@st.cache_data(max_entries=256, show_spinner="generating…")
def continuations(base_name: str, path: str, prompt: str, state_key: str, n: int, _state: ChannelState) -> dict:
    """Greedy continuations with the channels and with them zeroed, and the per-token log-probability shift of the
    with-channels continuation (cached by the state's repr: moving a knob back is instant)."""
    model = cached_model(base_name, path)
    on, off = model.channels([_state]), model.channels([_state], zero=True)
    tok = model.base.tokenizer
    gen_on, gen_off = model.generate([prompt], on, n)[0], model.generate([prompt], off, n)[0]
    pieces_on, pieces_off = token_pieces(tok, gen_on), token_pieces(tok, gen_off)

    def scorer(zero: bool):
        return lambda ps, cs: model.continuation_logprobs(ps, cs, model.channels([_state] * len(ps), zero=zero))

    lp_on = prefix_scores(scorer(False), prompt, pieces_on)
    lp_off = prefix_scores(scorer(True), prompt, pieces_on)
    return {"on": pieces_on, "off": pieces_off, "shift": [a - b for a, b in zip(lp_on, lp_off)]}


try:
    base_name = base_picker(key="ch-base")
    arts = find_artifacts(KIND_ADAPTER, base_name)
    stop_if_none(arts, "channel adapter", "channels", base_name)
    artifact = st.selectbox("Adapter", list(arts), key="ch-art")
    model = cached_model(base_name, str(arts[artifact]))
except LabError as e:
    show_error(e)
    st.stop()


@st.fragment
def live(path: str) -> None:
    """The channel knobs and everything they change: a knob reruns only this part of the page."""
    try:
        knobs_and_outputs(path)
    except LabError as e:
        show_error(e)


def knobs_and_outputs(path: str) -> None:
    st.subheader("Channels")
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        on_affect = st.checkbox("affect", True, key="ch-on-affect")
        no = disabled_reason(not on_affect, "affect is off: valence and arousal are not sent.")
        valence = st.slider("valence", -1.0, 1.0, 1.0, 0.1, key="ch-valence", disabled=no)
        arousal = st.slider("arousal", -1.0, 1.0, 0.0, 0.1, key="ch-arousal", disabled=no)
    with c2:
        on_time = st.checkbox("time", True, key="ch-on-time")
        no = disabled_reason(not on_time, "time is off: hour and weekday are not sent.")
        hour = st.slider("hour", 0.0, 23.5, 8.0, 0.5, key="ch-hour", disabled=no)
        weekday = st.selectbox("weekday", WEEKDAYS, key="ch-weekday", disabled=no)
    with c3:
        on_ethics = st.checkbox("ethics", True, key="ch-on-ethics")
        no = disabled_reason(not on_ethics, "ethics is off: posture and categories are not sent.")
        posture = st.select_slider("posture", list(ETHICS_POSTURES), value="cautious", key="ch-posture", disabled=no)
        cats = st.multiselect("categories", list(ETHICS_CATEGORIES), default=list(ETHICS_CATEGORIES), key="ch-cats",
                              disabled=no)
    with c4:
        names = [f"{n} the {r}" for n, r in PERSONAS]
        on_identity = st.checkbox("identity", True, key="ch-on-identity")
        persona = st.selectbox("persona", names, key="ch-persona",
                               disabled=disabled_reason(not on_identity, "identity is off: no persona is sent."))
        on_continuity = st.checkbox("continuity", False, key="ch-on-cont")
        thread = st.selectbox("active thread", TOPICS, key="ch-thread",
                              disabled=disabled_reason(not on_continuity, "continuity is off: no thread is sent."))

    items_txt = st.text_input("The prompt's three items (comma-separated)", "walnut, copper, maple", key="ch-items")
    items = [s.strip() for s in items_txt.split(",") if s.strip()]
    if len(items) < 2:
        raise LabError(f"give at least two comma-separated items, got {items_txt!r}")
    on_memory = st.checkbox("memory", True, key="ch-on-memory")
    salient = st.radio("salient item (memory channel)", items, horizontal=True, key="ch-salient",
                       disabled=disabled_reason(not on_memory, "memory is off: no salient item is sent."))
    # an open prompt every channel can colour (a memory training prompt ending in "the" degenerates on small bases)
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

    out = continuations(base_name, path, prompt, repr(state), gen_tokens, state)
    compare_outputs("With the channels", out["on"], "Channels zeroed (the base)", out["off"], prefix=prompt)
    logprob_strip("Per-token log-probability shift of the with-channels continuation (log p with channels − log p "
                  "zeroed)", out["on"], out["shift"])

    words = [w.strip() for w in words_txt.split(",") if w.strip()]
    rows = logprob_shift(model, prompt, state, words)
    fig = shift_figure(rows)
    st.plotly_chart(fig, key="ch-shift")
    export_buttons(fig, "channels_logprob_shift", key="ch-shift-exp")
    st.dataframe(pd.DataFrame(rows).round(4), hide_index=True)


try:
    live(str(arts[artifact]))
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
