"""Inner link: pick a hand-off item; see what session A read and what B answered under every arm,
and the latent's nearest tokens. Display only: the computation is lab.innerlink."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lab import LabError
from lab.innerlink import handoff_benchmark, load, load_recon, recon_for
from lab.innerlink.evaluate import handoff_figure
from lab.innerlink.handoff import ARM_LABELS, TASKS, nearest_tokens
from lab.innerlink.train import KIND
from lab.ui import artifacts, base_picker, cached_base, export_buttons, show_error, stop_if_none

st.set_page_config(page_title="Inner link", layout="wide")
st.title("Inner link: a latent across a session boundary")
st.markdown(
    "Session **A** reads some material (a short story, or a pointer-chain puzzle) and forms its answer; session "
    "**B** sees only the question plus what A hands over as input embeddings. The inner link "
    "R_in(h) = LN_post(h + W2·GELU(W1·LN_pre(h))) turns A's last-layer state into latent thoughts (m-step "
    "rollout). Does B answer like A?"
)


@st.cache_resource(show_spinner="running the hand-off benchmark on these items…")
def benchmark(base_name: str, path: str, task: str, n_items: int, seed: int):
    """The report's hand-off benchmark for this link, with the items and seed picked here (and the
    reconstruction map's arm when a map made for this link is on disk)."""
    base = cached_base(base_name)
    link = load(path, base)
    recon_dir = recon_for(link, base)
    recon = None if recon_dir is None else load_recon(recon_dir, base)
    return handoff_benchmark(link, base, link.config.with_(handoff_items=n_items, seed=seed), task=task, recon=recon)


try:
    base_name = base_picker(key="il-base")
    arts = artifacts(KIND, base_name)
    stop_if_none(arts, "inner link", "innerlink", base_name)
    c1, c2, c3, c4 = st.columns(4)
    artifact = c1.selectbox("Inner-link artifact", list(arts), key="il-art")
    task = c2.selectbox("Task", list(TASKS), key="il-task")
    n_items = int(c3.number_input("Items (held-out)", 8, 400, 24, step=8, key="il-n"))
    seed = int(c4.number_input("Seed", 0, 10_000, 0, key="il-seed"))
    res = benchmark(base_name, str(arts[artifact]), task, n_items, seed)
    base = cached_base(base_name)

    summary = res.summary()
    fig = handoff_figure(summary, task)  # the report's figure, for these items
    st.plotly_chart(fig, key="il-fig")
    export_buttons(fig, "innerlink_handoff", key="il-exp")
    by_arm = {m.extra["arm"]: m for m in res.measures if m.extra.get("arm")}
    st.dataframe(pd.DataFrame([{"arm": ARM_LABELS.get(r["arm"], r["arm"]), "correct": f"{r['correct']}/{r['n']}",
                                "exact match [95% CI]": by_arm[r["arm"]].value_text(2),
                                "McNemar p vs wrong-session": r["p_vs_wrong_session"],
                                "agrees with A": r["agrees_with_A"]} for r in summary]),
                 hide_index=True)

    st.header("One item")
    i = int(st.slider("Item", 0, len(res.items) - 1, 0, key="il-item"))
    row = res.rows()[i]
    left, right = st.columns(2)
    with left:
        st.subheader("Session A read")
        st.markdown(f"**Material:** `{row['material']}`")
        st.markdown(f"**Question:** `{row['question']}`")
        st.markdown(f"**Gold answer:** `{row['gold']}` ({row['task']} task)")
        st.markdown(f"**A's own answer:** `{row['session_a'] or '∅'}` {'✅' if row['session_a_ok'] else '❌'}")
    with right:
        st.subheader("Session B answered")
        for arm in [a for a in res.answers if a != "session_a"]:
            st.markdown(f"- {ARM_LABELS.get(arm, arm)}: `{row[arm] or '∅'}` {'✅' if row[arm + '_ok'] else '❌'}")

    st.subheader("The inner-link latents' nearest tokens (cosine to the input embeddings)")
    lat = res.latents[i]  # (m, d)
    st.dataframe(pd.DataFrame([{"latent step": k + 1, "norm": float(lat[k].norm()),
                                **{f"#{j + 1}": f"{tok!r} {c:.2f}" for j, (tok, c) in
                                   enumerate(nearest_tokens(base, lat[k], k=6))}}
                               for k in range(lat.shape[0])]), hide_index=True)
except LabError as e:
    show_error(e)
