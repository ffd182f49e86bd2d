"""The interactive view behind the app page and the notebook widgets: one prompt, live knobs.

    ex = Explorer(model)                  # fits the trajectory PCA once (on held-out problems)
    v = ex.view(prompt, cap=8, lifeline=True, scale=1.0, ram_scale=1.0, alu_scale=1.0)
    v["loops"], v["answer"], v["figures"]["trajectory"], v["figures"]["gate"]

Everything is recomputed per call (one base pass, two loop runs: the chosen settings and the
lifeline-off overlay); only the PCA map and the gate partition are fitted once.
"""

from __future__ import annotations

import time

import numpy as np
import plotly.graph_objects as go
from sklearn.decomposition import PCA

from lab import LabError
from lab.figures import LAB_COLORS, template_json
from lab.rlf.data import Problem, heldout_set
from lab.rlf.infer import explain
from lab.rlf.model import RLF, Lifeline
from lab.rlf.probes import STATES, collect_latents, gate_histogram, gate_partition


def background(config, per_hop: int = 20) -> list[Problem]:
    """The held-out problems the trajectory map is fitted on: the first `per_hop` of each trained hop count's test set."""
    return [p for h in range(1, config.max_train_hops + 1) for p in heldout_set(h, config.test_n)[:per_hop]]


def examples(config, max_hops: int = 12, per_hop: int = 3) -> dict[str, str]:
    """{label: prompt} of held-out problems with 1..max_hops hops, to pick from."""
    out = {}
    for h in range(1, max_hops + 1):
        for i, p in enumerate(heldout_set(h, config.test_n)[:per_hop]):
            out[f"{h} hops, #{i}: What is {p.query}? ({' -> '.join(p.path)})"] = p.prompt
    return out


class Explorer:
    def __init__(self, model: RLF, background_problems: list[Problem] | None = None,
                 null_models: list[RLF] | None = None, seed: int = 0):
        """background_problems: what the trajectory map is fitted on (default: `background(model.config)`);
        null_models: control runs for the null-calibrated RAM / ALU dimensions (default: the published rule)."""
        if background_problems is None:
            background_problems = background(model.config)
        if not background_problems:
            raise LabError("the explorer needs some background problems to fit its trajectory map")
        self.model = model
        self.background = collect_latents(model, background_problems)
        self.pca = PCA(n_components=2, random_state=seed).fit(self.background.X)
        self.bg_xy = self.pca.transform(self.background.X)
        self.partition = gate_partition(model, null_models)
        rule = self.partition.get("null", self.partition["published"])
        self.ram_dims = [int(i) for i in rule["ram"]]
        self.alu_dims = [int(i) for i in rule["alu"]]
        self.gate_figure = gate_histogram(self.partition)

    def lifeline(self, on: bool, scale: float, ram_scale: float, alu_scale: float) -> Lifeline:
        return Lifeline(mode="on" if on else "zero", scale=float(scale), ram_scale=float(ram_scale),
                        alu_scale=float(alu_scale), ram_dims=self.ram_dims, alu_dims=self.alu_dims)

    def view(self, prompt: str, cap: int = 8, lifeline: bool = True, scale: float = 1.0, ram_scale: float = 1.0,
             alu_scale: float = 1.0, topk: int = 5) -> dict:
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise LabError(f"the loop cap must be a positive integer, got {cap!r}")
        ll = self.lifeline(lifeline, scale, ram_scale, alu_scale)
        cur, off = explain(self.model, prompt, cap, [ll, Lifeline(mode="zero")], topk)  # one base pass
        xy = self.pca.transform(cur["latents"])
        xy_off = self.pca.transform(off["latents"])
        rows = []
        for lp in cur["loops"]:
            k = lp["loop"]
            want = (cur["truth"] + ["<|halt|>"])[k] if cur["truth"] and k <= len(cur["truth"]) else None
            rows.append({"loop": k, **{f"top{i + 1}": f"{w} ({p:.2f})" for i, (w, p) in enumerate(lp["top"])},
                         "target": want or "-", "lifeline off": off["loops"][k]["pred"]})
        return {"rows": rows, "answer": cur["answer"], "halted_at": cur["halted_at"], "truth": cur["truth"],
                "answer_off": off["answer"], "xy": xy, "xy_off": xy_off,
                "figures": {"trajectory": self.trajectory_figure(xy, xy_off, cur, off), "gate": self.gate_figure},
                "lifeline": ll.to_dict()}

    def _background_traces(self) -> list[dict]:
        bg, out = self.background, []
        for s, name in enumerate(STATES):
            sel = bg.state == s
            out.append(dict(type="scatter", x=self.bg_xy[sel, 0].tolist(), y=self.bg_xy[sel, 1].tolist(),
                            mode="markers", name=f"held-out: {name}", hoverinfo="skip",
                            marker=dict(size=4, color=LAB_COLORS[s + 3], opacity=0.25)))
        return out

    def trajectory_figure(self, xy, xy_off, cur, off):
        """Built from plain dicts without plotly's per-property validation: this runs on every app
        interaction, and validated construction alone costs ~50-90 ms."""
        if not hasattr(self, "_bg_traces"):
            self._bg_traces = self._background_traces()
        data = list(self._bg_traces)
        for label, pts, ex, color, dash in (("this prompt", xy, cur, LAB_COLORS[0], "solid"),
                                            ("lifeline off", xy_off, off, LAB_COLORS[1], "dot")):
            data.append(dict(type="scatter", x=pts[:, 0].tolist(), y=pts[:, 1].tolist(), mode="lines+markers+text",
                             name=label, text=[f"{lp['loop']}: {lp['pred']}" for lp in ex["loops"]],
                             textposition="top center", line=dict(color=color, dash=dash),
                             marker=dict(size=8, color=color)))
        ev = self.pca.explained_variance_ratio_
        layout = dict(template=template_json(), xaxis=dict(title=dict(text=f"PC1 ({ev[0]:.0%})")),
                      yaxis=dict(title=dict(text=f"PC2 ({ev[1]:.0%})")),
                      title=dict(text="Answer-position latent per loop (PCA of held-out latents)", x=0.02))
        return go.Figure(data=data, layout=layout, _validate=False)


def latency(explorer: Explorer, prompt: str, n: int = 30, cap: int = 8, seed: int = 0) -> dict:
    """Wall time of `view` over n interactions with random knob settings (the app's live cost)."""
    rng = np.random.default_rng(seed)
    times = []
    for i in range(n):
        t = time.perf_counter()
        explorer.view(prompt, cap=cap, lifeline=bool(rng.random() < 0.8), scale=float(rng.uniform(0, 2)),
                      ram_scale=float(rng.uniform(0, 2)), alu_scale=float(rng.uniform(0, 2)))
        times.append(time.perf_counter() - t)
    a = np.array(times) * 1000
    return {"n": n, "median_ms": float(np.median(a)), "p95_ms": float(np.quantile(a, 0.95)), "max_ms": float(a.max())}
