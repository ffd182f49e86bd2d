"""Latent Lab dashboard: the lab's state at a glance (bases, artifacts, the last report's headline table) and,
in its own view (?view=report), a report with every figure."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lab import LabError, lab_home, models_dir, results_dir
from lab.bases import list_bases
from lab.pretrain import loss_text, vs_unigram_text
from lab.readme import headline_rows
from lab.store import read_json
from lab.ui import artifact_rows, artifacts_per_mechanism, report_blocks

st.set_page_config(page_title="Latent Lab", layout="wide")

PAGES = [("pages/1_Recursive_Latent_Forcing.py", "Recursive Latent Forcing", ":material/cycle:",
          "watch the loop dereference a pointer chain; lifeline, RAM / ALU gate partition, trajectories"),
         ("pages/2_Proprioceptive_Channels.py", "Proprioceptive channels", ":material/tune:",
          "set six state channels and see the same prompt continue with them and without"),
         ("pages/3_Inner_Link.py", "Inner link", ":material/link:", "hand a latent across a session boundary"),
         ("pages/4_Thinking_Combiner.py", "Thinking combiner", ":material/psychology:", "one extra thought pass, combined into the output")]


def runs() -> list:
    """Reproduce runs under results/ (a report.json and a report.md), newest first."""
    if not results_dir().exists():
        return []
    return sorted((p.parent for p in results_dir().glob("*/report.md") if (p.parent / "report.json").exists()),
                  key=lambda d: (d / "report.md").stat().st_mtime, reverse=True)


def load_report(run_dir) -> dict | None:
    try:
        rep = read_json(run_dir / "report.json")
    except LabError as e:
        st.warning(f"{run_dir / 'report.json'} is unreadable: {e}")
        return None
    return rep if isinstance(rep, dict) else None


def smoke_banner(rep: dict) -> None:
    if rep.get("preset") == "smoke":
        st.warning("**Smoke preset: these numbers mean nothing.** The smoke preset trains for seconds to check that "
                   "every step runs; read a `quick` or `tiny` report for results (`lab reproduce --preset quick`).")


def report_view(name: str) -> None:
    """One report.md, rendered in full, its figures from the PNG files beside it."""
    run_dir = results_dir() / name
    if st.button("← Back to the overview", key="report-back"):
        st.query_params.clear()
        st.rerun()
    if not (run_dir / "report.md").exists() or "/" in name or name.startswith("."):
        st.error(f"No report named {name!r} under {results_dir()}.")
        return
    rep = load_report(run_dir) or {}
    smoke_banner(rep)
    missing = []
    for kind, block in report_blocks((run_dir / "report.md").read_text(), run_dir):
        if kind == "md":
            st.markdown(block)
        elif block.exists():
            st.image(str(block), width="stretch")
        else:
            missing.append(block)
            st.warning(f"figure missing on disk: `{block}`")
    if missing:
        st.error(f"{len(missing)} figure(s) of this report are not on disk.")


view = st.query_params.get("view")
if view == "report" and st.query_params.get("run"):
    report_view(st.query_params["run"])
    st.stop()

st.title("Latent Lab")
st.markdown("Train, probe and demo latent-state mechanisms in language models. Every page recomputes live on a "
            "tiny base.")
st.caption(f"LAB_HOME: `{lab_home()}`")

all_runs = runs()
last = load_report(all_runs[0]) if all_runs else None
if last:
    smoke_banner(last)

cols = st.columns(len(PAGES))
arts = artifact_rows() if models_dir().exists() else []
per_mech = artifacts_per_mechanism(arts)
for col, (path, title, icon, what) in zip(cols, PAGES):
    with col.container(border=True):
        st.page_link(path, label=title, icon=icon)
        st.caption(what)
        kinds = per_mech.get(title)
        st.markdown(", ".join(f"{n} × `{k}`" for k, n in sorted(kinds.items())) if kinds else "_no artifact yet_")

rows = list_bases()
on_disk = [r for r in rows if r["on_disk"]]
m1, m2, m3 = st.columns(3)
m1.metric("Bases on disk", f"{len(on_disk)} of {len(rows)}")
m2.metric("Trained artifacts", sum(1 for a in arts if a["kind"] != "broken"))
m3.metric("Reports", len(all_runs))

st.header("Last report")
if last:
    run = all_runs[0].name
    st.markdown(f"**{run}**: preset `{last.get('preset')}`, seed {last.get('seed')}, commit `{last.get('git_commit')}`, "
                f"{(last.get('seconds') or 0) / 60:.1f} min")
    if last.get("failures"):
        st.error("Failed sections: " + "; ".join(f"{k}: {v}" for k, v in last["failures"].items()))
    head = headline_rows(last)
    if head:
        st.caption("Each headline measure of the report beside the published figure it answers.")
        st.dataframe(pd.DataFrame(head), hide_index=True, width="stretch")
    else:
        st.markdown("_This report has no measure with a published figure beside it._")
    pick = st.selectbox("Open a report", [d.name for d in all_runs], key="home-run")
    if st.button("Open the full report (every table and figure)", key="home-open", type="primary"):
        st.query_params.update({"view": "report", "run": pick})
        st.rerun()
else:
    st.markdown("No report yet: run `lab reproduce --preset quick` (about 15 minutes on 2 cores).")

st.header("Bases")
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
st.markdown("On disk: " + (", ".join(f"**{r['name']}**" for r in on_disk) if on_disk else "none yet"))
if missing:
    st.markdown("Missing bases can be trained with " + ", ".join(f"`lab pretrain {m}`" for m in missing) + ".")

with st.expander(f"Artifacts on disk ({len(arts)})"):
    if arts:
        st.dataframe(pd.DataFrame(arts), hide_index=True)
    else:
        st.markdown("No trained mechanism artifacts yet: `lab reproduce --preset quick` trains them all.")
