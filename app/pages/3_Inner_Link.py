"""Inner link: pick a hand-off item; see what session A read and what B answered under every arm,
and the latent's nearest tokens. Display only: the computation is lab.innerlink."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from lab import LabError
from lab.innerlink import handoff_benchmark, load, load_recon, recon_for, reconstruct
from lab.innerlink.evaluate import handoff_figure
from lab.innerlink.handoff import ARM_LABELS, PERSONA_HALVES, TASKS, nearest_tokens
from lab.innerlink.train import KIND
from lab.ui import (
    TEXT_STYLE,
    artifacts,
    base_picker,
    cached_base,
    cached_resource,
    disabled_reason,
    export_buttons,
    show_error,
    stop_if_none,
)

st.set_page_config(page_title="Inner link", layout="wide")
st.title("Inner link: a latent across a session boundary")
st.markdown(
    "Session **A** reads some material (a short story, or a pointer-chain puzzle) and forms its answer; session "
    "**B** sees only the question plus what A hands over as input embeddings. The inner link "
    "R_in(h) = LN_post(h + W2·GELU(W1·LN_pre(h))) turns A's last-layer state into latent thoughts (m-step "
    "rollout). Does B answer like A? On the **persona_state** task A hands off before the question, so the answer "
    "is a state A holds, never its next token; on **persona** the name is A's next token."
)


@cached_resource(show_spinner="running the hand-off benchmark on these items…")
def benchmark(base_name: str, path: str, task: str, n_items: int, seed: int, open_set: bool = False):
    """The report's hand-off benchmark for this link, with the items and seed picked here (and the
    reconstruction map's arm when a map made for this link is on disk; with `open_set`, the open-set map's arm
    on items of the personas it never saw)."""
    base = cached_base(base_name)
    link = load(path, base)
    recon_dir = recon_for(link, base)
    recon = None if recon_dir is None else load_recon(recon_dir, base)
    cfg = link.config.with_(handoff_items=n_items, seed=seed)
    if not open_set:
        return handoff_benchmark(link, base, cfg, task=task, recon=recon)
    rmap = load_recon(reconstruct.artifact_dir(link.config.preset_name, base, open_set=True), base, open_set=True)
    return handoff_benchmark(link, base, cfg, task=task, recon=recon, extra_maps={"recon_open": rmap},
                             answers=PERSONA_HALVES[1])


def wrapped(text: str) -> None:
    """Generated or handed-off text, wrapped (never a one-line code span that runs off the page)."""
    st.markdown(f"<div style='{TEXT_STYLE}'>{html.escape(text) or '∅'}</div>", unsafe_allow_html=True)


@st.fragment
def item_view(res, base) -> None:
    """One item, every arm: a slider move reruns only this part."""
    st.header("One item")
    i = int(st.slider("Item", 0, len(res.items) - 1, 0, key="il-item"))
    row = res.rows()[i]
    left, right = st.columns(2)
    with left:
        st.subheader("Session A read")
        st.markdown(f"**Material** (A hands off after the {row['hands_off_after']}):")
        wrapped(row["material"])
        st.markdown("**B's question** (A reads it too, to answer itself):")
        wrapped(row["question"])
        st.markdown(f"**Gold answer:** {html.escape(row['gold'])} ({row['task']} task)")
        st.markdown(f"**A's own answer:** {html.escape(row['session_a'] or '∅')} {'✅' if row['session_a_ok'] else '❌'}")
        if row.get("A_next_tokens") is not None:
            st.markdown("**A's next tokens at the hand-off point** (the continuation arm):")
            wrapped(row["A_next_tokens"])
    with right:
        st.subheader("Session B answered")
        for arm in [a for a in res.answers if a != "session_a"]:
            st.markdown(f"- {ARM_LABELS.get(arm, arm)}: {html.escape(row[arm] or '∅')} {'✅' if row[arm + '_ok'] else '❌'}")

    st.subheader("The inner-link latents' nearest tokens (cosine to the input embeddings)")
    lat = res.latents[i]  # (m, d)
    st.dataframe(pd.DataFrame([{"latent step": k + 1, "norm": float(lat[k].norm()),
                                **{f"#{j + 1}": f"{tok!r} {c:.2f}" for j, (tok, c) in
                                   enumerate(nearest_tokens(base, lat[k], k=6))}}
                               for k in range(lat.shape[0])]), hide_index=True)


try:
    base_name = base_picker(key="il-base")
    arts = artifacts(KIND, base_name)
    stop_if_none(arts, "inner link", "innerlink", base_name)
    with st.form("il-form"):
        c1, c2, c3, c4 = st.columns(4)
        artifact = c1.selectbox("Inner-link artifact", list(arts), key="il-art")
        task = c2.selectbox("Task", list(TASKS), key="il-task",
                            help="persona_state: A hands off before the question (the answer is a state, not A's "
                                 "next token); persona: after it (the name is A's next token); pointer: a lookup")
        n_items = int(c3.number_input("Items (held-out)", 8, 400, 24, step=8, key="il-n"))
        seed = int(c4.number_input("Seed", 0, 10_000, 0, key="il-seed"))
        st.form_submit_button("Run the hand-off benchmark")  # the benchmark reruns only on this button
    base = cached_base(base_name)
    link = load(str(arts[artifact]), base)
    open_dir = reconstruct.artifact_dir(link.config.preset_name, base, open_set=True)
    no_open = task == "pointer" or not (open_dir / "manifest.json").exists()
    with_open = st.checkbox("Add the open-set reconstruction arm (map trained on the other 9 personas; items of "
                            "these 9 only)", False, key="il-open", disabled=no_open)
    disabled_reason(no_open, "the pointer task has no persona split" if task == "pointer" else
                    f"no open-set reconstruction map on disk ({open_dir.name}); `lab train innerlink` makes it")
    res = benchmark(base_name, str(arts[artifact]), task, n_items, seed, with_open and not no_open)

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
    diag = [m for m in res.measures if m.extra.get("diagnostic") or "guess" in m.extra]
    st.caption("Diagnostics: if the first latent's nearest token is the gold about as often as the inner-link arm "
               "is right, the hand-off carries a token, not a state.")
    st.dataframe(pd.DataFrame([{"row": m.name, "rate [95% CI]": m.value_text(2), "n": m.n,
                                "paired with": m.control or "", "p": m.p_value} for m in diag]), hide_index=True)
    item_view(res, base)
except LabError as e:
    show_error(e)
