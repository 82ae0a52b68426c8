"""The Tune tab in a real browser (Debian's Chromium) on the test server's tiny random Wan: a tune
streams its trials to the status and the plot, ends with a validated recipe that Load puts into the
comparison form, fits a phone and a desktop; Cancel stops a tune and keeps its finished trials."""

from __future__ import annotations

import pytest

from test_app_browser import TIMEOUT_MS, browser, open_group, wait_for_work  # noqa: F401 (the fixture)

pytest.importorskip("optuna")

STATUS = "#tune-status"
NO_SIDEWAYS_SCROLL = "() => document.documentElement.scrollWidth <= window.innerWidth + 1"


def status_has(page, words: str) -> str:
    return f"() => (document.querySelector('{STATUS}')?.innerText || '').includes({words!r})"


def open_tab(page, name: str) -> None:
    """Click a top-level tab; on a phone the tabs that do not fit are in Gradio's "More tabs" menu."""
    tab = page.locator(f"#{name.lower()}-tab-button")
    page.wait_for_function("() => document.querySelector('#history-tab-button') !== null")
    if tab.count() and tab.is_visible():
        tab.click()
    else:
        wrapper = page.locator(".tab-wrapper").filter(has=page.locator("#history-tab-button"))
        wrapper.locator("button[aria-label='More tabs']").click()
        wrapper.locator(".overflow-dropdown button", has_text=name).click()
    page.locator(f"#{name.lower()}-tab").wait_for(state="visible")


def open_tune_tab(page, app_server: str, methods: list[str], minutes: str, floors: str = "psnr=5") -> None:
    page.goto(app_server)
    open_tab(page, "Tune")
    for box in page.locator("#tune_methods input[type=checkbox]").all():
        box.set_checked(box.get_attribute("name") in methods)
    page.locator("#tune_floors input").fill(floors)
    page.locator("#tune_minutes input").fill(minutes)


def test_a_tune_streams_its_trials_and_its_recipe_loads_into_the_form(browser, app_server):  # noqa: F811
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.set_default_timeout(TIMEOUT_MS)
    # MagCache alone on the 4-step tiny Wan: its defaults (the study's first trial) already skip steps and
    # are faster there, so a recipe is found however few trials a busy machine runs in the minutes given
    # (the first block cache's defaults skip nothing there: a slow machine ran no other trial and chose none).
    open_tune_tab(page, app_server, ["mag_cache"], "0.2")
    page.locator("#tune-run").click()
    # Streamed while it searches: the trials so far and the plot, before the tune has finished.
    wait_for_work(page, status_has(page, "trials run"))
    page.locator("#tune-plot img").wait_for()
    assert not page.evaluate(status_has(page, "chosen:"))
    wait_for_work(page, status_has(page, "chosen: trial"))
    status = page.locator(STATUS).inner_text()
    assert "mag_cache threshold" in status and "validation prompts" in status, status
    links = [a.get_attribute("href") or "" for a in page.locator("#tune-files a").all()]
    assert {"recipe.json", "report.html", "trials.csv"} == {link.rsplit("/", 1)[-1] for link in links}, links
    assert page.evaluate(NO_SIDEWAYS_SCROLL)
    page.set_viewport_size({"width": 1400, "height": 900})
    assert page.evaluate(NO_SIDEWAYS_SCROLL)
    assert page.locator("#tune-plot img").bounding_box()["width"] > 500  # the plot uses the desktop's width
    # Load into the form: the comparison form takes the recipe's preset, size and stack.
    page.locator("#tune-load").click()
    page.wait_for_function("() => (document.querySelector('#acceleration > .label-wrap')?.innerText || '')"
                           ".includes('MagCache')")
    open_group(page, "acceleration")
    for name in ("mag_cache", "tome"):
        open_group(page, f"method-{name}")
    assert page.locator("#use_mag_cache input").is_checked()
    assert not page.locator("#use_tome input").is_checked()
    recipe = page.request.get([link for link in links if link.endswith("recipe.json")][0]).json()
    threshold = recipe["stack"][0]["fields"]["mag_cache_threshold"]
    assert float(page.locator("#mag_cache_threshold input[type=number]").input_value()) == threshold
    assert page.locator("#preset input").input_value().startswith("Tiny Wan")
    assert "loaded" in page.locator("#run-notice").inner_text()
    page.close()


def test_cancel_stops_a_tune_and_keeps_its_finished_trials(browser, app_server):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    open_tune_tab(page, app_server, ["tome", "first_block_cache"], "5")
    page.locator("#tune-run").click()
    wait_for_work(page, "() => /[1-9][0-9]* trials run/.test(document.querySelector('#tune-status')?.innerText)")
    page.locator("#tune-cancel").click()
    wait_for_work(page, status_has(page, "cancelled:"))
    status = page.locator(STATUS).inner_text()
    assert "finished trials kept" in status and "no recipe" in status, status
    assert not page.locator("#tune-load").is_visible()
    files = [(a.get_attribute("href") or "").rsplit("/", 1)[-1] for a in page.locator("#tune-files a").all()]
    assert "trials.csv" in files and "recipe.json" not in files, files
    page.close()
