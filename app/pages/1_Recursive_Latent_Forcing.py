"""Recursive Latent Forcing: pick or type a pointer-chain problem and watch the loop solve it, live."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lab import LabError
from lab.rlf import load
from lab.rlf.explore import Explorer, describe, examples, null_models_for
from lab.ui import (
    artifacts,
    base_picker,
    cached_base,
    cached_resource,
    compare_outputs,
    disabled_reason,
    export_buttons,
    show_error,
    stop_if_none,
)

st.set_page_config(page_title="Recursive Latent Forcing", layout="wide")
st.title("Recursive Latent Forcing")
st.caption("A frozen base encodes the prompt once; a small core loops over the residual stream, re-fed the "
           "prompt through the lifeline gate, and emits one dereference per loop, then HALT.")


@cached_resource(show_spinner="loading the RLF model, its null-control runs, and fitting the trajectory map…")
def cached_explorer(path: str, base_name: str) -> Explorer:
    model = load(path, cached_base(base_name))
    nulls, note = null_models_for(model)  # the report's rule: the same null runs, the same quantiles
    return Explorer(model, null_models=nulls, null_note=note)


@st.cache_data
def cached_examples(path: str, base_name: str) -> dict[str, str]:
    return examples(cached_explorer(path, base_name).model.config)


base_name = base_picker(key="rlf-base")
arts = artifacts("rlf", base_name)
stop_if_none(arts, "RLF model", "rlf", base_name)
art_name = st.selectbox("RLF model", list(arts), key="rlf-artifact")
try:
    explorer = cached_explorer(str(arts[art_name]), base_name)
except LabError as e:
    show_error(e)
    st.stop()
model = explorer.model
st.caption(f"**This run:** {describe(model.config)}.")
if not model.config.lifeline:
    st.warning("This run is the no-lifeline baseline: its gate was held at 0 in training, so the lifeline toggle and "
               "scales change nothing.")
(st.info if explorer.rule == "null-calibrated" else st.warning)(
    f"**Gate partition: {explorer.rule} rule** — RAM {len(explorer.ram_dims)}, ALU {len(explorer.alu_dims)} of "
    f"{len(explorer.partition['gate'])} dimensions. {explorer.rule_note}")


@st.fragment
def live(art_path: str) -> None:
    """The knobs and everything they change: a knob reruns only this part of the page."""
    left, right = st.columns([2, 1])
    with left:
        ex = cached_examples(art_path, base_name)
        choice = st.selectbox("Held-out problem", ["(type your own)"] + list(ex), index=2, key="rlf-example")
        prompt = st.text_area("Problem (must end with 'Answer:')", value=ex.get(choice, "K = walnut. R = K. D = R. "
                              "What is D?\nAnswer:"), height=110, key=f"rlf-prompt-{choice}")
    with right:
        lifeline_on = st.toggle("Lifeline", value=True, key="rlf-lifeline")
        off = disabled_reason(not lifeline_on, "The lifeline is off (zeroed): its scales have nothing to act on.")
        scale = st.slider("Lifeline scale", 0.0, 2.0, 1.0, 0.05, key="rlf-scale", disabled=off)
        no_ram = not explorer.ram_dims
        ram = st.slider("RAM scale", 0.0, 3.0, 1.0, 0.05, key="rlf-ram", disabled=off or no_ram,
                        help=f"multiplies the gate on the {len(explorer.ram_dims)} RAM dimensions ({explorer.rule} rule)")
        if no_ram and not off:
            disabled_reason(True, f"The {explorer.rule} rule selects no RAM dimension on this model.")
        no_alu = not explorer.alu_dims
        alu = st.slider("ALU scale", 0.0, 3.0, 1.0, 0.05, key="rlf-alu", disabled=off or no_alu,
                        help=f"multiplies the gate on the {len(explorer.alu_dims)} ALU dimensions ({explorer.rule} rule)")
        if no_alu and not off:
            disabled_reason(True, f"The {explorer.rule} rule selects no ALU dimension on this model.")
        cap = st.number_input("Loop cap", min_value=1, max_value=32, value=model.config.infer_cap, step=1,
                              key="rlf-cap")

    try:
        v = explorer.view(prompt, cap=int(cap), lifeline=lifeline_on, scale=scale, ram_scale=ram, alu_scale=alu)
    except LabError as e:
        show_error(e)
        return

    truth = " -> ".join(v["truth"]) if v["truth"] else "(no ground truth: the chain is cyclic or undefined)"
    halt = f"HALT at loop {v['halted_at']}" if v["halted_at"] is not None else f"no HALT within {int(cap)} loops"
    ok = v["truth"] is not None and v["answer"] == v["truth"][-1]
    st.markdown(f"**Answer: `{v['answer']}`** ({halt}) {'✅' if ok else '❌' if v['truth'] else ''} — "
                f"ground truth: {truth}; with the lifeline zeroed: `{v['answer_off']}`")
    compare_outputs("Per-loop predictions, these settings", [f"{p} " for p in v["preds"]],
                    "Per-loop predictions, lifeline zeroed", [f"{p} " for p in v["preds_off"]])
    st.dataframe(pd.DataFrame(v["rows"]), hide_index=True, width="stretch")
    k = int(v["moved"].argmax())
    st.caption(f"Latent moved from the lifeline as trained: up to {v['moved'][k]:.4g} (L2, loop {k}); the column "
               "gives every loop's answer-position latent distance (0 when every knob is at 1).")

    c1, c2 = st.columns(2)
    with c1:
        st.plotly_chart(v["figures"]["trajectory"], width="stretch", key="rlf-traj")
        export_buttons(v["figures"]["trajectory"], "rlf_trajectory", key="rlf-traj-exp")
    with c2:
        st.plotly_chart(v["figures"]["gate"], width="stretch", key="rlf-gate")
        export_buttons(v["figures"]["gate"], "rlf_gate_histogram", key="rlf-gate-exp")
    st.plotly_chart(v["figures"]["norms"], width="stretch", key="rlf-norms")
    export_buttons(v["figures"]["norms"], "rlf_state_norms_live", key="rlf-norms-exp")
    with st.expander("Intervention spec (JSON)"):
        st.json(v["lifeline"] | {"ram_dims": f"{len(explorer.ram_dims)} dims", "alu_dims": f"{len(explorer.alu_dims)} dims",
                                 "rule": explorer.rule})


live(str(arts[art_name]))
