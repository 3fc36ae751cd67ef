"""Request body limits of `lexlora serve` (`max_body_bytes`, `body_timeout_s`), enforced before the
app parses anything. A slow client holds only its own connection: the event loop serves the others
meanwhile."""

import asyncio
import json


class BodyLimits:
    """ASGI middleware: reads each request body before the app sees it, answering 413 for one over
    `max_bytes` (from Content-Length at once, or as it streams) and 408 for one still incomplete
    `timeout_s` after the request started. Reading is async: a slow body ties up no thread, and
    the app then gets the whole body in one message."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _reply(send, 413, f"request body of {int(length)} bytes; at most {self.max_bytes}")
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                return await _reply(send, 408, f"the request body did not arrive within {self.timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return  # the client left: nothing to answer
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _reply(send, 413, f"request body over {self.max_bytes} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the disconnect, as the app expects

        await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})
