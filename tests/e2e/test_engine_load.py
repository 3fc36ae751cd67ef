"""The continuous engine behind a real uvicorn server: 64 concurrent clients mixing adapters, clients
that disconnect mid-request, a full queue (503 + Retry-After at once), and the sampling / stop
options over HTTP."""

import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from lexlora.serving import create_app
from lexlora.serving.decoding import SamplingParams
from tests.helpers import wait_until
from tests.serving import served
from tests.serving.served import (
    DESC_INPUTS,
    FILES_INPUTS,
    SETTINGS,
    call,
    fire,
    generate,
    running,
    wait_pending,
)

adapters, server = served.adapters, served.server

MORE = ["notes.txt", "LICENSE", "a_module.py", "x", "Makefile.am", "run.sh"]


def health(url):
    status, body = call(f"{url}/health")
    assert status == 200
    return body




def test_64_concurrent_clients_mixing_adapters_get_registry_generate_outputs(server, adapters):
    url, app = server
    registry = adapters[2]
    requests = []
    for i in range(64):
        adapter = ("desc", "plain", "files")[i % 3]
        if adapter == "files":
            inputs = [FILES_INPUTS[i % 2], {"file": MORE[i % len(MORE)], "directory": "lib"}][: 1 + i % 2]
        else:
            inputs = [MORE[(i + k) % len(MORE)] for k in range(1 + i % 4)]
        requests.append((adapter, inputs))
    wanted = [registry.generate(inputs, adapter=adapter) for adapter, inputs in requests]
    mixed_before = app.state.worker.stats["mixed_batches"]
    threads, results = fire(url, requests)
    for thread in threads:
        thread.join(60)
    assert [results.get(i) for i in range(64)] == [(200, {"outputs": w}) for w in wanted]
    assert app.state.worker.stats["mixed_batches"] > mixed_before  # they really shared steps
    assert health(url)["active_rows"] == 0


def raw_request(url, body):
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def test_clients_that_disconnect_free_their_rows(server, adapters):
    url, app = server
    registry = adapters[2]
    worker = app.state.worker
    long = {"adapter": "plain", "inputs": DESC_INPUTS, "min_new_tokens": 512, "max_new_tokens": 512}
    rows_before = worker.stats["rows"]
    sockets = [raw_request(url, long) for _ in range(3)]
    try:
        wait_until(lambda: health(url)["active_rows"] == 6, "the long requests to decode")
    finally:
        for sock in sockets:
            sock.close()  # gone mid-request
    wait_until(lambda: health(url)["active_rows"] == 0, "the disconnected clients' rows to be dropped")
    assert health(url)["pending"] == 0
    assert generate(url, "desc", DESC_INPUTS) == (200, {"outputs": registry.generate(DESC_INPUTS, adapter="desc")})
    assert worker.stats["rows"] == rows_before + 2  # the dropped rows never finished; the new request's did


def post(url, body):
    """(status, JSON body, headers)."""
    request = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def test_a_full_queue_answers_503_with_retry_after_at_once(adapters):
    root, _, registry = adapters
    app = create_app(registry, root, dataclasses.replace(SETTINGS, max_queue=2))
    with running(app) as url:
        worker = app.state.worker
        with worker.paused():
            threads, results = fire(url, [("desc", DESC_INPUTS), ("plain", DESC_INPUTS)])
            wait_pending(worker, 2)
            started = time.monotonic()
            status, body, headers = post(url, {"adapter": "desc", "inputs": DESC_INPUTS})
            assert time.monotonic() - started < 2
            assert status == 503 and "retry" in body["detail"]
            assert int(headers["Retry-After"]) >= 1
        for thread in threads:
            thread.join(30)
        assert results == {0: (200, {"outputs": registry.generate(DESC_INPUTS, adapter="desc")}),
                           1: (200, {"outputs": registry.generate(DESC_INPUTS, adapter="plain")})}
        assert post(url, {"adapter": "desc", "inputs": DESC_INPUTS})[0] == 200  # room again


def test_sampling_with_a_seed_is_reproducible_over_http(server, adapters):
    url, app = server
    options = {"do_sample": True, "temperature": 2.0, "top_k": 40, "seed": 11}
    first = generate(url, "desc", MORE[:4], **options)
    assert first[0] == 200
    assert generate(url, "desc", MORE[:4], **options) == first
    # the same settings straight into the engine give the same tokens: HTTP passes every option on
    params = SamplingParams(do_sample=True, temperature=2.0, top_k=40, seed=11)
    assert app.state.worker.generate("desc", MORE[:4], params, timeout=60) == first[1]["outputs"]
    assert first[1]["outputs"] != adapters[2].generate(MORE[:4], adapter="desc")
    assert generate(url, "desc", MORE[:4], **{**options, "seed": 12}) != first


def test_stop_strings_over_http(server, adapters):
    url, _ = server
    registry = adapters[2]
    full = registry.generate(DESC_INPUTS[:1], adapter="desc", max_new_tokens=12)[0]
    stop = full.split()[2][:3]
    status, body = generate(url, "desc", DESC_INPUTS[:1], max_new_tokens=12, stop=[stop])
    assert status == 200 and body["outputs"] == [full[: full.find(stop)].strip()]
    assert len(body["outputs"][0]) < len(full)


@pytest.mark.parametrize("options, field", [
    ({"temperature": 0}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"do_sample": True, "num_beams": 2}, "do_sample"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_options_get_422_naming_the_field(server, options, field):
    url, _ = server
    status, body = generate(url, "desc", DESC_INPUTS[:1], **options)
    assert status == 422 and field in body["detail"]
