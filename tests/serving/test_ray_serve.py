"""`lexlora serve --ray` on a local Ray cluster this module starts and stops (loopback only): two
replicas of tiny models behind the ingress, against the single-process server on the same adapters."""

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray")  # CI installs it with the test extra
from ray import serve  # noqa: E402

from lexlora.serving.ray_app import build_app  # noqa: E402
from lexlora.serving.ray_replica import REPLICA_HEADER  # noqa: E402
from tests.serving import served  # noqa: E402
from tests.serving.served import DESC_INPUTS, FILES_INPUTS, SETTINGS  # noqa: E402

adapters, server = served.adapters, served.server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send(url, path, body=None, timeout=60):
    """(status, headers, parsed JSON body or text)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers), exc.read()
    text = raw.decode()
    try:
        return status, headers, json.loads(text)
    except ValueError:
        return status, headers, text


def replica_of(headers) -> str:
    return {k.lower(): v for k, v in headers.items()}[REPLICA_HEADER]


def wait_for(predicate, what, timeout=90.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def ray_url(adapters):
    root = adapters[0]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = dataclasses.replace(SETTINGS, adapters_dir=root, replicas=2, replica_cpus=1)
        serve.run(build_app(settings), name="lexlora", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: len(send(url, "/health")[2].get("replicas", [])) == 2, "both replicas' first snapshot")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_requests_for_one_adapter_go_to_the_replica_holding_it_and_match_one_process(ray_url, server):
    single_url = server[0]
    for adapter, inputs in (("desc", DESC_INPUTS), ("plain", DESC_INPUTS[:1]), ("files", FILES_INPUTS)):
        body = {"adapter": adapter, "inputs": inputs}
        status, headers, first = send(ray_url, "/generate", body)
        assert status == 200, first
        time.sleep(1.0)  # the replica reports holding it within 0.1 s; Ray's routers learn it next
        replicas = set()
        for _ in range(6):
            status, headers, answer = send(ray_url, "/generate", body)
            assert status == 200 and answer["outputs"] == first["outputs"]
            replicas.add(replica_of(headers))
        assert replicas == {replica_of(headers)}, f"{adapter} was answered by {replicas}"
        assert send(single_url, "/generate", body)[2]["outputs"] == first["outputs"]

    completion = {"model": "desc", "prompt": DESC_INPUTS[0], "max_tokens": 5}
    status, _, via_ray = send(ray_url, "/v1/completions", completion)
    assert status == 200 and via_ray["choices"][0]["text"] == send(single_url, "/v1/completions", completion)[2][
        "choices"][0]["text"]
    # A stream comes through the ingress chunk by chunk and ends as the single process's does.
    status, _, text = send(ray_url, "/v1/completions", {**completion, "stream": True})
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == via_ray["choices"][0]["text"]

    # Errors are the app's own, through Ray.
    assert send(ray_url, "/generate", {"adapter": "nope", "inputs": ["a.py"]})[0] == 404
    assert send(ray_url, "/generate", {"adapter": "broken", "inputs": ["a.py"]})[0] == 422
    status, _, body = send(ray_url, "/v1/models")
    assert status == 200 and {"desc", "plain", "files"} <= {m["id"] for m in body["data"]}


def test_python_callers_generate_through_a_replica_handle(ray_url, adapters):
    from lexlora.serving.ray_replica import ReplicaRequestError

    registry = adapters[2]
    handle = serve.get_deployment_handle("LexloraReplica", app_name="lexlora")
    answer = handle.options(multiplexed_model_id="desc").generate.remote("desc", DESC_INPUTS).result(timeout_s=60)
    assert answer["outputs"] == registry.generate(DESC_INPUTS, adapter="desc")
    with pytest.raises(ReplicaRequestError) as refused:
        handle.options(multiplexed_model_id="nope").generate.remote("nope", ["a.py"]).result(timeout_s=60)
    assert refused.value.status == 404 and "nope" in refused.value.detail


def test_health_adapters_and_metrics_cover_every_replica(ray_url):
    send(ray_url, "/generate", {"adapter": "desc", "inputs": DESC_INPUTS[:1]})
    time.sleep(1.5)  # a snapshot is pushed every second
    status, _, health = send(ray_url, "/health")
    assert status == 200 and health["status"] == "ok" and len(health["replicas"]) == 2
    ids = {r["replica"] for r in health["replicas"]}
    _, _, resident = send(ray_url, "/adapters")
    desc = next(a for a in resident["adapters"] if a["name"] == "desc")
    assert set(desc["replicas"]) <= ids and desc["replicas"]
    _, _, text = send(ray_url, "/metrics")
    labelled = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("lexlora_resident_adapters{")}
    assert labelled == ids
    assert "lexlora_adapter_cache_hits_total{" in text and "lexlora_ray_retries_total" in text
    # Changing one replica's copy would leave the others stale: refused with the reason.
    request = urllib.request.Request(ray_url + "/adapters/desc", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 405 and "--ray" in json.loads(refused.value.read())["detail"]


def test_a_killed_replica_is_restarted_and_no_request_hangs(ray_url):
    _, _, health = send(ray_url, "/health")
    before = {r["replica"]: r["actor"] for r in health["replicas"]}
    statuses, stop = [], threading.Event()
    lock = threading.Lock()

    def load(adapter, inputs):
        while not stop.is_set():
            try:
                status = send(ray_url, "/generate", {"adapter": adapter, "inputs": inputs}, timeout=60)[0]
            except OSError as exc:  # a timeout is a hang
                status = repr(exc)
            with lock:
                statuses.append((time.monotonic(), status))

    work = (("desc", DESC_INPUTS[:1]), ("plain", DESC_INPUTS[:1]), ("desc", DESC_INPUTS), ("files", FILES_INPUTS[:1]))
    threads = [threading.Thread(target=load, args=w) for w in work]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(statuses) >= 8, "requests under load")
    # The replica holding desc (two of the four clients' adapter) has requests in flight when it dies.
    victim = next(a for a in send(ray_url, "/adapters")[2]["adapters"] if a["name"] == "desc")["replicas"][0]
    ray.kill(ray.get_actor(before[victim], namespace="serve"))
    killed_at = time.monotonic()

    def replaced():
        replicas = {r["replica"] for r in send(ray_url, "/health")[2].get("replicas", [])}
        return len(replicas) == 2 and victim not in replicas

    wait_for(replaced, "Ray to start a replica in place of the killed one", timeout=120)
    restarted_at = time.monotonic()
    wait_for(lambda: sum(t > restarted_at and s == 200 for t, s in list(statuses)) >= 8, "requests after the restart")
    stop.set()
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads)
    # Every request was answered: 200, or (its replica died and so did the retry) a 503.
    assert {s for _, s in statuses} <= {200, 503}, sorted({str(s) for _, s in statuses})
    assert sum(s == 200 for t, s in statuses if t > killed_at) >= 8
    # Those in flight on it were retried on the other replica (the ingress counts each).
    _, _, text = send(ray_url, "/metrics")
    retried = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("lexlora_ray_retries_total"))
    assert retried >= 1


def test_ray_flag_without_ray_says_what_to_install(adapters):
    code = ("import sys; sys.modules['ray'] = None; from lexlora.cli import main; "
            f"sys.exit(main(['serve', '--ray', '--adapters', {str(adapters[0])!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'pip install "lexlora[ray]"' in result.stderr and "Traceback" not in result.stderr
