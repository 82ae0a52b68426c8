"""What the server keeps for a visitor's session is released when the visitor leaves.

On a public Space every visitor is a new Gradio session. Gradio 6.31 keeps per session a
``SessionState`` (a copy of every component's config, ~0.35 MB for this page, plus the
``gr.State`` values) that it drops only beyond ``state_session_capacity`` sessions (its own expiry
deletes the State values of a closed session after an hour, never the SessionState), and the
queue keeps per session an event-id set (``pending_event_ids_session``) that nothing ever drops
and a message box (``pending_messages_per_session``, 2,000 kept). A server that holds every
session it ever saw grows with every visitor (issue: ~0.45 MB per new session).

:func:`expire_sessions` installs a reaper that releases everything kept for a session (its
SessionState and State values, its queue message box and event-id set, its media streams and
per-session caches, and its entries here) once

* its heartbeat closed ``grace_s`` ago (the tab was closed; a tab that reconnects within the
  grace keeps its state), or it never opened one (an API client on ``/call/``: each call is its
  own session) and it has been idle ``grace_s``;
* or it has been idle ``ttl_s``, whatever its heartbeat;

and never while it has an event queued or running; a finished result its client has not fetched
yet is kept until ``ttl_s``. Activity is an event joining the queue (every event the page or an
API client sends), an event queued or running, or a heartbeat opening or closing; Gradio's
``time_last_used`` is not used: reading a session (its deep-link route) moves it too. Gradio's
LRU cap (``state_session_capacity``) stays the backstop.

A pass runs every ``interval_s`` (at most 10 s) on the server's event loop: one walk over the
sessions held, with no ``await`` inside, so no join or event start runs between a check and its
release. A pass that released something prints a ``vdtome: sessions: N held`` line.

Heartbeats are seen by :class:`HeartbeatWatch`, an ASGI middleware on Gradio's heartbeat route
(``/gradio_api/heartbeat/<session>``, the stream a tab or ``gradio_client`` keeps open): Gradio's
own ``SessionState.is_closed`` is set when a stream ends and never reset when the tab reconnects.
Without it (or if Gradio moved the route) sessions expire only after ``ttl_s``, and the app says so
when it starts.

It reaches into Gradio 6.31 where it has no public hook (the requirements pin it;
tests/test_sessions.py fails if an upgrade moves them): ``Blocks.extra_startup_events`` (to start
on the server's loop), the queue's ``push``, ``event_ids_to_events``, ``pending_event_ids_session``
and ``pending_messages_per_session``, the state holder's ``session_data``, ``time_last_used``,
``lock`` and ``delete_state``, and ``Blocks.pending_streams`` / ``pending_diff_streams``.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio import caching
from starlette.middleware import Middleware

STATUS_LINE = re.compile(r"vdtome: sessions: (\d+) held")
MAX_INTERVAL_S = 10.0  # the longest wait between two passes


@dataclass
class _Heartbeat:
    open: int = 0  # the session's heartbeat streams open now (a reconnect can overlap the old one)
    since: float = 0.0  # when one last opened or closed (monotonic)


class SessionReaper:
    """The sessions the server holds, and the pass that releases those whose visitor left.
    ``clock``: monotonic seconds (a test moves it)."""

    def __init__(self, blocks: gr.Blocks, ttl_s: float, grace_s: float, clock=time.monotonic) -> None:
        if not 0 < grace_s <= ttl_s:
            raise ValueError(f"the session grace ({grace_s} s) must be above 0 and at most the idle TTL ({ttl_s} s)")
        self.blocks, self.ttl_s, self.grace_s, self.clock = blocks, ttl_s, grace_s, clock
        self.interval_s = min(MAX_INTERVAL_S, max(1.0, grace_s / 2))
        self.active: dict[str, float] = {}  # session -> its last activity (monotonic)
        self.heartbeats: dict[str, _Heartbeat] = {}
        self.watching = False  # heartbeats are seen: "never opened one" means an API client
        self.released = 0
        self.task: asyncio.Task | None = None

    # ---- what the visitor does -------------------------------------------------------------------

    def watch_joins(self) -> None:
        """Wrap the queue's ``push``: an event joining the queue is its session's activity."""
        queue = self.blocks._queue
        push = queue.push

        async def noted_push(body, request, username):
            if body.session_hash is not None:
                self.active[body.session_hash] = self.clock()
            return await push(body, request, username)

        queue.push = noted_push

    def middleware(self) -> Middleware:
        """The ASGI middleware that shows this reaper each heartbeat stream open and close (for
        ``launch(app_kwargs={"middleware": [...]})``: Gradio's ``SessionState.is_closed`` is set when a
        stream ends and never reset when the tab reconnects, so it cannot tell a closed tab)."""
        return Middleware(HeartbeatWatch, reaper=self)

    def check_watch(self, app: Any) -> None:
        """At startup: sessions without a heartbeat count as gone only if the heartbeats are seen
        (the middleware installed, Gradio's heartbeat route where it watches)."""
        installed = any(getattr(m, "cls", None) is HeartbeatWatch for m in getattr(app, "user_middleware", []))
        try:
            path = app.url_path_for("heartbeat", session_hash="x")
        except Exception:
            path = None
        self.watching = installed and path is not None and HeartbeatWatch.PATH.search(path) is not None
        if not self.watching:
            print(f"vdtome: the session reaper cannot see tabs close (its middleware {'is' if installed else 'is not'} "
                  f"installed; Gradio {gr.__version__}'s heartbeat route is {path!r}, expected "
                  f"/gradio_api/heartbeat/...): sessions expire only after VDTOME_SESSION_TTL_S idle", flush=True)

    def _beat(self, session: str, change: int) -> None:
        beat = self.heartbeats.setdefault(session, _Heartbeat())
        beat.open, beat.since = max(0, beat.open + change), self.clock()
        self.active[session] = beat.since

    # ---- the pass --------------------------------------------------------------------------------

    def held(self) -> int:
        """Sessions whose SessionState Gradio holds."""
        return len(self.blocks.state_holder.session_data)

    def sessions(self) -> set[str]:
        """Every session Gradio keeps something for."""
        queue, blocks = self.blocks._queue, self.blocks
        return (set(blocks.state_holder.session_data) | set(queue.pending_event_ids_session)
                | set(queue.pending_messages_per_session) | set(blocks.pending_streams)
                | set(blocks.pending_diff_streams))

    def reap(self) -> dict[str, int]:
        """Release every session whose visitor left; returns how many for each reason. Synchronous:
        on the event loop nothing (a join, an event's start) runs between a check and its release."""
        now = self.clock()
        queue = self.blocks._queue
        busy = {event.session_hash for event in list(queue.event_ids_to_events.values())}
        for session in busy:
            self.active[session] = now
        counts = {"closed": 0, "idle": 0}
        sessions = self.sessions()
        for session in sessions - busy:
            last = self.active.setdefault(session, now)  # first seen now: a session from before the reaper
            beat = self.heartbeats.get(session)
            # A finished event whose result its client has not received yet (its message box may
            # also hold stale heartbeat messages: not a reason to keep it).
            undelivered = bool(queue.pending_event_ids_session.get(session))
            left = beat.open == 0 if beat is not None else self.watching
            if now - last >= self.ttl_s:
                reason = "idle"
            elif left and not undelivered and now - last >= self.grace_s:
                reason = "closed"
            else:
                continue
            self.release(session)
            counts[reason] += 1
        # What is noted for a session Gradio keeps nothing for: a tab that closed without an event,
        # a join that was refused, a session Gradio's cap dropped. An open heartbeat stays.
        for session in set(self.active) - sessions - busy:
            beat = self.heartbeats.get(session)
            if (beat is None or beat.open == 0) and now - self.active[session] >= self.grace_s:
                del self.active[session]
                self.heartbeats.pop(session, None)
        return counts

    def release(self, session: str) -> None:
        """Everything kept for ``session``, released (its State values through their delete
        callbacks, as Gradio's own expiry does); an open heartbeat keeps only its entries here."""
        holder, queue, blocks = self.blocks.state_holder, self.blocks._queue, self.blocks
        holder.delete_state(session)
        with holder.lock:
            holder.session_data.pop(session, None)
            holder.time_last_used.pop(session, None)
        queue.pending_messages_per_session.pop(session, None)
        queue.pending_event_ids_session.pop(session, None)
        for run in blocks.pending_streams.pop(session, {}).values():
            for stream in run.values():
                stream.end_stream()
        blocks.pending_diff_streams.pop(session, None)
        caching.clear_session_caches(session)
        beat = self.heartbeats.get(session)
        if beat is None or beat.open == 0:
            self.heartbeats.pop(session, None)
            self.active.pop(session, None)
        else:  # an idle tab still open: what it does next starts a new session state, and a new TTL
            self.active[session] = self.clock()
        self.released += 1

    async def run(self) -> None:
        """Passes every ``interval_s`` while the server runs."""
        while not self.blocks._queue.stopped:
            await asyncio.sleep(self.interval_s)
            try:
                counts = self.reap()
            except Exception as error:  # one failed pass must not end the reaping
                print(f"vdtome: the session reaper's pass failed: {error!r}", flush=True)
                continue
            if sum(counts.values()):
                tabs = sum(1 for beat in self.heartbeats.values() if beat.open)
                print(f"vdtome: sessions: {self.held()} held, {tabs} with a tab open (cap "
                      f"{self.blocks.state_holder.capacity}); released {counts['closed']} {self.grace_s:g} s after "
                      f"their tab closed or their API call, {counts['idle']} idle for {self.ttl_s:g} s; "
                      f"{self.released} since start", flush=True)


class HeartbeatWatch:
    """ASGI middleware: a request on Gradio's heartbeat route (``/gradio_api/heartbeat/<session>``,
    the stream a tab or ``gradio_client`` keeps open) is its session's tab opening, its end the tab
    closing."""

    PATH = re.compile(r"/gradio_api/heartbeat/([^/]+)/?$")

    def __init__(self, app, reaper: SessionReaper) -> None:
        self.app, self.reaper = app, reaper

    async def __call__(self, scope, receive, send) -> None:
        match = self.PATH.search(scope["path"]) if scope["type"] == "http" and "/heartbeat/" in scope["path"] else None
        if match is None:
            return await self.app(scope, receive, send)
        session = match.group(1)
        self.reaper._beat(session, +1)
        try:
            await self.app(scope, receive, send)
        finally:
            self.reaper._beat(session, -1)


def expire_sessions(blocks: gr.Blocks, ttl_s: float, grace_s: float) -> SessionReaper:
    """Release each session's server-side state when its visitor leaves (heartbeat closed, or never
    opened, ``grace_s`` ago) or after ``ttl_s`` idle. Call after ``blocks.queue()``, and give
    ``launch`` the returned reaper's ``middleware()`` (it is also ``blocks.session_reaper``); the
    reaping starts with the server, on its event loop."""
    reaper = SessionReaper(blocks, ttl_s, grace_s)
    reaper.watch_joins()

    async def start() -> None:
        reaper.check_watch(getattr(blocks, "server_app", None) or getattr(blocks, "app", None))
        if reaper.task is None or reaper.task.done():
            reaper.task = asyncio.get_running_loop().create_task(reaper.run())

    blocks.extra_startup_events.append(start)
    blocks.session_reaper = reaper
    return reaper
