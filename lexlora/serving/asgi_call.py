"""`call_app`: one HTTP request run through an ASGI app in this process, with no socket. A Ray Serve
replica (ray_replica.py) answers what its ingress forwards through the same lexlora app that
`lexlora serve` runs under uvicorn, so both answer every route alike.

    async for part in call_app(app, request):   # ResponseStart first, then body chunks (bytes)

The request body arrives whole (the ingress has read and bounded it). Closing the iterator early
(the client left) tells the app so as uvicorn would, with `http.disconnect`, and lets it finish its
own clean-up (freeing its rows, releasing its adapter) instead of being cancelled midway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

_DONE = object()
logger = logging.getLogger(__name__)


@dataclass
class ForwardedRequest:
    """What an ingress passes on: plain values, so that Ray can pickle it."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


async def call_app(app: Callable, request: ForwardedRequest,
                   extra_headers: list[tuple[str, str]] = ()) -> AsyncIterator[ResponseStart | bytes]:
    """The app's answer to `request`: its ResponseStart (with `extra_headers` added), then its body
    chunks. An app that raises before answering gives a 500, as uvicorn would."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method.upper(), "scheme": "http", "path": request.path,
        "raw_path": request.path.encode(), "query_string": request.query, "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {},
    }
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()  # later calls wait for the client to leave, as they do under a server
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(_DONE)

    task = asyncio.create_task(run())
    started = finished = False
    try:
        while not finished:
            message = await messages.get()
            if message is _DONE:
                break
            if message["type"] == "http.response.start":
                started = True
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield ResponseStart(int(message["status"]), headers + list(extra_headers))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                finished = not message.get("more_body", False)
        if not finished:
            await task  # ended without a whole answer: raise what the app raised
            raise RuntimeError("the app returned without a whole response")
    except Exception:
        if started:  # part of an answer is out: the caller must cut it off
            raise
        logger.exception("%s %s failed before answering", request.method, request.path)
        yield ResponseStart(500, [("content-type", "application/json"), *extra_headers])
        yield b'{"detail": "internal error; see the replica log"}'
    finally:
        gone.set()
        if not task.done():  # the caller stopped early: let the app see the disconnect and finish
            await asyncio.wait({task}, timeout=30)
        if task.done() and not task.cancelled() and task.exception() is not None and finished:
            # Starlette re-raises a handled error after sending its 500: it is logged, not raised again.
            logger.debug("%s %s: %r after its answer", request.method, request.path, task.exception())
