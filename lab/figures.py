"""One plotly style for the lab, and export to PNG / SVG / PDF (kaleido, via Chromium) and HTML."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import kaleido
import plotly.graph_objects as go
import plotly.io as pio
from choreographer.browsers.chromium import Chromium  # what kaleido itself uses to find the browser

from lab import LabError

FORMATS = ("png", "svg", "pdf", "html")
# one colour per series: 14, so a figure with every arm and control (rlf_final_by_hops draws 10) never repeats one
LAB_COLORS = ["#3b5ba5", "#e87a5d", "#f3b941", "#2f9c8f", "#8d5fa8", "#7a7a7a", "#c2417b", "#6aa84f",
              "#17becf", "#8c564b", "#1a1a6e", "#bcbd22", "#ff7f0e", "#b3b3ff"]
DASHES = ("solid", "dash", "dot", "dashdot")  # past 14 series: the colours again, with another dash
PUBLISHED_COLOR = "#000000"  # published values: black, dotted, one legend entry each

pio.templates["lab"] = go.layout.Template(
    layout=dict(
        font=dict(family="Helvetica, Arial, sans-serif", size=13),
        colorway=LAB_COLORS,
        plot_bgcolor="white",
        paper_bgcolor="white",
        margin=dict(l=60, r=20, t=50, b=50),
        xaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#444", ticks="outside"),
        yaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#444", ticks="outside"),
        legend=dict(bgcolor="rgba(255,255,255,0.8)"),
    )
)
# merged once, under one name: plotly merges a "plotly_white+lab" spec anew (deep copies of both templates)
# every time a figure is created or styled, ~25 ms each under plotly 7, which was most of the channels
# page's live recompute (bench/bench_channels.py)
TEMPLATE = "lab_white"
pio.templates[TEMPLATE] = pio.templates.merge_templates(pio.templates["plotly_white"], pio.templates["lab"])
pio.templates.default = TEMPLATE


@functools.cache
def template_json() -> dict:
    """The lab template as plain JSON, for a figure built with `_validate=False` (the live ones): there a
    template *name* is kept as a string, which plotly.js does not resolve, so the figure lost the lab's look."""
    return pio.templates[TEMPLATE].to_plotly_json()


def style(fig: go.Figure, title: str | None = None) -> go.Figure:
    """The lab's template and a left-aligned title. The template is plotly's default once this module is
    imported, so it is assigned only to a figure built with another one (an assignment validates and copies
    the whole template: ~20 ms)."""
    if tuple(fig.layout.template.layout.colorway or ()) != tuple(LAB_COLORS):
        fig.update_layout(template=TEMPLATE)
    if title:
        fig.update_layout(title=dict(text=title, x=0.02))
    return fig


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_sessions = 0            # open export_session() contexts; the outermost owns kaleido's browser
_server_started = False  # started at the first image a session writes: HTML alone needs no browser


def require_browser() -> None:
    """Raise a LabError unless kaleido can find a Chromium-based browser: without one, kaleido's image export
    waits for a browser that never starts instead of failing."""
    if Chromium.find_browser(skip_local=False) is None:
        raise LabError("figure export to PNG / SVG / PDF needs a Chromium-based browser and none was found: "
                       "install one (`apt-get install chromium`, or `python -c 'import kaleido; "
                       "kaleido.get_chrome_sync()'`) or point BROWSER_PATH at it; HTML export needs none")


def _image_ready() -> None:
    """Before kaleido renders an image: a browser must exist, and inside a session its one server must run."""
    global _server_started
    if _sessions and _server_started:
        return
    require_browser()
    if _sessions:
        kaleido.start_sync_server(silence_warnings=True)
        _server_started = True


@contextlib.contextmanager
def export_session():
    """One Chromium for every image exported inside: kaleido otherwise starts a browser per image (~2 s each on
    2 cores, minutes for a report's figures). Nested sessions share the outermost one's browser, which starts
    at the first image (a session that writes only HTML starts none)."""
    global _sessions, _server_started
    _sessions += 1
    try:
        with warnings.catch_warnings():
            # plotly passes its (default, empty) kaleido options per call; the running server has its own
            warnings.filterwarnings("ignore", message="The kopts argument is ignored if using a server")
            yield
    finally:
        _sessions -= 1
        if _sessions == 0 and _server_started:
            _server_started = False
            kaleido.stop_sync_server(silence_warnings=True)


def export(fig: go.Figure, path: str | Path, formats: Iterable[str] | None = None,
           width: int = 900, height: int = 550, scale: float = 2.0) -> list[Path]:
    """Write `fig` next to `path` in each format (default: by the suffix of `path`, or all four).

    export(fig, "out/trajectory")            -> trajectory.png/.svg/.pdf/.html
    export(fig, "out/trajectory.pdf")        -> trajectory.pdf
    HTML is self-contained (plotly.js inlined) so it opens offline.
    """
    path = Path(path)
    if formats is None:
        formats = [path.suffix[1:]] if path.suffix else list(FORMATS)
    formats = [f.lower() for f in formats]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise LabError(f"unknown figure format(s) {bad}; expected some of {FORMATS}")
    stem = path.with_suffix("") if path.suffix else path
    with export_session():
        if set(formats) - {"html"}:
            _image_ready()   # before anything is written: no half an export when there is no browser
        return _export(fig, stem, formats, width, height, scale)


def _export(fig, stem: Path, formats, width, height, scale) -> list[Path]:
    written = []
    for f in formats:
        out = stem.with_suffix(f".{f}")
        if f == "html":
            _atomic(out, lambda p: fig.write_html(p, include_plotlyjs=True, full_html=True))
        else:
            _atomic(out, lambda p, f=f: fig.write_image(p, format=f, width=width, height=height,
                                                         scale=scale if f == "png" else 1))
        written.append(out)
    return written


def to_bytes(fig: go.Figure, fmt: str, width: int = 900, height: int = 550) -> bytes:
    """The figure as bytes (for download buttons in the app and notebooks)."""
    if fmt not in FORMATS:
        raise LabError(f"unknown figure format {fmt!r}; expected one of {FORMATS}")
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode()
    _image_ready()
    return fig.to_image(format=fmt, width=width, height=height, scale=2 if fmt == "png" else 1)


def line(x, ys: dict, title: str, xlabel: str, ylabel: str, error: dict | None = None) -> go.Figure:
    """Several named series against x, with optional (low, high) error bands per series."""
    fig = go.Figure()
    for i, (name, y) in enumerate(ys.items()):
        color, dash = series_style(i)
        if error and name in error:
            lo, hi = error[name]
            fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=list(hi) + list(lo)[::-1], fill="toself",
                                     fillcolor=color, opacity=0.15, line=dict(width=0), showlegend=False,
                                     hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=list(x), y=list(y), name=name, mode="lines+markers",
                                 line=dict(color=color, dash=dash)))
    fig.update_layout(xaxis_title=xlabel, yaxis_title=ylabel)
    return style(fig, title)


def series_style(i: int) -> tuple[str, str]:
    """(colour, dash) of the i-th series of a figure: distinct for every series."""
    return LAB_COLORS[i % len(LAB_COLORS)], DASHES[(i // len(LAB_COLORS)) % len(DASHES)]


def add_published(fig: go.Figure, label: str, y: float | None = None, x: float | None = None,
                  xs=None, ys=None, source: str = "") -> go.Figure:
    """Draw a published value on a figure's own axes, as its own legend entry ("published: label"):
    a horizontal line at y, a vertical line at x, or points (xs, ys). Only beside a measure of the same
    quantity (the lab's rule for published figures)."""
    name = f"published: {label}" + (f" ({source})" if source else "")
    style_ = dict(color=PUBLISHED_COLOR, dash="dot", width=1.5)
    if xs is not None and ys is not None:
        fig.add_trace(go.Scatter(x=list(xs), y=list(ys), name=name, mode="markers+lines", line=style_,
                                 marker=dict(symbol="star", size=11, color=PUBLISHED_COLOR)))
    elif y is not None:
        fig.add_hline(y=y, line=style_)
        fig.add_trace(go.Scatter(x=[None], y=[None], name=name, mode="lines", line=style_))
    elif x is not None:
        fig.add_vline(x=x, line=style_)
        fig.add_trace(go.Scatter(x=[None], y=[None], name=name, mode="lines", line=style_))
    else:
        raise LabError(f"add_published needs y, x, or xs and ys (for {label!r})")
    return fig


def bars_with_ci(names, values, lows, highs, title: str, ylabel: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(names), y=list(values),
                           error_y=dict(type="data", symmetric=False,
                                        array=[h - v for h, v in zip(highs, values)],
                                        arrayminus=[v - lo for lo, v in zip(lows, values)])))
    fig.update_layout(yaxis_title=ylabel)
    return style(fig, title)


def notebook_setup() -> str:
    """Plotly's renderer for a notebook: interactive in JupyterLab, plus a static PNG beside it when
    $LAB_NOTEBOOK_IMAGES=1 (`make notebooks`), so a notebook stored with outputs shows its figures on a code host."""
    renderer = "plotly_mimetype+png" if os.environ.get("LAB_NOTEBOOK_IMAGES") == "1" else "plotly_mimetype"
    pio.renderers.default = renderer
    return renderer
