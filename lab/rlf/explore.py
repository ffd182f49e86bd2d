"""The interactive view behind the app page and the notebook widgets: one prompt, live knobs.

    nulls, note = null_models_for(model)  # the control runs the report calibrated its gate rule on
    ex = Explorer(model, null_models=nulls)  # fits the trajectory PCA once (on held-out problems)
    v = ex.view(prompt, cap=8, lifeline=True, scale=1.0, ram_scale=1.0, alu_scale=1.0)
    v["rows"], v["answer"], v["figures"]["trajectory"], v["figures"]["gate"]

Everything is recomputed per call (one base pass, three loop runs: the chosen settings, the
lifeline-off overlay and the lifeline as trained, the reference for how far the settings move each
loop's latent); only the PCA map and the gate partition are fitted once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from sklearn.decomposition import PCA

from lab import LabError, models_dir, results_dir
from lab.figures import LAB_COLORS, PUBLISHED_COLOR, template_json
from lab.rlf.config import Config
from lab.rlf.data import Problem, heldout_set
from lab.rlf.infer import explain
from lab.rlf.model import RLF, Lifeline
from lab.rlf.probes import PUBLISHED_ALU, PUBLISHED_RAM, STATES, collect_latents, gate_partition
from lab.rlf.train import load
from lab.store import made_on, read_json

GROUPS = (("other", LAB_COLORS[5]), ("RAM", LAB_COLORS[0]), ("ALU", LAB_COLORS[1]))


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


def _report_null_paths(model: RLF) -> tuple[list[Path], str] | None:
    """The null runs the newest report on this artifact calibrated its gate rule on (its provenance lists the
    method's artifact and its null runs), as folders under models_dir(); None when no report names the artifact."""
    art = getattr(model, "artifact", None)
    if art is None or not results_dir().is_dir():
        return None
    name = Path(art.path).name
    for rep in sorted(results_dir().glob("*/rlf/report.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            prov = read_json(rep).get("provenance", {})
        except (LabError, AttributeError):
            continue
        if Path(str(prov.get("artifact", ""))).name == name and isinstance(prov.get("null_runs"), list):
            # by folder name: the report may have been written under another LAB_HOME path
            return [models_dir() / Path(p).name for p in prov["null_runs"]], rep.parent.parent.name
    return None


def null_models_for(model: RLF) -> tuple[list[RLF], str]:
    """The shuffled-supervision control runs behind the null-calibrated gate rule, as the report used them:
    the ones the newest report on this artifact lists, else the preset's `null_controls()` found on disk
    (what `lab.rlf.run` trains). Returns (models, a one-line note saying which runs and which rule)."""
    base, cfg = model.base, model.config
    found = _report_null_paths(model)
    if found is not None:
        paths, source = found
        source = f"the null runs of report results/{source}"
    else:
        preset_runs = Config.PRESETS.get(cfg.preset_name, {}).get("null_runs", Config.null_runs)
        paths = [models_dir() / c.run_name(base.name) for c in cfg.with_(null_runs=preset_runs).null_controls()]
        source = f"the {cfg.preset_name} preset's null-control runs"
    nulls, unusable = [], []
    for p in paths:
        if (p / "config.json").exists() and made_on(p, base):
            try:
                nulls.append(load(p, base))
            except LabError:   # e.g. trained by an older lab: the page still opens, and says which run it skipped
                unusable.append(p.name)
    skipped = f" Skipped {', '.join(unusable)}: not loadable by this lab (retrain it)." if unusable else ""
    if not nulls:
        return [], (f"No usable null-control run on disk ({source}: {', '.join(p.name for p in paths) or 'none'}), "
                    f"so the "
                    f"partition uses the published thresholds (RAM: gate > {PUBLISHED_RAM}, ALU: gate < "
                    f"{PUBLISHED_ALU}). `lab reproduce` trains the null runs.{skipped}")
    missing = len(paths) - len(nulls)
    return nulls, (f"Null-calibrated rule, as in the report: thresholds at the 0.5% / 99.5% quantiles of the gates of "
                   f"{len(nulls)} shuffled-supervision control run(s) ({source})"
                   + (f"; {missing} of them not usable" if missing else "") + "." + skipped)


class Explorer:
    def __init__(self, model: RLF, background_problems: list[Problem] | None = None,
                 null_models: list[RLF] | None = None, seed: int = 0, null_note: str = ""):
        """background_problems: what the trajectory map is fitted on (default: `background(model.config)`);
        null_models: control runs for the null-calibrated RAM / ALU dimensions (none: the published rule);
        null_note: where those runs came from (`null_models_for`)."""
        if background_problems is None:
            background_problems = background(model.config)
        if not background_problems:
            raise LabError("the explorer needs some background problems to fit its trajectory map")
        self.model = model
        self.background = collect_latents(model, background_problems)
        self.pca = PCA(n_components=2, random_state=seed).fit(self.background.X)
        self.bg_xy = self.pca.transform(self.background.X)
        self.partition = gate_partition(model, null_models)
        self.rule = "null-calibrated" if "null" in self.partition else "published"
        rule = self.partition[self.rule if self.rule == "published" else "null"]
        self.rule_note = null_note or (f"{self.rule} rule" + (f" ({len(null_models)} control runs)" if null_models
                                                               else ": no null-control runs given"))
        self.ram_dims = [int(i) for i in rule["ram"]]
        self.alu_dims = [int(i) for i in rule["alu"]]
        g = self.partition["gate"]
        self.group = np.zeros(len(g), dtype=int)   # index into GROUPS
        self.group[self.ram_dims] = 1
        self.group[self.alu_dims] = 2
        self._unmoved: dict[tuple, tuple[dict, dict]] = {}
        self._unmoved_lock = threading.Lock()   # one explorer serves every dashboard session (st.cache_resource)

    def lifeline(self, on: bool, scale: float, ram_scale: float, alu_scale: float) -> Lifeline:
        return Lifeline(mode="on" if on else "zero", scale=float(scale), ram_scale=float(ram_scale),
                        alu_scale=float(alu_scale), ram_dims=self.ram_dims, alu_dims=self.alu_dims)

    def view(self, prompt: str, cap: int = 8, lifeline: bool = True, scale: float = 1.0, ram_scale: float = 1.0,
             alu_scale: float = 1.0, topk: int = 5) -> dict:
        """Per-loop predictions under the chosen settings beside the lifeline zeroed, how far the settings move
        each loop's latent from the lifeline as trained, and the two figures."""
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise LabError(f"the loop cap must be a positive integer, got {cap!r}")
        ll = self.lifeline(lifeline, scale, ram_scale, alu_scale)
        off, ref = self._unmoved_runs(prompt, cap, topk)
        as_trained = lifeline and scale == 1.0 and ram_scale == 1.0 and alu_scale == 1.0
        cur = ref if as_trained else explain(self.model, prompt, cap, ll, topk)
        xy = self.pca.transform(cur["latents"])
        xy_off = self.pca.transform(off["latents"])
        moved = np.linalg.norm(cur["latents"] - ref["latents"], axis=1)
        rows = []
        for lp in cur["loops"]:
            k = lp["loop"]
            want = (cur["truth"] + ["<|halt|>"])[k] if cur["truth"] and k <= len(cur["truth"]) else None
            rows.append({"loop": k, **{f"top{i + 1}": f"{w} ({p:.2f})" for i, (w, p) in enumerate(lp["top"])},
                         "target": want or "-", "lifeline off": off["loops"][k]["pred"],
                         "latent moved vs as trained (L2)": f"{moved[k]:.3g}"})
        return {"rows": rows, "answer": cur["answer"], "halted_at": cur["halted_at"], "truth": cur["truth"],
                "answer_off": off["answer"], "xy": xy, "xy_off": xy_off, "moved": moved,
                "preds": [lp["pred"] for lp in cur["loops"]], "preds_off": [lp["pred"] for lp in off["loops"]],
                "norms": {"these settings": cur["norms"], "lifeline off": off["norms"]},
                "figures": {"trajectory": self.trajectory_figure(xy, xy_off, cur, off),
                            "gate": self.gate_figure(lifeline, scale, ram_scale, alu_scale),
                            "norms": self.norm_figure(cur, off)},
                "lifeline": ll.to_dict()}

    def _unmoved_runs(self, prompt: str, cap: int, topk: int) -> tuple[dict, dict]:
        """The lifeline-zeroed and as-trained runs of a prompt, which no knob changes: kept for the last prompts,
        so a knob move runs the loop once instead of three times."""
        key = (prompt, cap, topk)
        with self._unmoved_lock:
            if key not in self._unmoved:
                if len(self._unmoved) >= 32:
                    self._unmoved.pop(next(iter(self._unmoved)))
                self._unmoved[key] = tuple(explain(self.model, prompt, cap, [Lifeline(mode="zero"), Lifeline()],
                                                   topk))
            return self._unmoved[key]

    def touched(self, lifeline: bool, scale: float, ram_scale: float, alu_scale: float) -> dict[str, bool]:
        """Which partition groups the current knobs change: the lifeline off or its scale moves every dimension."""
        everything = (not lifeline) or scale != 1.0
        return {"other": everything, "RAM": everything or (ram_scale != 1.0 and bool(self.ram_dims)),
                "ALU": everything or (alu_scale != 1.0 and bool(self.alu_dims))}

    def gate_figure(self, lifeline: bool = True, scale: float = 1.0, ram_scale: float = 1.0, alu_scale: float = 1.0):
        """The gate's histogram coloured by the partition in use; the groups the current knobs change drawn solid
        and outlined, the others faded, and the gate as the knobs leave it (gate x scales) as an outline.
        Plain dicts without plotly's validation: this runs on every interaction."""
        part, g = self.partition, self.partition["gate"]
        eff = g * (scale if lifeline else 0.0)
        eff[self.ram_dims] *= ram_scale
        eff[self.alu_dims] *= alu_scale
        lo, hi = float(min(g.min(), 0.9)), float(max(g.max(), 1.1))
        bins = dict(start=lo - 1e-3, end=hi + 1e-3, size=(hi - lo) / 60)
        touched = self.touched(lifeline, scale, ram_scale, alu_scale)
        data = []
        for gi, (name, color) in enumerate(GROUPS):
            sel = self.group == gi
            on = touched[name]
            data.append(dict(type="histogram", x=g[sel].tolist(), xbins=bins, marker=dict(
                color=color, opacity=1.0 if on else 0.35, line=dict(color="#111" if on else color, width=2 if on else 0)),
                name=f"{name} ({int(sel.sum())})" + (" — moved by the knobs" if on else "")))
        if "null_gates" in part:
            data.append(dict(type="histogram", x=part["null_gates"].tolist(), xbins=bins, name="control-run gates (null)",
                             marker=dict(color="rgba(0,0,0,0)", line=dict(color="#333", width=1))))
        if any(touched.values()):
            data.append(dict(type="histogram", x=np.clip(eff, lo, hi).tolist(), xbins=bins,
                             name="gate x current scales (clipped to the axis)",
                             marker=dict(color="rgba(0,0,0,0)", line=dict(color=LAB_COLORS[6], width=2))))
        shapes, notes = [], []
        lines = [(PUBLISHED_RAM, PUBLISHED_COLOR, "dot", f"published RAM > {PUBLISHED_RAM}"),
                 (PUBLISHED_ALU, PUBLISHED_COLOR, "dot", f"published ALU < {PUBLISHED_ALU}")]
        if "null_thresholds" in part:
            nlo, nhi = part["null_thresholds"]
            lines += [(nhi, LAB_COLORS[6], "dash", f"null RAM > {nhi:.4f}"), (nlo, LAB_COLORS[6], "dash",
                                                                               f"null ALU < {nlo:.4f}")]
        for i, (x, color, dash, text) in enumerate(lines):
            shapes.append(dict(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1,
                               line=dict(color=color, dash=dash, width=1.5)))
            notes.append(dict(xref="x", yref="paper", x=x, y=1.0 - 0.07 * i, text=text, showarrow=False,
                              xanchor="left", font=dict(size=10, color=color)))
        layout = dict(template=template_json(), barmode="overlay", shapes=shapes, annotations=notes,
                      xaxis=dict(title=dict(text="gate value")), yaxis=dict(title=dict(text="dimensions")),
                      title=dict(text=f"Lifeline gate by partition ({self.rule} rule): RAM {len(self.ram_dims)}, "
                                      f"ALU {len(self.alu_dims)} of {len(g)} dims", x=0.02))
        return go.Figure(data=data, layout=layout, _validate=False)

    def norm_figure(self, cur: dict, off: dict):
        """The per-loop norm trace at the answer position: the state the core reads (after the lifeline add) and the
        state each loop hands on, under these settings and with the lifeline zeroed. Without a loop norm a zeroed
        lifeline also shrinks what the core reads, so an ablation moves the scale as well as the content."""
        data = []
        for label, ex, color in (("these settings", cur, LAB_COLORS[0]), ("lifeline off", off, LAB_COLORS[1])):
            for site, dash in (("core reads", "solid"), ("after loop", "dot")):
                y = ex["norms"][site]
                data.append(dict(type="scatter", x=list(range(len(y))), y=y.tolist(), mode="lines+markers",
                                 name=f"{site}, {label}", line=dict(color=color, dash=dash), marker=dict(size=6)))
        layout = dict(template=template_json(), xaxis=dict(title=dict(text="loop"), dtick=1),
                      yaxis=dict(title=dict(text="L2 norm (answer position)"), rangemode="tozero"),
                      title=dict(text="Per-loop state norm (" + ("loop norm on" if self.model.config.loop_norm
                                                                 else "no loop norm") + ")", x=0.02))
        return go.Figure(data=data, layout=layout, _validate=False)

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


def describe(config: Config) -> str:
    """One line naming how an RLF run was built: its core, loop variant, loop norm, weight decay, where the loop
    starts and which baseline switch (if any) it carries, for the app page and the notebook."""
    loop = ("paper loop (the base's upper blocks re-run with LoRA rank %d inside every loop, head trainable)"
            % config.lora_rank if config.loop == "paper" else "standard loop (a core over the frozen base)")
    start = "after every base block" if config.base_blocks == -1 else (
        "from the embeddings" if config.base_blocks == 0 else f"after {config.base_blocks} base blocks")
    decay = {"matrices": "gate, biases and norms undecayed", "all": "every tensor decayed",
             "lora": "only LoRA matrices decayed"}[config.decay]
    return (f"{config.core} core, {loop}; loop norm {'on' if config.loop_norm else 'off'}; {decay}; loop starts "
            f"{start}; trained hops 1-{config.max_train_hops}; variant {config.variant}, seed {config.seed}")


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
