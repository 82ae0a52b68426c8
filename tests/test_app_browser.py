"""The app in a real browser: Debian's headless Chromium driven by Playwright.

Never downloads a browser. Without /usr/bin/chromium the test fails (CI must not pass silently
without it); set VDTOME_SKIP_BROWSER=1 to skip it knowingly on a machine without Chromium.
``VDTOME_SCREENSHOTS`` names the folder for the page at desktop and phone widths (the README's
screenshots are made this way: ``make screenshot``).
"""

import functools
import os
import shutil
import time
from pathlib import Path

import pytest

from vdtome.core.presets import get_preset, load_prompts

pytestmark = pytest.mark.browser

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
# What a run shows while it works: Gradio's progress bars ("round 2/7 · baseline · step 3/20").
PROGRESS_TEXT = "() => [...document.querySelectorAll('.progress-level-inner')].map(bar => bar.textContent).join(' | ')"


def wait_for_work(page, done: str, stall_ms: int = TIMEOUT_MS) -> None:
    """Wait until ``done`` holds for as long as the work takes while it visibly advances (a busy
    machine only makes it slower); fail when the progress text stood still for ``stall_ms``: a run
    that is stuck, not one that is slow."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    last, since = None, time.monotonic()
    while True:
        try:
            page.wait_for_function(done, timeout=5_000)
            return
        except PlaywrightTimeout:
            shown = page.evaluate(PROGRESS_TEXT)
            if shown != last:
                last, since = shown, time.monotonic()
            elif time.monotonic() - since > stall_ms / 1000:
                raise AssertionError(f"no progress for {stall_ms / 1000:.0f} s waiting for {done} "
                                     f"(the page last showed {shown!r})") from None

BOTH_PLAYABLE = """() => ['#side-by-side'].every(id => {
    const v = document.querySelector(id + ' video');
    return v !== null && v.readyState >= 2 && v.duration > 0;
})"""

METRICS = """() => Object.fromEntries([...document.querySelectorAll('#metrics tbody tr')]
    .map(row => [...row.querySelectorAll('th, td')].map(cell => cell.innerText.trim()))
    .map(cells => [cells[0], cells.slice(1)]))"""

HISTORY_ROWS = """() => [...document.querySelectorAll('#history-table [role=row]')]
    .filter(row => row.querySelectorAll('[role=gridcell]').length > 0).length"""


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        if os.environ.get("VDTOME_SKIP_BROWSER") == "1":
            pytest.skip("VDTOME_SKIP_BROWSER=1 and no Chromium")
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


PAUSE_VIDEOS = "() => document.querySelectorAll('video').forEach(video => video.pause())"


@pytest.fixture(scope="module")
def shared_page(browser, app_server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_server)
    yield page
    page.close()


@pytest.fixture
def page(shared_page):
    """One page for the tests that go on from each other's state. A result's side-by-side video
    autoplays and loops (a quarter of one of two cores decoding it): paused between tests, it does
    not slow the tests after it while the page waits open."""
    yield shared_page
    shared_page.evaluate(PAUSE_VIDEOS)


def open_group(page, element_id: str) -> None:
    """Unfold a folded group (its fields are not in the page until it opens)."""
    toggle = page.locator(f"#{element_id} > button.label-wrap")
    if "open" not in (toggle.get_attribute("class") or ""):
        toggle.click()
        page.locator(f"#{element_id} > button.label-wrap.open").wait_for()


def set_ratio(page, value: str) -> None:
    open_group(page, "acceleration")
    box = page.locator("#ratio input[type=number]")
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_compare_in_the_browser_then_bad_input_then_again(page, tmp_path):
    page.locator("#prompt textarea").fill("A heron lifts off a misty lake at sunrise, wings beating slowly.")
    open_group(page, "acceleration")
    # The slider ends at the default stride's cap (1 - 1/4) and says why; the API refuses more (test_app_api).
    assert page.locator("#ratio input[type=number]").get_attribute("max") == "0.75"
    page.locator("#ratio").get_by_text("at most 0.75 for stride 1x2x2").wait_for(state="visible")
    set_ratio(page, "0.3")
    page.locator("#run").click()

    wait_for_work(page, BOTH_PLAYABLE)
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
    frames = page.get_by_role("spinbutton", name="Frames")
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
    wait_for_work(page, f"() => ({HISTORY_ROWS})() === 2")
    wait_for_work(page, BOTH_PLAYABLE)
    metrics = page.evaluate(METRICS)
    assert metrics["merge ratio (requested / effective)"][1] == "0.50 / 0.50"
    page.get_by_role("tab", name="Each video").click()
    page.wait_for_function(BOTH_PLAYABLE.replace("['#side-by-side']", "['#baseline-video', '#accelerated-video']"))
    durations = page.evaluate("() => ['#baseline-video', '#accelerated-video'].map(id => document.querySelector(id + ' video').duration)")
    assert durations[0] == durations[1] > 1.0  # 13 frames at 8 fps, both videos
    page.get_by_role("tab", name="Frame by frame").click()
    # Two sizes in the history: the chart holds the latest run's model and size only, the other one a pick away.
    page.wait_for_function("(group) => document.querySelector('#chart-group input')?.value === group",
                           arg="tiny-wan · 13x64x64 (1 run)")
    last_row = page.evaluate("() => [...document.querySelectorAll('#history-table [role=row]')].at(-1).innerText")
    assert "13x64x64" in last_row



IN_VIEW = """(selector) => { const r = document.querySelector(selector)?.getBoundingClientRect();
    return !!r && r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight; }"""


@pytest.mark.parametrize("width, height", [(1400, 900), (390, 844)])
def test_a_refusal_is_shown_where_the_visitor_looks_and_leads_to_its_field(browser, app_server, width, height):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    # A shared link that switches on two diffusers caches: a stack the rules refuse, its groups folded.
    page.goto(app_server + "?use_first_block_cache=true&use_mag_cache=true&height=70")
    page.wait_for_function("(name) => document.querySelector('#acceleration > .label-wrap')?.innerText.includes(name)",
                           arg="MagCache")
    open_group(page, "acceleration")  # its title lists what is on; unfolded, each method's group says so too
    page.wait_for_function("() => document.querySelector('#method-mag_cache .label-wrap')?.innerText.includes('on')")
    titles = page.evaluate("() => [...document.querySelectorAll('[id^=method-] > button.label-wrap')].map(b => b.innerText)")
    assert any(t.startswith("token merging (ToMe) · on · ratio 0.5 stride 1x2x2") for t in titles), titles
    assert any(t.startswith("MagCache · on · ") for t in titles) and any(t.startswith("SeaCache · off") for t in titles)
    page.locator("#run").click()
    refusal = page.locator("#refusal")
    refusal.wait_for(state="visible")
    assert "cannot stack: diffusers keeps one cache per model" in refusal.inner_text()
    page.wait_for_function(IN_VIEW, arg="#refusal", timeout=10_000)  # at the Run button, without scrolling
    assert page.locator("#mag_cache_threshold").count() == 0  # its group is folded: the field is not in the page
    page.locator("#refusal a").click()  # opens the group, then scrolls to the switch
    page.wait_for_function(IN_VIEW, arg="#use_mag_cache", timeout=10_000)
    page.locator("#use_mag_cache .validation-error button[aria-label=Clear]").click()  # Gradio's message over the field
    page.locator("#use_mag_cache input").uncheck()
    page.wait_for_function("() => document.querySelector('#method-mag_cache .label-wrap').innerText.startsWith('MagCache · off')")
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#refusal')?.innerText.includes('height must be a multiple of 16')")
    page.wait_for_function(IN_VIEW, arg="#refusal", timeout=10_000)
    page.locator("#refusal a").click()
    page.wait_for_function(IN_VIEW, arg="#height", timeout=10_000)  # the link leads to the field
    # The merge ratio's slider follows the stride's cap.
    stride = page.locator("#stride_t input[type=number]")
    stride.fill("2")
    stride.press("Enter")
    page.wait_for_function("() => document.querySelector('#ratio input[type=number]').max === '0.85'")
    page.close()


def test_a_past_run_restores_its_settings_and_comes_into_view(browser, app_server):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_server)
    set_ratio(page, "0.4")
    page.locator("#run").click()
    wait_for_work(page, f"() => ({HISTORY_ROWS})() >= 1")
    set_ratio(page, "0.2")
    page.locator("#run-picker").scroll_into_view_if_needed()
    page.locator("#run-picker input").click()
    page.get_by_role("option").last.click()
    page.wait_for_function("() => document.querySelector('#ratio input[type=number]').value === '0.4'")
    assert "Run reproduces it" in page.locator("#run-notice").inner_text()
    page.wait_for_function(IN_VIEW, arg="#headline .cards", timeout=10_000)
    page.close()


def test_a_bad_value_is_shown_at_its_field_and_cancel_stops_a_run(page):
    runs = page.evaluate(HISTORY_ROWS)
    seed = page.get_by_role("spinbutton", name="Seed")
    seed.fill("1.5")  # refused, not rounded to 2
    page.locator("#run").click()
    page.locator("#seed").get_by_text("seed must be a whole number, got 1.5").wait_for(state="visible")
    seed.fill("0")

    page.get_by_role("spinbutton", name="Frames").fill("9")
    steps = page.get_by_role("spinbutton", name="Steps", exact=True)
    steps.fill("64")  # about 10 s of denoising on 2 cores, the most the default work limit allows
    page.locator("#run").click()
    long_run = "[...document.querySelectorAll('.progress-level-inner')].some(bar => / step \\d+\\/64/.test(bar.textContent))"
    page.wait_for_function(f"() => {long_run}")  # the 64-step run's timed calls are under way
    page.locator("#cancel").click()
    page.locator("#headline").get_by_text("Cancelled.").wait_for(state="visible")
    assert page.locator("#headline .cards").count() == 0  # the earlier result is cleared, not left beside new settings
    page.wait_for_function(f"() => !({long_run})", timeout=10_000)  # it stopped at its next step
    steps.fill("4")
    page.locator("#run").click()
    page.wait_for_function(f"() => ({HISTORY_ROWS})() === {runs + 1}", timeout=30_000)


def test_two_methods_stack_through_the_page(page):
    runs = page.evaluate(HISTORY_ROWS)
    open_group(page, "acceleration")
    page.locator("#method-first_block_cache").get_by_text("first block cache").first.click()  # unfold its group
    page.locator("#use_first_block_cache input").check()
    threshold = page.locator("#first_block_cache_threshold input[type=number]")
    threshold.fill("1")
    threshold.press("Enter")
    page.locator("#method-mag_cache").get_by_text("MagCache").first.click()
    page.locator("#use_mag_cache input").check()  # a second diffusers cache: refused, naming the rule
    page.locator("#run").click()
    page.get_by_text("diffusers keeps one cache per model").first.wait_for(state="visible")
    # The refusal's message covers the switch it names until the next run: untick it by script.
    page.locator("#use_mag_cache input").evaluate("box => box.click()")
    assert not page.locator("#use_mag_cache input").is_checked()
    for close in page.locator(".toast-close").all():
        close.click()

    page.locator("#run").click()
    wait_for_work(page, f"() => ({HISTORY_ROWS})() === {runs + 1}")
    wait_for_work(page, BOTH_PLAYABLE)
    metrics = page.evaluate(METRICS)
    assert metrics["token merging (ToMe): merge ratio (requested / effective)"][1].startswith("0.50 / ")
    skipped = metrics["first block cache: transformer-block computations skipped (each CFG sample counted)"][1]
    assert int(skipped.split(" of ")[0]) > 0  # the cache really skipped blocks
    last_row = page.evaluate("""() => [...document.querySelectorAll('#history-table [role=row]')].at(-1).innerText""")
    assert "tome ratio 0.5 stride 1x2x2 + first_block_cache threshold 1" in last_row
    page.locator("#use_first_block_cache input").uncheck()


def test_a_benchmark_through_the_page_at_phone_width(browser, app_server):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_server)
    page.get_by_role("tab", name="Benchmark").click()
    page.locator("#bench_prompts textarea").fill("a red fox running through snow\nwaves on a rocky shore")
    editor = page.locator("#bench_sweep .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("stacks:\n- tome: {ratio: [0.25, 0.9]}\n")
    page.locator("#bench-run").click()  # 0.9 is above the stride's cap: refused at the sweep, before it runs
    page.locator("#bench_sweep").get_by_text("merge ratio must be between 0 and 0.75").wait_for(state="visible")
    for close in page.locator(".toast-close").all():
        close.click()
    page.locator("#bench_sweep button[aria-label=Clear]").click()  # the message's x uncovers the editor
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("request: {rounds: 2}\nstacks:\n- tome: {ratio: [0.25, 0.5]}\n")
    page.locator("#bench-run").click()
    page.locator("#bench-status").get_by_text("4 of 4 rows finished").wait_for(state="visible")
    settings = page.evaluate("() => [...document.querySelectorAll('#bench-summary-table tbody th')].map(c => c.innerText)")
    assert settings == ["tome ratio 0.25 stride 1x2x2", "tome ratio 0.5 stride 1x2x2"]
    width = page.evaluate("() => document.querySelector('#bench-summary-table').getBoundingClientRect().right")
    assert width <= 390  # stacked rows on a phone: nothing cut off at the right
    assert page.locator("#bench-plots img").count() == 4
    files = page.locator("#bench-files").inner_text()
    assert all(name in files.replace("\n", "") for name in ("report.html", "summary.csv", "rows.jsonl")), files
    page.close()


CARDS_IN_VIEW = """() => { const r = document.querySelector('#headline .cards').getBoundingClientRect();
    return r.top >= 0 && r.bottom <= window.innerHeight && r.height > 0; }"""
LINES = "() => document.querySelectorAll('#history-chart g.mark-line path').length"
STORED = "() => (localStorage.getItem('vdtome-history') || '').length"
FRAME_IMAGES = "() => [...document.querySelectorAll('#frame-slider img')].map(img => img.src)"


def close_toasts(page) -> None:
    for close in page.locator(".toast-close").all():
        close.click()


def test_a_sweep_is_one_curve_on_the_chart_and_the_history_survives_a_reload(page):
    """Page mechanics, on the quick random model: a sweep's points join into one line, and the history
    kept in the browser's storage comes back after a reload."""
    close_toasts(page)
    runs = page.evaluate(HISTORY_ROWS)
    stored = page.evaluate(STORED)
    page.locator("#sweep-ratios input").fill("0.2, 0.4, 0.6")
    rounds = page.locator("#rounds input")
    rounds.fill("2")  # the curve is what this checks: 3 points of 2 rounds each, not 3 x 7
    rounds.press("Enter")
    page.locator("#sweep").click()
    # Three whole comparisons on a 2-core machine shared with the browser: as long as they advance.
    wait_for_work(page, f"() => ({HISTORY_ROWS})() === {runs + 3}")
    page.wait_for_function(f"() => ({LINES})() === 1", timeout=10_000)
    page.wait_for_function(f"() => ({STORED})() !== {stored}", timeout=10_000)  # saved in the browser
    page.reload()
    page.wait_for_function(f"() => ({HISTORY_ROWS})() === {runs + 3}", timeout=30_000)
    page.wait_for_function(f"() => ({LINES})() === 1", timeout=10_000)


def check_result_page(page, width: int, folder: Path, name: str) -> None:
    """Every metric row on the page (no inner scroll) and readable at this width, the frame view's
    two images differ at the preset's default merge, and the page's screenshot."""
    tones = page.evaluate("() => [...document.querySelectorAll('#headline .card')].map(c => c.dataset.tone)")
    assert len(tones) == 4 and set(tones) <= {"better", "worse", "neutral", "untested", "unreliable"}
    rows = page.locator("#metrics tbody tr")
    assert rows.count() >= 15
    for index in range(rows.count()):
        row = rows.nth(index)
        row.scroll_into_view_if_needed()
        assert row.is_visible() and row.bounding_box()["width"] <= width
    assert "made" in page.evaluate(METRICS)["baseline video"][0]  # the last row too
    assert page.locator("#metrics thead").is_visible() == (width >= 700)  # narrow: label and value per line
    page.locator("#frame-slider img").first.wait_for(state="visible")
    sources = page.evaluate(FRAME_IMAGES)
    assert len(sources) == 2
    images = [page.request.get(source).body() for source in sources]
    assert images[0] != images[1]
    page.locator("#headline .cards").scroll_into_view_if_needed()
    close_toasts(page)
    page.wait_for_timeout(500)
    page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000


def test_the_result_page_at_phone_and_desktop_widths(browser, default_app_server, tmp_path):
    """The page as a visitor first gets it and runs it untouched, on a phone: the trained
    tiny-shapes-128 model, its first known prompt and its own token-merging defaults; the result
    comes into view by itself. The same page then widened to a desktop's width (one run for both:
    it is the suite's longest). These are the README's pictures."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(default_app_server)
    assert "trained on coloured shapes" in page.locator("#preset input").input_value()
    assert page.locator("#prompt textarea").input_value() == load_prompts("shapes")[0]
    # Run is on the first screen and stays reachable from anywhere in the form (a bar fixed at the bottom);
    # the form itself ends within 2.5 screens (the methods folded into one section that says what is on).
    page.wait_for_function(IN_VIEW, arg="#run")
    assert page.evaluate("() => document.querySelector('#result-column').getBoundingClientRect().top") <= 2.5 * 844
    assert "token merging (ToMe) ratio 0.3" in page.locator("#acceleration > .label-wrap").inner_text()
    page.locator("#share").scroll_into_view_if_needed()
    page.wait_for_function(IN_VIEW, arg="#run")
    page.locator("#run").click()
    # The preset's whole default comparison on a 2-core machine shared with the browser: as long as it advances.
    wait_for_work(page, "() => { const c = document.querySelector('#headline .cards'); "
                        "return c !== null && c.getBoundingClientRect().height > 0; }")
    page.wait_for_function(CARDS_IN_VIEW, timeout=10_000)  # in view without the visitor scrolling
    folder = Path(os.environ.get("VDTOME_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    check_result_page(page, 390, folder, "screenshot-phone.png")
    page.set_viewport_size({"width": 1400, "height": 900})
    page.evaluate("() => window.scrollTo(0, 0)")
    check_result_page(page, 1400, folder, "screenshot.png")
    # Beside the form's default stack: the recipes tuned for this preset, with their validated figures;
    # another preset (here set by a link) has none.
    open_group(page, "acceleration")
    assert "tiny-shapes-128-tome" in page.locator("#recipe-note").inner_text()
    other = get_preset("tiny-shapes")
    page.goto(default_app_server + f"?preset={other.name}")
    page.wait_for_function("(label) => document.querySelector('#preset input')?.value === label", arg=other.label)
    open_group(page, "acceleration")
    page.wait_for_function("() => !document.querySelector('#recipe-note').innerText.includes('tiny-shapes-128')")
    page.close()


# ---- every field as the page holds it: typed out of range, and carried by a link the page made ------------

# The presets whose pages test the methods the default (tiny-wan) cannot take.
PRESETS_FOR_METHODS = ("tiny-wan", "tiny-cogvideox", "tiny-animatediff")


def method_presets():
    """(preset, methods first testable on it): every registered method on a tiny preset that takes it."""
    from vdtome.core.denoisers import pipeline_denoiser_types
    from vdtome.core.presets import load_presets
    from vdtome.methods import METHODS

    presets, seen, plan = load_presets(), set(), []
    for name in PRESETS_FOR_METHODS:
        types = pipeline_denoiser_types(presets[name].pipeline_class)
        mine = [m for key, m in METHODS.items() if key not in seen and m.unavailable(types) is None]
        seen.update(m.name for m in mine)
        plan.append((presets[name], mine))
    assert seen == set(METHODS), f"no tiny preset in {PRESETS_FOR_METHODS} takes {set(METHODS) - seen}"
    return plan


def page_form(preset) -> dict:
    """The form's values as a page on ``preset`` starts (what Run sends, before any change)."""
    from vdtome.web.ui import CUSTOM_MODEL, method_defaults, preset_prompts

    return {"preset": preset.name, "prompt": preset_prompts(preset)[0], "negative_prompt": "", "seed": 0,
            "frames": preset.num_frames, "height": preset.height, "width": preset.width,
            "steps": preset.num_inference_steps, "guidance": preset.guidance_scale, "rounds": preset.timing_rounds,
            CUSTOM_MODEL: "", **method_defaults(preset)}


@functools.cache
def cpu_gates():
    """The app's own request gates on a machine without a GPU, as the test server has them."""
    from vdtome.core.presets import load_presets
    from vdtome.web.gates import RequestGates
    from vdtome.web.limits import ServiceLimits

    return RequestGates(load_presets(), ServiceLimits(), has_gpu=False)


def api_refusal(form: dict):
    """The refusal the API gives for these values (the app's own gates, in this process)."""
    from vdtome.core.validation import RequestError

    try:
        cpu_gates().comparison(form)
    except RequestError as error:
        return error
    raise AssertionError(f"these values are not refused: {form}")


def wait_for_start(page, selector: str, start: str, context: str = "") -> None:
    """Wait until the element's text starts with ``start``; on a timeout, say what it showed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("([selector, start]) => document.querySelector(selector)?.innerText.startsWith(start)",
                               arg=[selector, start])
    except PlaywrightTimeout:
        shown = page.evaluate("(selector) => document.querySelector(selector)?.innerText", selector)
        raise AssertionError(f"{selector} shows {shown!r}, not {start!r}... {context}") from None


def open_on_preset(page, app_server: str, preset) -> None:
    """The page on ``preset``: as it opens for the server's default, else through a link, once
    applied (the picker shows it; a link is applied in one update)."""
    page.goto(app_server if preset.name == PRESETS_FOR_METHODS[0] else app_server + f"?preset={preset.name}")
    page.wait_for_function("(label) => document.querySelector('#preset input')?.value === label", arg=preset.label)


def open_method(page, method) -> None:
    """Unfold the method's group and its advanced options."""
    open_group(page, "acceleration")
    open_group(page, f"method-{method.name}")
    if any(f.advanced for f in method.fields):
        open_group(page, f"method-{method.name}-more")


def switch_on(page, method) -> None:
    open_method(page, method)
    page.locator(f"#{method.enable_field} input").check()


def out_of_range_request(preset) -> dict[str, str]:
    """A value outside each request field's range on ``preset`` (these boxes have no slider to move them)."""
    from vdtome.engine.request import MAX_GUIDANCE, MAX_ROUNDS, MAX_STEPS

    rules = preset.constraints
    return {"seed": "-1", "frames": str(rules.valid_frame_range[1] + rules.frames_multiple),
            "height": str(rules.valid_side_range[1] + rules.side_multiple), "width": str(rules.valid_side_range[0] - 1),
            "steps": str(MAX_STEPS + 1), "guidance": f"{MAX_GUIDANCE + 1:g}", "rounds": str(MAX_ROUNDS + 1)}


def as_typed(number: int | float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def typed_and_left(page, box: str, typed: str, name: str) -> None:
    """Type ``typed`` into ``box`` and leave it: it still holds it (Gradio's slider would move a
    value into its range as the box loses focus)."""
    field = page.locator(box)
    field.fill(typed)
    field.press("Tab")
    assert field.input_value() == typed, name


def run_refused(page, values: dict):
    """Press Run: the page refuses with the API's message for ``values`` (the form as typed), which
    it returns (the RequestError, naming its fields)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    error = api_refusal(values)
    page.locator("#run").click()
    try:  # the whole message: a refusal naming fewer fields is not one naming more
        page.wait_for_function("(text) => document.querySelector('#refusal')?.innerText.startsWith(text)",
                               arg=f"Not run: {error} Go to ", timeout=30_000)
    except PlaywrightTimeout:
        shown = page.evaluate("() => document.querySelector('#refusal')?.innerText")
        raise AssertionError(f"Run did not refuse {error.fields} with {str(error)!r}; the page shows "
                             f"{shown!r}") from None
    return error


def refused_as_typed(page, name: str, box: str, typed: str, values: dict, start: str) -> None:
    """Type ``typed`` into ``box``, leave it, press Run: the box still holds it and Run refuses it
    with the API's message for ``values``; then put back ``start``."""
    typed_and_left(page, box, typed, name)
    run_refused(page, values)
    page.locator(box).fill(start)  # within the range: nothing to move


# Values other than the defaults for each method's fields, set through the page (every registered
# method must be here: a new one fails the test until it is).
LINK_VALUES = {
    "tome": {"ratio": 0.4, "blocks": "every other block", "targets": ["self-attention", "feed-forward"],
             "reuse_steps": 2, "random_destinations": False},
    "tile_sparsity": {"tile_sparsity_pattern": "1:1", "tile_sparsity_placement": "spaced",
                      "tile_sparsity_dense_steps": 1, "tile_sparsity_kernel": "gather"},
    "first_block_cache": {"first_block_cache_threshold": 0.2},
    "pyramid_attention_broadcast": {"pyramid_attention_broadcast_spatial_skip": 3,
                                    "pyramid_attention_broadcast_timestep_from": 50},
    "faster_cache": {"faster_cache_spatial_skip": 3, "faster_cache_alpha_low": 1.2},
    "taylorseer_cache": {"taylorseer_cache_interval": 3, "taylorseer_cache_warmup_steps": 1,
                         "taylorseer_cache_dtype": "float32"},
    "mag_cache": {"mag_cache_threshold": 0.1, "mag_cache_max_skip_steps": 2},
    "sea_cache": {"sea_cache_threshold": 0.3, "sea_cache_max_consecutive": 1},
    "cache_dit": {"cache_dit_threshold": 0.2, "cache_dit_warmup_steps": 1, "cache_dit_taylorseer": True},
    "slicing": {"slicing_chunk_tokens": 256, "slicing_feed_forward": False},
    "step_rehash": {"step_rehash_mode": "interval", "step_rehash_interval": 2},
    "vae_tiling": {"vae_tiling_tile_px": 32},
    "layerwise_casting": {"layerwise_casting_storage": "float8_e5m2"},
    "offload": {"offload_mode": "model"},
    "compile": {"compile_backend": "eager", "compile_dynamic": "off"},  # tracing only: no code generation
}


def link_request(preset) -> dict[str, int]:
    """Request fields off their defaults too, and a quick run: the fewest frames (5 at least), 48 px."""
    return {"frames": max(preset.constraints.valid_frame_range[0], 5), "height": 48, "width": 48, "steps": 3,
            "rounds": 1}


def set_field(page, form_field, value) -> None:
    """Set a method's field through its widget, as a visitor would."""
    root = f"#{form_field.name}"
    if form_field.kind in ("number", "integer"):
        box = page.locator(f"{root} input[type=number]")
        box.fill(as_typed(value))
        box.press("Tab")
    elif form_field.kind == "boolean":
        page.locator(f"{root} input").set_checked(value)
    elif form_field.kind == "choice":
        page.locator(f"{root} input[value='{value}']").check()
    elif form_field.kind == "choices":
        for option in form_field.options:
            page.locator(f"{root} input[name='{option}']").set_checked(option in value)
    else:  # text: a dropdown of suggestions that takes any text
        box = page.locator(f"{root} input")
        box.fill(value)
        box.press("Enter")


def field_value(page, form_field):
    """What a method's widget shows."""
    root = f"#{form_field.name}"
    if form_field.kind in ("number", "integer"):
        text = page.locator(f"{root} input[type=number]").input_value()
        return int(text) if form_field.kind == "integer" else float(text)
    if form_field.kind == "boolean":
        return page.locator(f"{root} input").is_checked()
    if form_field.kind == "choice":
        return page.locator(f"{root} input:checked").get_attribute("value")
    if form_field.kind == "choices":
        return [option for option in form_field.options if page.locator(f"{root} input[name='{option}']").is_checked()]
    return page.locator(f"{root} input").input_value()


def refused_out_of_range(page, method, form: dict) -> None:
    """Each numeric field of ``method`` (switched on): a value past its slider's end (a bound may
    lower it) typed and left stays as typed; Run refuses them with the API's message, which names
    each one (a rule across fields once the ranges hold: a later Run); then each back."""
    boxes, typed = {}, {}
    for form_field in (f for f in method.fields if f.kind in ("number", "integer")):
        boxes[form_field.name] = box = f"#{form_field.name} input[type=number]"
        value = float(page.locator(box).get_attribute("max")) + (form_field.step or 1)
        typed[form_field.name] = int(value) if form_field.kind == "integer" else round(value, 6)
        typed_and_left(page, box, as_typed(typed[form_field.name]), form_field.name)
    while typed:
        named = run_refused(page, form | typed).fields
        assert named and set(named) <= set(typed), (named, typed)
        for name in named:
            page.locator(boxes[name]).fill(as_typed(form[name]))
            del typed[name]


def make_link(maker, method, values: dict, before: str) -> str:
    """Set ``values`` of the method (switched on) through the page, press Share, return its link
    (the method switched off after: the next link holds the next method alone)."""
    for form_field in method.fields:
        if form_field.name in values:
            set_field(maker, form_field, values[form_field.name])
    open_group(maker, "share")
    maker.locator("#share-button").click()
    maker.wait_for_function("(before) => { const link = document.querySelector('#share-link textarea').value; "
                            "return link.includes('?') && link !== before; }", arg=before)
    link = maker.locator("#share-link textarea").input_value()
    maker.locator(f"#{method.enable_field} input").uncheck()
    return link


def open_link_and_run(opened, maker, preset, method, values: dict, link: str) -> int:
    """Open ``link`` in a fresh page load: every field of the method shows what the maker set, the
    titles say it alone is on, no toast; press Run (not waited for). Returns the runs listed before."""
    from vdtome.methods import METHODS
    from vdtome.web.ui import acceleration_title, method_defaults

    opened.goto(link)
    restored = method_defaults(preset) | {m.enable_field: m is method for m in METHODS.values()} | values
    wait_for_start(opened, "#acceleration > .label-wrap", acceleration_title(restored), link)  # restored
    open_method(opened, method)
    assert opened.locator(f"#{method.enable_field} input").is_checked()
    shown = {f.name: field_value(opened, f) for f in method.fields}
    assert shown == {f.name: values.get(f.name, field_value(maker, f)) for f in method.fields}, link
    wait_for_start(opened, f"#method-{method.name} > .label-wrap", f"{method.label} · on · ", link)
    assert "not runnable" not in opened.locator(f"#method-{method.name} > .label-wrap").inner_text()
    assert opened.locator(".toast-body").count() == 0, opened.locator(".toast-body").all_inner_texts()
    runs = opened.evaluate(HISTORY_ROWS)
    opened.locator("#run").click()
    return runs


def ran_as_linked(opened, preset, method, values: dict, request: dict, runs: int, link: str) -> None:
    """The run the link started finished with exactly the link's request and method settings."""
    import torch

    from vdtome.methods import config_fields
    from vdtome.web.ui import method_defaults

    if method.name == "offload" and not torch.cuda.is_available():  # restored; a CPU has nowhere to offload to
        opened.get_by_text("there is nothing to offload to").first.wait_for()
        close_toasts(opened)
        return
    wait_for_work(opened, f"() => ({HISTORY_ROWS})() === {runs + 1}")
    result = opened.request.get(opened.locator("#result-json a").get_attribute("href")).json()
    assert {name: result["settings"][name] for name in request} == request, link
    expected = config_fields(method.from_form(method_defaults(preset) | values))
    assert [m["method"] for m in result["methods"]] == [method.name]
    ran = result["methods"][0]["config"]
    # Every setting as the link said; what the method fills in itself (a calibration) aside.
    assert {k: ran[k] for k, v in expected.items() if v is not None} == \
        {k: v for k, v in expected.items() if v is not None}, method.name
    if result["compilation"] is not None:  # what dynamo did is on the page too, and nothing compiled while timed
        assert result["compilation"]["compiles_in_timed_rounds"] == 0, result["compilation"]
        opened.get_by_text("compile phase (untimed, both sides)").first.wait_for(state="attached")
        opened.get_by_text("compiles during the timed rounds").first.wait_for(state="attached")


def test_every_field_typed_out_of_range_is_refused_and_a_link_the_page_made_runs_at_its_values(browser, app_server):
    """Every method switched on in turn (alone, on a preset that takes it), in a real browser:
    - each numeric field of the request and of the method, typed outside its range, stays as typed
      when it loses focus (Gradio's slider would move it into range) and Run refuses it with the
      API's message naming the field and the range (a method's fields all in one message); nothing runs;
    - its fields set off their defaults through the page, the page's own link copied and opened in a
      fresh page: every field shows the value set, no toast, the titles say what is on, and Run runs
      exactly that configuration (while the next method's link is being made)."""
    from vdtome.methods import METHODS

    assert set(LINK_VALUES) == set(METHODS)
    # At a phone's width: Run in its bar at the bottom is in reach from every field.
    maker = browser.new_page(viewport={"width": 390, "height": 844})
    opened = browser.new_page(viewport={"width": 390, "height": 844})
    for page in (maker, opened):
        page.set_default_timeout(TIMEOUT_MS)
    link, running = "", None  # the link whose run is under way in `opened`, and what to check of it
    for index, (preset, methods) in enumerate(method_presets()):
        open_on_preset(maker, app_server, preset)
        form = page_form(preset)
        if index == 0:
            for name, typed in out_of_range_request(preset).items():
                number = float(typed) if "." in typed else int(typed)
                refused_as_typed(maker, name, f"#{name} input", typed, form | {name: number}, as_typed(form[name]))
        request = link_request(preset)
        for name, value in request.items():
            maker.locator(f"#{name} input").fill(str(value))
            maker.locator(f"#{name} input").press("Tab")
        for method in methods:
            switch_on(maker, method)
            if method.name != "tome":
                maker.locator("#use_tome input").uncheck()  # the method alone
            alone = {m.enable_field: m is method for m in METHODS.values()}
            refused_out_of_range(maker, method, form | request | alone)
            values = LINK_VALUES[method.name]
            link = make_link(maker, method, values, link)
            assert f"preset={preset.name}" in link and maker.evaluate(HISTORY_ROWS) == 0, link  # nothing refused ran
            if running is not None:
                ran_as_linked(opened, *running)
            runs = open_link_and_run(opened, maker, preset, method, values, link)
            running = (preset, method, values, request, runs, link)
    ran_as_linked(opened, *running)
    maker.close()
    opened.close()
