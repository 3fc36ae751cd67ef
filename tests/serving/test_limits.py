"""`BodyLimits` as plain ASGI, without a server: what reaches the app, and what is answered for it.
(tests/e2e/test_server.py sends the same over real sockets.)"""

import asyncio
import json

from lexlora.serving.limits import BodyLimits


def run(messages, max_bytes=100, timeout_s=5.0, headers=()):
    """(what the app received, [(status, detail)] sent by the middleware) for a request whose body
    arrives as `messages` (then the receive waits forever)."""
    received, sent = [], []

    async def app(scope, receive, send):
        received.append(await receive())

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": list(headers)}
    asyncio.run(BodyLimits(app, max_bytes=max_bytes, timeout_s=timeout_s)(scope, receive, send))
    replies = [(sent[0]["status"], json.loads(sent[1]["body"])["detail"])] if sent else []
    return received, replies


def chunk(body, more=True):
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_in_chunks_reaches_the_app_whole():
    received, replies = run([chunk(b'{"a": '), chunk(b"1}", more=False)])
    assert received == [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}] and replies == []


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    received, replies = run([chunk(b"x", more=False)], headers=[(b"content-length", b"101")])
    assert received == [] and replies == [(413, "request body of 101 bytes; at most 100")]


def test_a_streamed_body_over_the_limit_is_cut_off():
    received, replies = run([chunk(b"x" * 60), chunk(b"x" * 60)])
    assert received == [] and replies == [(413, "request body over 100 bytes")]


def test_a_body_that_stops_arriving_gets_408():
    received, replies = run([chunk(b"{")], timeout_s=0.05)
    assert received == [] and replies == [(408, "the request body did not arrive within 0.05 s")]


def test_a_client_that_leaves_gets_no_answer():
    received, replies = run([chunk(b"{"), {"type": "http.disconnect"}])
    assert received == [] and replies == []
