"""A visitor's server-side session state is released when the visitor leaves (vdtome.web.sessions):
in process on a small Blocks with a gr.State (the reaper's rules, on a clock the test moves), and
through gradio_client against the real app (the heartbeat route, the reaper running on its loop)."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import urllib.request
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest
from gradio.routes import App

from vdtome.core.presets import load_presets
from vdtome.web.limits import ServiceLimits
from vdtome.web.sessions import STATUS_LINE, SessionReaper, expire_sessions

TTL, GRACE = 600, 60


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def built():
    """A Blocks with a session's history in gr.State and its App (the state holder); built once."""
    deleted = []
    with gr.Blocks() as demo:
        history = gr.State([], delete_callback=deleted.append)
        box = gr.Textbox()
        box.submit(lambda text, h: h + [text], [box, history], history)
    demo.queue()
    return SimpleNamespace(demo=demo, app=App.create_app(demo), history=history, deleted=deleted)


@pytest.fixture
def page(built):
    """``built`` with nothing held, a reaper on a test clock, the values the State's delete callback
    was given and the sessions whose events joined the queue."""
    demo, holder, queue = built.demo, built.app.state_holder, built.demo._queue
    for kept in (holder.session_data, holder.time_last_used, queue.pending_messages_per_session,
                 queue.pending_event_ids_session, queue.event_ids_to_events, built.deleted):
        kept.clear()
    clock = Clock()
    reaper = SessionReaper(demo, ttl_s=TTL, grace_s=GRACE, clock=clock)
    pushed = []

    async def push(body, request, username):
        pushed.append(body.session_hash)
        return True, "event", "success"

    queue.push = push
    reaper.watch_joins()
    return SimpleNamespace(**vars(built), clock=clock, reaper=reaper, pushed=pushed)


def visit(page, session: str, heartbeat: bool = True, rows=("run 1",)) -> None:
    """What Gradio keeps for a visitor whose tab opened and sent one event that finished."""
    if heartbeat:
        page.reaper._beat(session, +1)
    asyncio.run(page.demo._queue.push(SimpleNamespace(session_hash=session), None, None))
    page.app.state_holder[session][page.history._id] = list(rows)  # the event's output to the State
    page.demo._queue.pending_messages_per_session[session] = asyncio.Queue()
    page.demo._queue.pending_event_ids_session[session] = set()  # its result was delivered


def kept(page, session: str) -> dict[str, bool]:
    demo, holder = page.demo, page.app.state_holder
    return {"session state": session in holder.session_data, "last used": session in holder.time_last_used,
            "message box": session in demo._queue.pending_messages_per_session,
            "event ids": session in demo._queue.pending_event_ids_session,
            "reaper": session in page.reaper.active or session in page.reaper.heartbeats}


def test_a_closed_tabs_state_is_released_after_the_grace_and_not_while_it_is_open(page):
    page.reaper.watching = True
    visit(page, "tab")
    assert page.pushed == ["tab"] and all(kept(page, "tab").values())
    page.clock.now += TTL - 1  # open and idle: kept (the TTL not reached)
    assert page.reaper.reap() == {"closed": 0, "idle": 0} and all(kept(page, "tab").values())
    page.reaper._beat("tab", -1)  # the tab closed
    page.clock.now += GRACE - 1
    assert page.reaper.reap() == {"closed": 0, "idle": 0} and all(kept(page, "tab").values())
    page.clock.now += 1
    assert page.reaper.reap() == {"closed": 1, "idle": 0}
    assert not any(kept(page, "tab").values()), kept(page, "tab")
    assert page.deleted == [["run 1"]]  # the State value went through its delete callback, as Gradio's expiry does
    assert page.reaper.released == 1


def test_a_tab_that_reconnects_within_the_grace_keeps_its_state(page):
    page.reaper.watching = True
    visit(page, "tab")
    page.reaper._beat("tab", -1)
    page.clock.now += GRACE - 5
    page.reaper._beat("tab", +1)  # the same session's heartbeat again (a network blip)
    page.clock.now += GRACE * 3
    page.reaper.reap()
    assert all(kept(page, "tab").values()) and page.deleted == []


def test_an_event_queued_or_running_keeps_its_session_and_an_undelivered_result_waits_for_the_ttl(page):
    page.reaper.watching = True
    visit(page, "busy")
    page.reaper._beat("busy", -1)
    event = SimpleNamespace(session_hash="busy")
    page.demo._queue.event_ids_to_events["e1"] = event  # queued or running
    page.clock.now += TTL * 2
    assert page.reaper.reap() == {"closed": 0, "idle": 0} and kept(page, "busy")["session state"]
    del page.demo._queue.event_ids_to_events["e1"]  # finished; its result not fetched yet
    page.demo._queue.pending_event_ids_session["busy"] = {"e1"}
    page.clock.now += GRACE
    assert page.reaper.reap() == {"closed": 0, "idle": 0} and kept(page, "busy")["session state"]
    page.clock.now += TTL - GRACE  # idle for the TTL since the pass that saw it running
    assert page.reaper.reap() == {"closed": 0, "idle": 1} and not any(kept(page, "busy").values())


def test_an_api_session_goes_after_the_grace_and_an_open_idle_tab_after_the_ttl(page):
    page.reaper.watching = True
    visit(page, "api", heartbeat=False)  # /call/: no heartbeat, one session per call
    visit(page, "tab")
    page.clock.now += GRACE
    assert page.reaper.reap() == {"closed": 1, "idle": 0}
    assert not any(kept(page, "api").values()) and kept(page, "tab")["session state"]
    page.clock.now += TTL - GRACE
    assert page.reaper.reap() == {"closed": 0, "idle": 1} and not kept(page, "tab")["session state"]
    assert page.reaper.heartbeats["tab"].open == 1  # the tab is still there: its next event starts afresh


def test_without_the_heartbeat_watch_sessions_expire_only_after_the_ttl(page):
    visit(page, "api", heartbeat=False)  # the route was not found: "no heartbeat" proves nothing
    page.clock.now += TTL - 1
    assert page.reaper.reap() == {"closed": 0, "idle": 0} and kept(page, "api")["session state"]
    page.clock.now += 1
    assert page.reaper.reap() == {"closed": 0, "idle": 1}


def test_the_heartbeat_watch_sees_a_stream_open_and_close(page):
    """The middleware on Gradio's heartbeat route (a stream the test ends), and nothing else."""
    ended, seen = asyncio.Event(), []

    async def gradio(scope, receive, send):
        seen.append(scope["path"])
        if "/heartbeat/" in scope["path"]:
            await ended.wait()

    watch = page.reaper.middleware()
    watch = watch.cls(gradio, *watch.args, **watch.kwargs)

    async def tab():
        await watch({"type": "http", "path": "/gradio_api/queue/join"}, None, None)
        task = asyncio.create_task(watch({"type": "http", "path": "/gradio_api/heartbeat/tab"}, None, None))
        await asyncio.sleep(0)
        opened = page.reaper.heartbeats["tab"].open
        ended.set()
        await task
        return opened

    assert asyncio.run(tab()) == 1 and page.reaper.heartbeats["tab"].open == 0
    assert list(page.reaper.heartbeats) == ["tab"] and seen == ["/gradio_api/queue/join", "/gradio_api/heartbeat/tab"]


def test_expire_sessions_starts_the_reaper_and_checks_the_heartbeat_route(page):
    """Gradio's heartbeat route is where the middleware watches (an upgrade that moves it fails here)."""
    with gr.Blocks() as demo:
        gr.State([])
    demo.queue()
    reaper = expire_sessions(demo, ttl_s=TTL, grace_s=GRACE)
    demo.server_app = App.create_app(demo, app_kwargs={"middleware": [reaper.middleware()]})
    assert demo.session_reaper is reaper

    async def startup():
        await demo.run_extra_startup_events()  # what Gradio runs when the server starts
        running = not reaper.task.done()
        reaper.task.cancel()
        return running

    assert asyncio.run(startup()) and reaper.watching
    page.reaper.check_watch(page.app)  # an app launched without the middleware: the TTL only
    assert not page.reaper.watching


def test_the_session_settings_come_from_the_environment_and_a_bad_pair_is_refused():
    presets = load_presets()
    limits = ServiceLimits.from_env(presets, {"VDTOME_SESSION_TTL_S": "900", "VDTOME_SESSION_GRACE_S": "30",
                                              "VDTOME_SESSIONS_MAX": "200"})
    assert (limits.session_ttl_s, limits.session_grace_s, limits.sessions_max) == (900, 30, 200)
    with pytest.raises(ValueError) as error:
        ServiceLimits.from_env(presets, {"VDTOME_SESSION_TTL_S": "60", "VDTOME_SESSION_GRACE_S": "600"})
    assert "VDTOME_SESSION_GRACE_S (600 s) must be at most VDTOME_SESSION_TTL_S (60 s)" in str(error.value)
    with pytest.raises(ValueError, match="VDTOME_SESSIONS_MAX must be at least 1"):
        ServiceLimits.from_env(presets, {"VDTOME_SESSIONS_MAX": "0"})


# ---- the real app ---------------------------------------------------------------------------------


def held(url: str, session: str) -> bool:
    """Whether the server holds ``session``'s state (Gradio's deep-link route answers "" for a session it
    does not hold; it does not count as the session's activity)."""
    query = urllib.parse.urlencode({"session_hash": session})
    with urllib.request.urlopen(f"{url}gradio_api/deep_link?{query}", timeout=30) as response:
        return response.read().strip() not in (b'""', b"")


def wait_until(condition, what: str, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {deadline_s:.0f} s")
        time.sleep(0.5)


@pytest.mark.server
def test_the_real_app_releases_a_closed_or_api_session_and_keeps_an_open_one(app_server_and_log):
    """The app server runs with VDTOME_SESSION_GRACE_S=1 and a 1 s heartbeat (tests/conftest.py)."""
    from gradio_client import Client

    url, log = app_server_and_log
    prompt = "A paper boat drifts down a rain-filled gutter."
    small = {"frames": 5, "height": 32, "width": 32, "steps": 1, "rounds": 1}  # a small comparison
    tab = Client(url, verbose=False, download_files=False)  # its heartbeat stays open
    closing = Client(url, verbose=False, download_files=False)
    try:
        for client in (tab, closing):
            client.predict(prompt=prompt, **small, api_name="/compare")
        # A plain HTTP call (no heartbeat): its session is its event id.
        joined = httpx.post(f"{url}gradio_api/call/v2/compare", json={"prompt": prompt, **small})
        api_session = joined.json()["event_id"]
        # Kept while its result waits to be fetched (however long that takes); released after.
        wait_until(lambda: held(url, api_session), "the API call's session state did not appear")
        result = httpx.get(f"{url}gradio_api/call/compare/{api_session}", timeout=120).text
        assert "event: complete" in result, result[-500:]
        assert held(url, tab.session_hash) and held(url, closing.session_hash)
        closing_session = closing.session_hash
        closing.close()  # its heartbeat ends at the next beat
        wait_until(lambda: not held(url, closing_session), "the closed client's session was not released")
        wait_until(lambda: not held(url, api_session), "the API session (no heartbeat) was not released")
        # The pass that released them looked at the open tab too (its last event was earlier): kept.
        assert held(url, tab.session_hash)
        assert STATUS_LINE.search(log.read_text())  # the app says what it released
    finally:
        tab.close()
