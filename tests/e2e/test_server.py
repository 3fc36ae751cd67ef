"""A real uvicorn server under load: 32 concurrent clients mixing adapters, clients that send
slowly or not at all, bodies that never complete or grow too large (raw sockets)."""

import json
import random
import socket
import threading
import time

from lexlora.serving import ServeSettings, create_app
from tests.serving import served
from tests.serving.served import (
    DESC_INPUTS,
    FILES_INPUTS,
    SETTINGS,
    assert_still_serving,
    call,
    generate,
    running,
)

adapters, server = served.adapters, served.server


def raw_connection(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)

def read_response(sock):
    """(status, JSON body) of one HTTP/1.1 response read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])

def post_head(length, extra=b""):
    return (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + (b"Content-Length: %d\r\n" % length if length is not None else b"") + b"\r\n")

def test_slow_clients_do_not_block_others(server, adapters):
    url, _ = server
    registry = adapters[2]
    body = json.dumps({"adapter": "desc", "inputs": DESC_INPUTS}).encode()
    slow, silent = raw_connection(url), raw_connection(url)  # silent: connects and sends nothing
    try:
        slow.sendall(post_head(len(body)) + body[:10])  # headers and a little of the body, then nothing
        started = time.monotonic()
        for _ in range(3):  # meanwhile other clients are answered
            assert_still_serving(url, registry)
        assert time.monotonic() - started < SETTINGS.body_timeout_s  # (else the slow one got a 408)
        slow.sendall(body[10:])  # the rest arrives in time: an ordinary answer
        assert read_response(slow) == (200, {"outputs": registry.generate(DESC_INPUTS, adapter="desc")})
    finally:
        slow.close()
        silent.close()

def test_a_body_that_never_completes_times_out_with_408(adapters):
    root, _, registry = adapters
    settings = ServeSettings(body_timeout_s=0.5)
    with running(create_app(registry, root, settings)) as url:
        stalled = raw_connection(url)
        try:
            stalled.sendall(post_head(500) + b'{"adapter": "desc", ')
            assert_still_serving(url, registry)
            status, reply = read_response(stalled)  # once body_timeout_s has passed
            assert status == 408 and reply["detail"] == "the request body did not arrive within 0.5 s"
        finally:
            stalled.close()
        assert_still_serving(url, registry)

def test_an_oversized_chunked_body_is_cut_off_with_413(server, adapters):
    url, _ = server
    sock = raw_connection(url)
    try:
        # 3 x 1000 bytes, no Content-Length to refuse up front; no end chunk: refused while it streams
        sock.sendall(post_head(None, b"Transfer-Encoding: chunked\r\n") + (b"3e8\r\n" + b" " * 1000 + b"\r\n") * 3)
        status, reply = read_response(sock)
        assert status == 413 and "over 2000 bytes" in reply["detail"]
    finally:
        sock.close()
    assert_still_serving(url, adapters[2])

def test_32_concurrent_clients_mixing_adapters(server, adapters):
    """A few hundred requests from 32 threads, mixing the three adapters (and some bad requests):
    no 5xx, every good answer equal to its adapter alone, every bad one its own 4xx."""
    url, _ = server
    registry = adapters[2]
    pool = [("desc", [x]) for x in ("backup_config.json", "setup.py", "notes.txt")] + [
        ("desc", DESC_INPUTS), ("plain", ["a.py"]), ("plain", ["Makefile", "run.sh", "x"]),
        ("files", FILES_INPUTS[:1]), ("files", FILES_INPUTS), ("files", FILES_INPUTS[::-1]),
    ]
    expected = {(name, json.dumps(inputs)): registry.generate(inputs, adapter=name) for name, inputs in pool}
    bad = [({"adapter": "nope", "inputs": ["a"]}, 404), ({"adapter": "desc", "inputs": ["a"] * 9}, 413),
           ({"adapter": "files", "inputs": ["main.c"]}, 422)]
    rng = random.Random(0)
    plan = [rng.choice(pool) if rng.random() > 0.1 else rng.choice(bad) for _ in range(320)]
    before = call(f"{url}/health")[1]
    failures, lock = [], threading.Lock()

    def client(worker):
        for item in plan[worker::32]:
            if isinstance(item[1], int):  # a bad request and its status
                status, reply = call(f"{url}/generate", "POST", item[0])
                ok = status == item[1]
            else:
                status, reply = generate(url, *item)
                ok = status == 200 and reply["outputs"] == expected[(item[0], json.dumps(item[1]))]
            if not ok:
                with lock:
                    failures.append((item, status, reply))

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    elapsed = time.monotonic() - started
    after = call(f"{url}/health")[1]
    assert failures == []
    good = sum(not isinstance(item[1], int) for item in plan)
    assert after["rows"] - before["rows"] == sum(len(item[1]) for item in plan if not isinstance(item[1], int))
    assert after["mixed_batches"] > before["mixed_batches"]  # requests for different adapters really shared calls
    assert after["batches"] - before["batches"] < good  # and were batched
    print(f"{len(plan)} requests ({good} good) from 32 clients in {elapsed:.1f}s, "
          f"{after['batches'] - before['batches']} model calls")
