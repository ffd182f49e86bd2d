"""A `Report`: what every `evaluate()` returns: measures (n, control, CI), figures, and the published
figure each headline number answers. Saved as report.json + report.md + figures in every format."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from lab import LabError
from lab.figures import export, export_session
from lab.stats import Measure
from lab.store import atomic_write_text, environment, environment_text, write_json


@dataclass
class Published:
    """A number from the published work that a lab measure answers."""
    claim: str          # e.g. "in-distribution accuracy, Mamba2-130M"
    value: str          # as published, e.g. "99.9%"
    source: str = ""    # which write-up


@dataclass
class Report:
    name: str
    measures: list[Measure] = field(default_factory=list)
    figures: dict[str, go.Figure] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    published: dict[str, Published] = field(default_factory=dict)  # measure name -> published figure
    provenance: dict = field(default_factory=dict)                 # seed, config hash, base, artifact
    notes: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=environment)         # package versions that produced it
    captions: dict[str, str] = field(default_factory=dict)         # figure name -> one-line caption

    def caption(self, key: str) -> str:
        """A figure's one-line caption: its own, else the figure's title (every figure in a report has one)."""
        text = self.captions.get(key)
        fig = self.figures.get(key)
        if not text and fig is not None and getattr(fig.layout.title, "text", None):
            text = fig.layout.title.text
        return " ".join(str(text or key).replace("<br>", " ").split())

    def add(self, m: Measure, published: Published | None = None) -> Measure:
        self.measures.append(m)
        if published is not None:
            self.published[m.name] = published
        return m

    def measure(self, name: str) -> Measure:
        for m in self.measures:
            if m.name == name:
                return m
        names = "\n  ".join(m.name for m in self.measures) or "(none)"
        raise LabError(f"report {self.name!r} has no measure named {name!r}; it has:\n  {names}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "provenance": self.provenance,
            "environment": self.environment,
            "measures": [{**m.to_dict(), "published": vars(self.published[m.name]) if m.name in self.published else None}
                         for m in self.measures],
            "tables": self.tables,
            "notes": self.notes,
            "figures": sorted(self.figures),
            "captions": {k: self.caption(k) for k in sorted(self.figures)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """A report as `to_dict` saved it: its numbers, tables and notes (figures by name only, for links)."""
        fields_ = set(Measure.__dataclass_fields__)
        measures = [Measure(**{k: v for k, v in m.items() if k in fields_}) for m in d.get("measures", [])]
        published = {m["name"]: Published(**m["published"]) for m in d.get("measures", []) if m.get("published")}
        return cls(name=d["name"], measures=measures, figures=dict.fromkeys(d.get("figures", [])),
                   tables=d.get("tables", {}), published=published, provenance=d.get("provenance", {}),
                   notes=d.get("notes", []), environment=d.get("environment", {}),
                   captions=d.get("captions", {}))

    def findings(self) -> list[str]:
        """What the run found, in words: one sentence per measure that answers a published figure (value, CI, n,
        its control and test, and the published number beside it). Notebooks end with these."""
        out = []
        for m in self.measures:
            pub = self.published.get(m.name)
            if pub is None:
                continue
            vs = f"; against {m.control}" + (f" ({m.control_value:.3g})" if m.control_value is not None else "") \
                if m.control else ""
            test = f", p = {p_text(m.p_value)} ({m.test})" if m.p_value is not None else ""
            out.append(f"{m.name}: {m.value_text()} over n = {m.n}{vs}{test}. Published: {pub.value} ({pub.claim}).")
        return out

    def to_markdown(self, figure_dir: str | None = None, with_environment: bool = True) -> str:
        lines = [f"## {self.name}", ""]
        if self.provenance:
            lines += ["Provenance: " + ", ".join(f"{k} `{v}`" for k, v in self.provenance.items()), ""]
        if with_environment:
            lines += [f"Environment: {environment_text(self.environment)}", ""]
        lines += ["| measure | value | n | 95% CI | control | p (test) | published |", "|---|---|---|---|---|---|---|"]
        for m in self.measures:
            ci = f"[{_num(m.ci_low, '.3g')}, {_num(m.ci_high, '.3g')}]" if m.ci_low is not None else "-"
            ctrl = (f"{m.control}: {_num(m.control_value, '.3g')}" if m.control and m.control_value is not None
                    else (m.control or "-"))
            p = "-" if m.p_value is None else f"{p_text(m.p_value)} ({m.test})"
            pub = self.published.get(m.name)
            value = _num(m.value, ".4g") if _finite(m.value) else f"n/a ({not_a_number_reason(m)})"
            lines.append(f"| {m.name} | {value} | {m.n} | {ci} | {ctrl} | {p} | "
                         f"{f'{pub.value} ({pub.claim})' if pub else '-'} |")
        for tname, rows in self.tables.items():
            if not rows:
                continue
            cols = list(rows[0])
            lines += ["", f"**{tname}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        if figure_dir is not None:
            for k in sorted(self.figures):
                lines += ["", f"![{k}]({figure_dir}/{k}.png)", "", f"*{k}: {self.caption(k)}*"]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path, formats=("png", "svg", "pdf", "html")) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with export_session():
            for key, fig in self.figures.items():
                export(fig, out / "figures" / key, formats=formats)
        write_json(out / "report.json", self.to_dict())
        atomic_write_text(out / "report.md", self.to_markdown("figures"))
        return out


def p_text(p: float) -> str:
    """A p-value for a table; an exact test's p below the float range prints as such, not as 0."""
    if not _finite(p):
        return "n/a (no test statistic)"
    return "< 1e-300" if p == 0 else f"{p:.3g}"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v, fmt: str) -> str:
    """A number for a table; a NaN or inf prints as "n/a", never as "nan" (the value's cell says why)."""
    return format(v, fmt) if _finite(v) else "n/a"


def not_a_number_reason(m: Measure) -> str:
    """Why a measure's value is not a finite number: its own `extra["why"]`, else what the lab can tell."""
    if m.extra.get("why"):
        return str(m.extra["why"])
    if not m.n:
        return "n = 0: nothing was measured"
    return "not a finite number: the model's outputs or the scores held NaN/inf (a diverged training?)"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "n/a (not a finite number)"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "-" if v is None else str(v)
