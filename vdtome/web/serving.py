"""Serving the app to strangers: abandoned runs stop, the queue is the only place requests wait,
one visitor cannot take the queue, no uploads, and every refusal says what to change.

Gradio's queue cancels an event by cancelling its asyncio task: a synchronous handler running in
a worker thread goes on computing, the queue frees its slot at once, and the next request then
waits on the engine where the queue cannot count it. :func:`run_until_abandoned` closes that gap:
the work runs in a thread it owns, a cancelled event or a client that went away sets the run's
cancel flag (the engine stops at its next denoising step), and the event keeps its queue slot
until the thread has really stopped.

Three small adapters reach into Gradio 6.31 where it has no public hook (the requirements pin
it; the live-server tests fail if a Gradio upgrade moves them): the queue's events (is a client
still there? how many events does a visitor have?), the queue's ``push`` (refuse a visitor over
its limit before the event is queued) and ``Blocks.validate_inputs`` (missing or extra values).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr
from fastapi import HTTPException
from gradio.context import LocalContext
from starlette.responses import JSONResponse

T = TypeVar("T")

CLIENT_POLL_S = 0.1  # how often a running event checks that its client is still there


# ---- abandoned runs -------------------------------------------------------------------------------


def _current_event() -> Any:
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return None
    return queue.event_ids_to_events.get(event_id)


async def wait_out(future: asyncio.Future) -> None:
    """Wait until a cancelled event's worker has stopped, whatever cancels this wait again: the
    event holds its queue slot meanwhile, so the queue stays the only place a request waits and the
    stopped run's work cannot overlap (and time) the next one."""
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except Exception:
            break


async def run_until_abandoned(work: Callable[[], T], stop: Callable[[str], None],
                              discard: Callable[[T], None] | None = None) -> T:
    """``work()`` in a worker thread (with this event's context, so ``gr.Progress`` and ZeroGPU
    see the request); ``stop(reason)`` is called when the event is cancelled (API ``/cancel``, the
    page's Cancel) or its client disconnects. A cancelled event returns only after ``work`` ended;
    ``discard`` gets a result that was finished but cancelled before anyone received it."""
    context = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(context.run, work))
    event = _current_event()
    stopped = False
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=CLIENT_POLL_S)
            if done:
                return future.result()
            if not stopped and event is not None and not event.alive:  # the client's stream closed
                stop("its client disconnected")
                stopped = True
    except asyncio.CancelledError:
        stop("it was cancelled")
        await wait_out(future)
        error = future.exception()
        if error is None and discard is not None:
            discard(future.result())
        print(f"vdtome: the abandoned run ended: {error or 'it had finished; its outputs were deleted'}", flush=True)
        raise


# ---- one visitor cannot take the queue ------------------------------------------------------------


def client_address(request: Any) -> str:
    """The visitor's network address: the socket's peer, except on a Hugging Face Space, where
    that is the Hub's proxy (one internal address for everyone) and the visitor's address is the
    first of X-Forwarded-For. A client can forge that header: the per-address limit slows a
    scripted flood, it cannot stop a determined one (nothing keyed on a client's word can)."""
    if os.environ.get("SPACE_ID"):
        forwarded = request.headers.get("x-forwarded-for", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[0]
    client = getattr(request, "client", None)
    return client.host if client is not None else "unknown"


def limit_visitors(blocks: gr.Blocks, concurrency_id: str, per_session: int, per_address: int) -> None:
    """Refuse (HTTP 429, the message in ``detail``) a request for ``concurrency_id`` from a session
    or an address that already has that many queued or running, before it takes a queue place."""
    queue = blocks._queue
    push = queue.push
    lock = asyncio.Lock()

    def held(body: Any) -> bool:
        fn = blocks.fns.get(body.fn_index) if body.fn_index is not None else None
        return fn is not None and fn.concurrency_id == concurrency_id

    async def limited_push(body, request, username):
        if not held(body):
            return await push(body, request, username)
        async with lock:  # count and enqueue as one step: two quick joins cannot both pass
            events = [e for e in list(queue.event_ids_to_events.values()) if e.fn.concurrency_id == concurrency_id]
            mine = sum(1 for e in events if body.session_hash is not None and e.session_hash == body.session_hash)
            address = client_address(request)
            ours = sum(1 for e in events if e.request is not None and client_address(e.request) == address)
            if mine >= per_session:
                raise HTTPException(429, detail=(
                    f"you already have {mine} comparison{'s' * (mine > 1)} queued or running; this server takes "
                    f"at most {per_session} per visitor at a time: wait for one to finish, or cancel it"))
            if ours >= per_address:
                raise HTTPException(429, detail=(
                    f"your network address already has {ours} comparisons queued or running; this server takes "
                    f"at most {per_address} per address at a time: wait for one to finish"))
            return await push(body, request, username)

    queue.push = limited_push


# ---- routes the app does not offer ----------------------------------------------------------------

MAX_BODY_BYTES = 2**20  # a request body the guard reads (a form is a few kB)


class ServiceGuard:
    """ASGI middleware in front of Gradio's routes: refuses uploads (the app takes no files),
    answers an unknown API name with 404 and the names that exist (Gradio: 500), and refuses an
    unknown keyword on ``/call/v2/<name>`` with the parameters it takes (Gradio: a plain-text 500).
    ``api_parameters()``: the public endpoints and the names of the values each takes."""

    _NAMED = re.compile(r"/gradio_api/(?:call/v2|call|run|api)/([^/]+)(?:/.*)?$")

    def __init__(self, app, api_parameters: Callable[[], dict[str, list[str]]]) -> None:
        self.app = app
        self.api_parameters = api_parameters

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            refusal = self._refusal(path)
            if refusal is None and scope["method"] == "POST" and "/gradio_api/call/v2/" in path:
                body, receive = await _read_body(receive)
                refusal = self._keyword_refusal(path, body)
            if refusal is not None:
                status, detail = refusal
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, path: str) -> tuple[int, str] | None:
        if path.rstrip("/").endswith("/gradio_api/upload"):
            return 403, "this app takes no file uploads"
        match = self._NAMED.search(path)
        if match and match.group(1) != "predict":  # /run/predict is the page's route for unqueued events
            names = sorted(self.api_parameters())
            if match.group(1) not in names:
                listed = ", ".join(f"/{name}" for name in names)
                return 404, f"no API endpoint named /{match.group(1)[:60]}; this app's endpoints are {listed}"
        return None

    def _keyword_refusal(self, path: str, body: bytes) -> tuple[int, str] | None:
        try:
            values = json.loads(body)
        except ValueError:
            return None  # Gradio answers a malformed body itself (422)
        name = self._NAMED.search(path).group(1)
        takes = self.api_parameters()[name]
        if not isinstance(values, dict):
            return 400, f"/call/v2/{name} takes a JSON object of named values ({', '.join(takes)})"
        unknown = [key for key in values if key not in takes and key != "oauth_token"]
        if unknown:
            return 400, f"/{name} has no parameter {unknown[0][:60]!r}; it takes {', '.join(takes)}"
        return None


async def _read_body(receive) -> tuple[bytes, Callable]:
    """The whole request body, and a ``receive`` that replays it to the app."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False) and size <= MAX_BODY_BYTES
    body = b"".join(chunks)
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


# ---- the values an endpoint takes -----------------------------------------------------------------


class StrictBlocks(gr.Blocks):
    """``gr.Blocks`` whose public endpoints refuse missing or extra values with the fields named
    (Gradio's own check ignores extra values, and a value sent where the session's state goes).
    Trailing parameters a handler lists in ``optional_parameters`` (name -> default) may be left
    out: clients written before they were added keep working.
    Raised while the request is validated, before it is queued, so the message reaches the client
    as the join's ``detail``."""

    def api_parameters(self) -> dict[str, list[str]]:
        """Each public endpoint's values, in order, as a client sends them (the handler's parameter
        names; session state is kept on the server, not sent)."""
        return {fn.api_name: self._parameter_names(fn) for fn in self.fns.values()
                if fn.api_name and fn.api_visibility == "public"}

    def validate_inputs(self, block_fn, inputs: list[Any]) -> None:
        public = block_fn.api_visibility == "public" or getattr(block_fn, "is_validator_function", False)
        state = [i for i, component in enumerate(block_fn.inputs) if getattr(component, "skip_api", False)]
        sent_state = any(inputs[i] is not None for i in state if i < len(inputs))
        if not public or (len(inputs) == len(block_fn.inputs) and not sent_state):
            return super().validate_inputs(block_fn, inputs)
        names = self._parameter_names(block_fn)
        optional = getattr(self._handler(block_fn).fn, "optional_parameters", {})
        required = [name for name in names if name not in optional]
        missing = names[len(inputs):]
        if missing and not sent_state and len(inputs) >= len(required) and all(name in optional for name in missing):
            # A client written before these parameters existed: their defaults apply (in place:
            # Gradio goes on with this list).
            values = iter([*inputs, *(optional[name] for name in missing)])
            inputs[:] = [None if i in state else next(values) for i in range(len(block_fn.inputs))]
            return super().validate_inputs(block_fn, inputs)
        takes = f"this endpoint takes {len(required)} values ({', '.join(required)})"
        if optional:
            takes += f" and up to {len(optional)} more, each with a default ({', '.join(optional)})"
        takes += f"; got {len(inputs)}"
        if len(inputs) >= len(block_fn.inputs):
            raise ValueError(f"{takes}: too many (the session's history is kept on the server, not sent)"
                             if sent_state and len(inputs) == len(block_fn.inputs) else f"{takes}: too many")
        missing = [name for name in names[len(inputs):] if name not in optional]
        raise ValueError(takes + (f": missing {', '.join(missing)}" if missing else
                                  ": the session's state is missing (send the values through /gradio_api/call/)"))

    def _handler(self, block_fn):
        """The public endpoint a validator belongs to (they share their inputs)."""
        public = (fn for fn in self.fns.values() if fn.api_visibility == "public" and fn.inputs == block_fn.inputs)
        return next(public, block_fn)

    def _parameter_names(self, block_fn) -> list[str]:
        parameters = inspect.signature(self._handler(block_fn).fn).parameters
        return [name for name, component in zip(parameters, block_fn.inputs)
                if not getattr(component, "skip_api", False)]
