"""The inner link's aim, measured: a hand-off of a state that is not A's next token, significantly above the
wrong-session control.

Runs the inner-link pipeline (`lab.innerlink.run`) for a preset and prints, per task, session A's own exact match,
the commonest-answer guess, every arm's exact match with its McNemar p against the wrong-session latent, and the
token diagnostics (how often the first latent's nearest token, and A's own next token, is the gold answer).
The state task ("persona_state": A hands off before the question) is the one the aim is about.

Run:  python bench/bench_innerlink.py [--preset quick|tiny]     (default: LAB_BENCH_PRESET, else quick)
"""

from __future__ import annotations

import argparse
import os

import torch

from lab.innerlink import Config, run


def main(preset: str | None = None) -> dict:
    torch.set_num_threads(1)  # the machine's cores are shared
    preset = preset or os.environ.get("LAB_BENCH_PRESET", "quick")
    rep = run(Config.preset(preset), progress=False)
    out: dict = {"preset": preset, "base": rep.provenance["base"]}
    for m in rep.measures:
        arm, diag = m.extra.get("arm"), m.extra.get("diagnostic")
        if not (arm or diag or "guess" in m.extra or "open-set reconstruction" in m.name):
            continue
        out[m.name] = (f"{m.value:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}] n={m.n}"
                       + (f" p={m.p_value:.3g} vs {m.control}" if m.p_value is not None else ""))
    # the aim, per trained hand-off: above the wrong-session latent at p < 0.05 on the state task (the open-set
    # map on the personas it never saw)
    for m in rep.measures:
        arm = m.extra.get("arm")
        if arm in ("inner_link", "raw_states", "recon", "recon_open") and "state hand-off" in m.name and (
                arm != "recon_open" or m.name.startswith("open-set")) and (arm == "recon_open" or not m.name.startswith("open-set")):
            out[f"aim: state hand-off, {arm}, significantly above wrong-session"] = bool(
                m.p_value is not None and m.p_value < 0.05 and m.value > m.control_value)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="the inner-link preset (default: LAB_BENCH_PRESET, else quick)")
    res = main(ap.parse_args().preset)
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v}")
