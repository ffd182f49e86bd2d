"""What the README shows, regenerated from a report: `lab docs --run quick-seed0`.

- the results table (each mechanism's headline measures beside the published figure they answer), written
  between the README's `<!-- results:start -->` and `<!-- results:end -->` markers;
- docs/img/report_figure.png: one figure of that report;
- docs/img/dashboard.png: a screenshot of the dashboard's home page on the same LAB_HOME (headless Chromium).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from lab import LabError, results_dir
from lab.report import p_text
from lab.stats import Measure
from lab.store import atomic_write_text, read_json

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
TITLES = {"rlf": "Recursive Latent Forcing", "channels": "Proprioceptive channels", "innerlink": "Inner link",
          "combiner": "Thinking combiner"}
REPORT_FIGURE = ("rlf", "rlf_final_by_hops")  # the figure the README shows
CHROMIUM = "/usr/bin/chromium"
# what a dashboard page computed: markdown and captions outside widgets (not a slider's own value label) and the
# data of every plotly chart; the browser test and bench/bench_app.py compare it before and after an interaction
PAGE_OUTPUT_JS = """() => {
  const main = document.querySelector('[data-testid="stMain"]');
  if (!main) return '';
  const parts = [];
  main.querySelectorAll('[data-testid="stMarkdownContainer"], [data-testid="stCaptionContainer"]').forEach(e => {
    if (!e.closest('[data-testid="stSlider"], [data-testid="stWidgetLabel"], label, [data-testid="stExpander"]'))
      parts.push(e.innerText);
  });
  main.querySelectorAll('.js-plotly-plot').forEach(p => {
    try { parts.push(JSON.stringify((p.data || []).map(d => [d.x, d.y, d.name]))); } catch (e) {}
  });
  return parts.join('\\n');
}"""
# whether a dashboard page is still computing: the app root's script state (Streamlit's `data-test-script-state`),
# a spinner, or the status widget's "Running" (which appears only after a delay, so it alone lets a slow machine
# pass for settled mid-run); the browser test and bench/bench_app.py wait for it to turn false
PAGE_RUNNING_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const state = app ? app.getAttribute('data-test-script-state') : 'initial';
  const s = document.querySelector('[data-testid="stStatusWidget"]');
  return ['initial', 'running', 'rerunRequested', 'stopRequested'].includes(state)
    || !!(s && /Running/.test(s.innerText)) || document.querySelectorAll('[data-testid="stSpinner"]').length > 0;
}"""
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


def headline_rows(report: dict) -> list[dict]:
    """One row per measure that carries a published figure, in each section's order."""
    rows = []
    for mech, section in report.get("sections", {}).items():
        for m in section.get("measures", []):
            pub = m.get("published")
            if not pub:
                continue
            measure = Measure(**{k: v for k, v in m.items() if k in Measure.__dataclass_fields__})
            test = f"{p_text(measure.p_value)} ({measure.test})" if measure.p_value is not None else "-"
            rows.append({"mechanism": TITLES.get(mech, mech), "measure": measure.name,
                         "lab [95% CI]": measure.value_text(), "n": measure.n,
                         "control": measure.control or "-", "p (test)": test,
                         "published": f"{pub['value']} ({pub['claim']})"})
    return rows


def results_table(report: dict) -> str:
    rows = headline_rows(report)
    if not rows:
        raise LabError("the report has no measure with a published figure beside it; is it a `lab reproduce` report?")
    cols = list(rows[0])
    lines = [f"Preset `{report.get('preset')}`, seed {report.get('seed')}, commit `{report.get('git_commit')}`, "
             f"{report.get('seconds', 0) / 60:.1f} min on {report.get('machine')} "
             f"(from `results/{report.get('run')}/report.json`; regenerate with `lab docs --run {report.get('run')}`).",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(readme: Path, report: dict) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise LabError(f"{readme} has no {START} ... {END} markers for the results table")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{START}\n{results_table(report)}\n{END}{tail}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot_app(out_png: Path, page: str = "", wait_text: str = "Latent Lab", timeout_s: float = 120) -> None:
    """Start the dashboard on a free local port, load `page` in headless Chromium and save a screenshot."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 -- a test/docs extra, not needed to run the lab

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lab", "app", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            tab = browser.new_page(viewport={"width": 1400, "height": 900})
            deadline = time.time() + timeout_s
            while True:
                try:
                    tab.goto(f"http://127.0.0.1:{port}/{page}", timeout=10_000)
                    tab.get_by_text(wait_text).first.wait_for(timeout=60_000)
                    break
                except Exception:
                    if time.time() > deadline:
                        raise LabError(f"the dashboard did not show {wait_text!r} within {timeout_s:.0f} s") from None
                    time.sleep(2)
            tab.wait_for_timeout(3000)  # plots finish rendering
            out_png.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(out_png))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def write_docs(run: str, readme: Path = REPO / "README.md", screenshot: bool = True) -> list[Path]:
    """Regenerate the README's results table and its two pictures from results/<run>. Returns what it wrote."""
    run_dir = results_dir() / run
    report = read_json(run_dir / "report.json")
    write_results(readme, report)
    written = [readme]
    mech, key = REPORT_FIGURE
    fig = run_dir / mech / "figures" / f"{key}.png"
    if fig.exists():
        dest = REPO / "docs" / "img" / "report_figure.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fig, dest)
        written.append(dest)
    if screenshot:
        dest = REPO / "docs" / "img" / "dashboard.png"
        screenshot_app(dest)
        written.append(dest)
    return written
