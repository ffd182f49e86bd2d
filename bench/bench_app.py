"""End-to-end latency of the dashboard in a real browser: from a key press on a control to the page's output
updated and the run finished (headless Debian Chromium through playwright; never `playwright install`).

    LAB_HOME=<a home with smoke artifacts: lab reproduce --preset smoke> python bench/bench_app.py [--steps 12]

Per page and control: n key presses (alternating direction, so the value stays in range), p50 / p95 / max in ms.
"Output" is what the page computes, not the widget's own value label: the text of its markdown and captions outside
widgets, and the data of its plotly charts. Each measurement is the first time that output differs from before the
press while no script run is in progress. A press that changes nothing within the timeout is counted as such.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

from lab.readme import PAGE_OUTPUT_JS, PAGE_RUNNING_JS

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

OUTPUT_JS = PAGE_OUTPUT_JS
RUNNING_JS = PAGE_RUNNING_JS

# (page path, slider label, what kind of control it is); page 3: its first slider
CONTROLS = [
    ("Recursive_Latent_Forcing", "RAM scale", "non-generative"),
    ("Recursive_Latent_Forcing", "Lifeline scale", "non-generative"),
    ("Proprioceptive_Channels", "valence", "generation (12 tokens, channels on and zeroed, + per-token scores)"),
    ("Inner_Link", None, "first slider"),
    ("Thinking_Combiner", "M-scale", "non-generative"),
    ("Thinking_Combiner", "Held-out documents", "recomputes the held-out features (a sweep; cached per value)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "lab", "app", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not come up within 120 s")


def settle(page, timeout_s: float = 300) -> None:
    """Until no run is in progress and the output is the same over 1.5 s."""
    page.wait_for_selector('[data-testid="stMain"] [data-testid="stElementContainer"]', timeout=timeout_s * 1000)
    deadline, last, stable = time.time() + timeout_s, None, 0
    while time.time() < deadline:
        time.sleep(0.5)
        out = page.evaluate(OUTPUT_JS)
        stable = stable + 1 if (out == last and not page.evaluate(RUNNING_JS)) else 0
        last = out
        if stable >= 3:
            return
    raise RuntimeError("the page kept running")


def measure(page, slider, steps: int, timeout_ms: int = 30_000) -> tuple[list[float], int]:
    times, unchanged = [], 0
    thumb = slider.locator('input[type="range"]')
    thumb.focus()
    at_max = thumb.evaluate("el => Number(el.value) >= Number(el.max)")
    for i in range(steps):
        before = page.evaluate(OUTPUT_JS)
        key = "ArrowLeft" if (i % 2 == 0) == at_max else "ArrowRight"
        t0 = time.perf_counter()
        page.keyboard.press(key)
        try:
            page.wait_for_function(f"([b]) => {{ const o = ({OUTPUT_JS})(); return o !== b && !({RUNNING_JS})(); }}",
                                   arg=[before], polling="raf", timeout=timeout_ms)
            times.append((time.perf_counter() - t0) * 1000)
        except Exception:
            unchanged += 1
        settle(page, 60)  # let any trailing rerun finish before the next press
    return times, unchanged


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="key presses per control")
    ap.add_argument("--pages", default="", help="comma-separated page paths to bench (default: all)")
    args = ap.parse_args(argv if argv is not None else [])
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 -- a test/bench extra

    port = free_port()
    server = start_app(port)
    results = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            for path, label, kind in CONTROLS:
                if args.pages and path not in args.pages.split(","):
                    continue
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/{path}")
                page.wait_for_selector('[data-testid="stSlider"]', timeout=300_000)
                settle(page)
                sliders = page.locator('[data-testid="stSlider"]')
                slider = sliders.filter(has_text=label).first if label else sliders.first
                name = label or slider.locator('[data-testid="stWidgetLabel"]').inner_text().strip()
                times, unchanged = measure(page, slider, args.steps)
                a = np.array(times) if times else np.array([np.nan])
                row = {"page": path, "control": name, "kind": kind, "n": len(times), "unchanged": unchanged,
                       "p50_ms": round(float(np.median(a)), 1), "p95_ms": round(float(np.quantile(a, 0.95)), 1),
                       "max_ms": round(float(a.max()), 1)}
                results.append(row)
                print(f"{path:26} {name[:24]:24} n={row['n']:2} (no change: {unchanged})  p50 {row['p50_ms']:7.1f} ms  "
                      f"p95 {row['p95_ms']:7.1f} ms  max {row['max_ms']:7.1f} ms   [{kind}]", flush=True)
                page.close()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(results))
    return {f"{r['page']} / {r['control']} p50, p95 ms (n = {r['n']}, no change {r['unchanged']})":
            f"{r['p50_ms']:.0f}, {r['p95_ms']:.0f}" for r in results}


if __name__ == "__main__":
    main(sys.argv[1:])
