"""The app in a real browser: Debian's headless Chromium driven by Playwright.

Never downloads a browser. Without /usr/bin/chromium the test fails (CI must not pass silently
without it); set VDTOME_SKIP_BROWSER=1 to skip it knowingly on a machine without Chromium.
``VDTOME_SCREENSHOT`` names where to save the page (the README's screenshot is made this way).
"""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("VDTOME_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 120_000

BOTH_PLAYABLE = """() => ['#baseline-video', '#accelerated-video', '#side-by-side'].every(id => {
    const v = document.querySelector(id + ' video');
    return v !== null && v.readyState >= 2 && v.duration > 0;
})"""

METRICS = """() => Object.fromEntries([...document.querySelectorAll('#metrics-table [role=row]')]
    .map(row => [...row.querySelectorAll('[role=gridcell]')].map(cell => cell.innerText.trim()))
    .filter(cells => cells.length === 5).map(cells => [cells[0], cells.slice(1)]))"""

HISTORY_ROWS = """() => [...document.querySelectorAll('#history-table [role=row]')]
    .filter(row => row.querySelectorAll('[role=gridcell]').length > 0).length"""


@pytest.fixture(scope="module")
def page(app_server):
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        if os.environ.get("VDTOME_SKIP_BROWSER") == "1":
            pytest.skip("VDTOME_SKIP_BROWSER=1 and no Chromium")
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_server)
            yield page
        finally:
            browser.close()


def set_ratio(page, value: str) -> None:
    box = page.locator("#ratio input[type=number]")
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_compare_in_the_browser_then_bad_input_then_again(page, tmp_path):
    # The ratio slider is capped by the stride: 1 - 1/4 for the default (1, 2, 2) cells.
    page.wait_for_function("() => document.querySelector('#ratio input[type=range]')?.max === '0.75'")
    page.locator("#prompt textarea").fill("A heron lifts off a misty lake at sunrise, wings beating slowly.")
    set_ratio(page, "0.3")
    page.locator("#run").click()

    page.wait_for_function(BOTH_PLAYABLE, timeout=TIMEOUT_MS)
    page.wait_for_function(f"() => ({METRICS})()['merge ratio (requested / effective)'] !== undefined")
    metrics = page.evaluate(METRICS)
    requested, effective = metrics["merge ratio (requested / effective)"][1].split(" / ")
    assert requested == "0.30" and 0.25 <= float(effective) <= 0.30  # r = int(0.3 * N) tokens
    end_to_end = metrics["end-to-end (projected: denoising + untouched phases measured here)"]
    assert end_to_end[0].endswith(" s") and "interval" in end_to_end[2] and end_to_end[3] == "lower"
    assert metrics["PSNR vs baseline"][1].endswith("dB")
    assert page.evaluate(HISTORY_ROWS) == 1
    assert "float32" in page.locator("#environment").inner_text()

    # A frame count the model cannot take: a message naming the rule, nothing else changes.
    frames = page.get_by_label("Frames")
    frames.fill("10")
    page.locator("#run").click()
    error = page.get_by_text("frames must be 4k+1 (got 10; nearest valid 9)")
    error.first.wait_for(state="visible")
    assert page.evaluate(HISTORY_ROWS) == 1
    for close in page.locator(".toast-close").all():
        close.click()

    # Corrected, the next run succeeds in the same page.
    frames.fill("13")
    set_ratio(page, "0.5")
    page.locator("#run").click()
    page.wait_for_function(f"() => ({HISTORY_ROWS})() === 2", timeout=TIMEOUT_MS)
    page.wait_for_function(BOTH_PLAYABLE, timeout=TIMEOUT_MS)
    metrics = page.evaluate(METRICS)
    assert metrics["merge ratio (requested / effective)"][1] == "0.50 / 0.50"
    durations = page.evaluate("() => ['#baseline-video', '#accelerated-video'].map(id => document.querySelector(id + ' video').duration)")
    assert durations[0] == durations[1] > 1.0  # 13 frames at 8 fps, both videos

    screenshot = Path(os.environ.get("VDTOME_SCREENSHOT", tmp_path / "app.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_a_bad_value_is_shown_at_its_field_and_cancel_stops_a_run(page):
    runs = page.evaluate(HISTORY_ROWS)
    seed = page.get_by_label("Seed")
    seed.fill("1.5")  # refused, not rounded to 2
    page.locator("#run").click()
    page.locator("#seed").get_by_text("seed must be a whole number, got 1.5").wait_for(state="visible")
    seed.fill("0")

    page.get_by_label("Frames").fill("9")
    steps = page.get_by_label("Steps", exact=True)
    steps.fill("64")  # about 10 s of denoising on 2 cores, the most the default work limit allows
    page.locator("#run").click()
    long_run = "[...document.querySelectorAll('.progress-level-inner')].some(bar => / step \\d+\\/64/.test(bar.textContent))"
    page.wait_for_function(f"() => {long_run}")  # the 64-step run's timed calls are under way
    page.locator("#cancel").click()
    page.locator("#notes").get_by_text("Cancelled.").wait_for(state="visible")
    page.wait_for_function(f"() => !({long_run})", timeout=10_000)  # it stopped at its next step
    steps.fill("4")
    page.locator("#run").click()
    page.wait_for_function(f"() => ({HISTORY_ROWS})() === {runs + 1}", timeout=30_000)
