"""The dashboard in a real browser: `lab app` on 127.0.0.1, every page opened in headless Debian
Chromium through playwright (never `playwright install`), a slider moved and the lifeline toggled,
outputs checked to change, no exception shown, full-height screenshots saved. On smoke artifacts: the
assertions are about change (the RAM / ALU sliders move the RLF output, the channels differ from zeroed),
never about what a smoke model says."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lab.readme import PAGE_OUTPUT_JS, PAGE_RUNNING_JS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.browser

PAGES = sorted((ROOT / "app" / "pages").glob("*.py"))


def _url_path(page: Path) -> str:
    return re.sub(r"^\d+_", "", page.stem)  # Streamlit: "1_Recursive_Latent_Forcing.py" -> /Recursive_Latent_Forcing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(smoke_results, lab_home):
    """The app over a LAB_HOME holding the smoke bases, every mechanism's smoke artifacts and a report."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is required for browser tests: apt-get install chromium")
    port = _free_port()
    log = open(lab_home / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lab", "app", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "LAB_HOME": str(lab_home), "LAB_PRESET": "smoke"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"lab app did not come up: {(lab_home / 'app.log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def _settle(page, timeout_s: float = 120) -> None:
    """Wait until Streamlit has finished the script run (PAGE_RUNNING_JS false: the app root's script state, no
    spinner, no running status) and the main area's text is unchanged over three checks in a row."""
    page.wait_for_selector('[data-testid="stMain"] [data-testid="stElementContainer"]', timeout=timeout_s * 1000)
    deadline = time.time() + timeout_s
    last, stable = None, 0
    while time.time() < deadline:
        time.sleep(0.7)
        busy = page.evaluate(PAGE_RUNNING_JS)
        text = _main_text(page)
        stable = stable + 1 if (text == last and not busy) else 0
        last = text
        if stable >= 3:
            return
    raise AssertionError("the page kept running")


def _main_text(page) -> str:
    return page.locator('[data-testid="stMain"]').inner_text()


def _assert_no_exception(page, name: str) -> None:
    exc = page.locator('[data-testid="stException"]')
    assert exc.count() == 0, f"{name}: {exc.first.inner_text()[:2000]}"


OUTPUT_JS = PAGE_OUTPUT_JS


def _output(page) -> str:
    return page.evaluate(OUTPUT_JS)


def _broken_images(page) -> list[str]:
    """Sources of <img> elements in the main area that did not load (each scrolled into view first: lazy loading)."""
    imgs = page.locator('[data-testid="stMain"] img')
    for i in range(imgs.count()):
        imgs.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("el => el.complete", arg=imgs.nth(i).element_handle(), timeout=20_000)
    return page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stMain"] img'))
        .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)""")


def _move(page, label: str, presses: int = 3) -> None:
    """Focus the slider labelled `label` and press an arrow key away from whichever end it sits at."""
    target = page.locator('[data-testid="stSlider"]').filter(has_text=label).locator('input[type="range"]')
    assert target.count() == 1, f"no slider labelled {label!r}"
    assert target.is_enabled(), f"the {label!r} slider is disabled"
    target.focus()
    at_max = target.evaluate("el => Number(el.value) >= Number(el.max)")
    for _ in range(presses):
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
    _settle(page)


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url)
    page.wait_for_selector('[data-testid="stSlider"]', timeout=300_000)
    _settle(page, 300)
    return page


def _shots_dir(lab_home) -> Path:
    d = Path(os.environ.get("LAB_SCREENSHOTS", lab_home / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_home_page_in_browser(app_url, browser, lab_home):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(app_url)
    _settle(page)
    _assert_no_exception(page, "Home")
    text = _main_text(page)
    assert "smoke-gpt2" in text
    assert "Smoke preset: these numbers mean nothing" in text, "a smoke report must open with its warning"
    assert not _broken_images(page), f"broken images on the home page: {_broken_images(page)}"
    page.screenshot(path=str(_shots_dir(lab_home) / "Home.png"), full_page=True)
    page.close()


def test_report_view_renders_every_figure(app_url, browser, lab_home, smoke_results):
    """The full report in its own view: every figure line of report.md is an image that loaded."""
    md = (Path(smoke_results) / "report.md").read_text()
    figures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)", md, flags=re.M)
    assert figures, "the smoke report lists no figure"
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{app_url}/?view=report&run={Path(smoke_results).name}")
    _settle(page)
    _assert_no_exception(page, "report view")
    assert "Smoke preset: these numbers mean nothing" in _main_text(page)
    assert page.locator('[data-testid="stMain"] img').count() == len(figures)
    assert not _broken_images(page), "broken images in the report view"
    page.screenshot(path=str(_shots_dir(lab_home) / "Report.png"), full_page=True)
    page.close()


def test_rlf_ram_alu_sliders_change_the_output(app_url, browser, lab_home):
    page = _open(browser, f"{app_url}/Recursive_Latent_Forcing")
    _assert_no_exception(page, "RLF")
    text = _main_text(page)
    assert "null-calibrated rule" in text, "the smoke report trained null runs: the page must use the report's rule"
    for label in ("RAM scale", "ALU scale"):
        before = _output(page)
        _move(page, label)
        _assert_no_exception(page, "RLF")
        assert _output(page) != before, f"moving {label} changed nothing the page computes"
    page.get_by_text("Lifeline", exact=True).first.click()  # off: the lifeline's scales cannot act
    _settle(page)
    for label in ("Lifeline scale", "RAM scale", "ALU scale"):
        slider = page.locator('[data-testid="stSlider"]').filter(has_text=label).locator('input[type="range"]')
        assert slider.is_disabled(), f"{label} stays enabled with the lifeline off"
    assert "The lifeline is off" in _main_text(page)
    page.close()


def test_channels_show_a_differing_continuation(app_url, browser, lab_home):
    page = _open(browser, f"{app_url}/Proprioceptive_Channels")
    _assert_no_exception(page, "channels")
    marks = page.locator('[data-testid="stMain"] mark')
    assert marks.count() > 0, "the with-channels and zeroed continuations are shown without a differing token"
    before = _output(page)
    _move(page, "valence")
    assert _output(page) != before, "moving valence changed nothing the page computes"
    page.get_by_text("affect", exact=True).first.click()  # off: valence and arousal cannot act
    _settle(page)
    valence = page.locator('[data-testid="stSlider"]').filter(has_text="valence").locator('input[type="range"]')
    assert valence.is_disabled(), "valence stays enabled with affect off"
    page.close()


@pytest.mark.parametrize("page_file", PAGES, ids=[p.stem for p in PAGES])
def test_every_page_renders_and_reacts(app_url, browser, lab_home, page_file):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{app_url}/{_url_path(page_file)}")
    page.wait_for_selector('[data-testid="stSlider"]', timeout=300_000)  # first open loads models and caches
    _settle(page, 300)
    page.screenshot(path=str(_shots_dir(lab_home) / f"{page_file.stem}-opened.png"), full_page=True)
    _assert_no_exception(page, page_file.stem)
    before = _main_text(page)
    sliders = page.locator('[data-testid="stSlider"] input[type="range"]')
    assert sliders.count() > 0, f"{page_file.stem} has no slider"
    lifeline = page.locator('[data-testid="stSlider"]').filter(has_text="Lifeline scale")
    target = lifeline.locator('input[type="range"]') if lifeline.count() else sliders.first
    target.focus()
    at_max = target.evaluate("el => Number(el.value) >= Number(el.max)")
    for _ in range(3):  # move away from whichever end the slider sits at
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
    _settle(page)
    _assert_no_exception(page, page_file.stem)
    after_slider = _main_text(page)
    assert after_slider != before, f"{page_file.stem}: moving a slider changed nothing"
    toggle = page.get_by_text("Lifeline", exact=True)
    if toggle.count():
        toggle.first.click()
        _settle(page)
        _assert_no_exception(page, page_file.stem)
        assert _main_text(page) != after_slider, f"{page_file.stem}: toggling the lifeline changed nothing"
    page.screenshot(path=str(_shots_dir(lab_home) / f"{page_file.stem}.png"), full_page=True)
    page.close()
