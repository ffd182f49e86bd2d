"""Latent Lab dashboard: home page with the lab's state (bases, artifacts, the last report)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lab import lab_home, models_dir, results_dir
from lab.bases import list_bases
from lab.pretrain import loss_text, vs_unigram_text
from lab.ui import artifact_rows

st.set_page_config(page_title="Latent Lab", layout="wide")
st.title("Latent Lab")
st.markdown(
    "Train, probe and demo latent-state mechanisms in language models. "
    "Pick a mechanism in the sidebar; every page recomputes live on a tiny base."
)
st.caption(f"LAB_HOME: `{lab_home()}`")

st.header("Bases")
rows = list_bases()
for r in rows:
    if r.get("warning"):  # a malformed lab_base.json: the base is listed without its numbers
        st.warning(r["warning"])
st.dataframe(pd.DataFrame([{
    "name": r["name"], "arch": r["arch"], "d_model": r["d_model"], "layers": r["layers"],
    "on disk": "yes" if r["on_disk"] else "no",
    "held-out loss, nats/token [95% CI]": loss_text(r), "vs the training unigram (paired)": vs_unigram_text(r),
    "train seconds": r["seconds"],
} for r in rows]), hide_index=True)
missing = [r["name"] for r in rows if not r["on_disk"]]
if missing:
    st.markdown("Missing bases can be trained with " + ", ".join(f"`lab pretrain {m}`" for m in missing) + ".")
on_disk = [r["name"] for r in rows if r["on_disk"]]
st.markdown("On disk: " + (", ".join(f"**{n}**" for n in on_disk) if on_disk else "none yet"))

st.header("Artifacts")
arts = artifact_rows() if models_dir().exists() else []
if arts:
    st.dataframe(pd.DataFrame(arts), hide_index=True)
else:
    st.markdown("No trained mechanism artifacts yet: `lab reproduce --preset tiny` trains them all.")

st.header("Last report")
reports = sorted(results_dir().glob("*/report.md"), key=lambda p: p.stat().st_mtime) if results_dir().exists() else []
if reports:
    st.caption(f"`{reports[-1]}`")
    st.markdown(reports[-1].read_text())
else:
    st.markdown("No report yet: run `lab reproduce --preset tiny`.")
