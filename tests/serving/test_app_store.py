"""The app over its adapter store, through HTTP: adapters load on first request without holding up
the others, PUT replaces one atomically (a request in flight finishes on the old weights), /generate
streams server-sent events, /metrics is a Prometheus scrape of what happened, and --api-key guards
every route but /health."""

import dataclasses
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lexlora.serving import create_app
from lexlora.serving.registry import LexLoRA
from tests.conftest import tiny_model_config
from tests.serving import served
from tests.serving.served import DESC_INPUTS, SETTINGS, call, generate, running

adapters = served.adapters
LONG = {"min_new_tokens": 40, "max_new_tokens": 40}


@pytest.fixture()
def fresh(adapters, tmp_path):
    """(url, app, root) of an app with nothing loaded over a copy of desc, plain and extra."""
    src_root, spare, _ = adapters
    root = tmp_path / "root"
    for name in ("desc", "plain"):
        shutil.copytree(src_root / name, root / name)
    shutil.copytree(spare / "extra", root / "swap")
    app = create_app(LexLoRA.from_config(tiny_model_config()), root, SETTINGS)
    with running(app) as url:
        yield url, app, root


def test_a_cold_load_holds_up_only_its_own_request(fresh, adapters, monkeypatch):
    url, app, _ = fresh
    registry, reference = app.state.registry, adapters[2]
    assert generate(url, "desc", DESC_INPUTS)[1]["outputs"] == reference.generate(DESC_INPUTS, adapter="desc")
    gate, started = threading.Event(), threading.Event()
    real = registry.build_adapter

    def slow_build(path, name, **kwargs):
        started.set()
        gate.wait(20)
        return real(path, name, **kwargs)

    monkeypatch.setattr(registry, "build_adapter", slow_build)
    cold = {}
    thread = threading.Thread(target=lambda: cold.update(answer=generate(url, "plain", DESC_INPUTS)))
    thread.start()
    assert started.wait(10)
    for _ in range(3):  # the warm adapter keeps answering while plain's load is stuck
        assert generate(url, "desc", DESC_INPUTS[:1])[0] == 200
    assert thread.is_alive()
    gate.set()
    thread.join(30)
    assert cold["answer"] == (200, {"outputs": reference.generate(DESC_INPUTS, adapter="plain")})


def test_put_replaces_an_adapter_atomically(fresh, adapters):
    url, app, root = fresh
    old = generate(url, "swap", DESC_INPUTS, **LONG)[1]["outputs"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=generate(url, "swap", DESC_INPUTS, **LONG)))
    with app.state.worker.paused():  # the request is decoding (or queued) when the weights change
        thread.start()
        deadline = time.monotonic() + 10
        while app.state.worker.pending + app.state.worker.active_rows == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        shutil.rmtree(root / "swap")
        shutil.copytree(root / "plain", root / "swap")
        status, info = call(f"{url}/adapters/swap", "PUT")
        assert status == 200 and info["name"] == "swap"
    thread.join(30)
    assert result["answer"] == (200, {"outputs": old})  # finished on the weights it started with
    new = generate(url, "swap", DESC_INPUTS, **LONG)[1]["outputs"]
    assert new == generate(url, "plain", DESC_INPUTS, **LONG)[1]["outputs"] and new != old
    assert call(f"{url}/adapters/nope", "PUT")[0] == 404
    (root / "swap" / "lexlora.json").write_text("{")
    status, body = call(f"{url}/adapters/swap", "PUT")
    assert status == 422 and "not valid JSON" in body["detail"]
    assert generate(url, "swap", DESC_INPUTS, **LONG)[1]["outputs"] == new  # a failed PUT changes nothing


def sse_events(url, body):
    request = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    events, event = [], {}
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if event:
                    events.append((event.get("event"), json.loads(event["data"])))
                event = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                event[key] = value
    return events


def test_generate_streams_tokens_then_the_outputs(fresh, adapters):
    url, _, _ = fresh
    wanted = adapters[2].generate(DESC_INPUTS, adapter="desc", max_new_tokens=12)
    events = sse_events(url, {"adapter": "desc", "inputs": DESC_INPUTS, "max_new_tokens": 12, "stream": True})
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) > 3
    texts = ["", ""]
    for kind, data in events[:-1]:
        texts[data["index"]] += data["text"]
    done = events[-1][1]
    assert texts == wanted and done["outputs"] == wanted
    assert done["usage"]["completion_tokens"] > 0 and set(done["finish_reasons"]) <= {"stop", "length"}
    assert call(f"{url}/generate", "POST", {"adapter": "nope", "inputs": ["a"], "stream": True})[0] == 404


def scrape(url):
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_loads_and_failures(fresh):
    url, _, root = fresh
    (root / "broken").mkdir()
    (root / "broken" / "lexlora.json").write_text("{")
    for _ in range(3):
        assert generate(url, "desc", DESC_INPUTS)[0] == 200
    assert generate(url, "nope", ["a"])[0] == 404
    assert generate(url, "broken", ["a"])[0] == 422
    assert generate(url, "desc", [{"wrong": "field"}])[0] == 422
    samples = scrape(url)

    def value(name, **labels):
        return samples.get((name, frozenset(labels.items())))

    assert value("lexlora_requests_total", adapter="desc", route="/generate", status="200") == 3
    assert value("lexlora_requests_total", adapter="desc", route="/generate", status="422") == 1
    assert value("lexlora_requests_total", adapter="(none)", route="/generate", status="404") == 1
    assert value("lexlora_requests_total", adapter="(none)", route="/generate", status="422") == 1
    assert value("lexlora_generation_tokens_total", adapter="desc") > 0
    assert value("lexlora_prompt_tokens_total", adapter="desc") > 0
    assert value("lexlora_adapter_loads_total") == 1 and value("lexlora_adapter_load_failures_total") == 2
    assert value("lexlora_resident_adapters") == 1 and value("lexlora_resident_adapter_bytes") > 0
    assert value("lexlora_adapter_load_seconds_count") == 1
    assert value("lexlora_time_to_first_token_seconds_count", route="/generate") == 3
    assert value("lexlora_request_duration_seconds_count", route="/generate") == 6
    assert value("lexlora_queue_depth") == 0 and value("lexlora_active_rows") == 0


def test_api_key_guards_every_route_but_health(adapters, tmp_path):
    src_root, _, _ = adapters
    root = tmp_path / "root"
    shutil.copytree(src_root / "desc", root / "desc")
    app = create_app(LexLoRA.from_config(tiny_model_config()), root, dataclasses.replace(SETTINGS, api_key="s3cret"))
    with running(app) as url:
        assert call(f"{url}/health")[0] == 200
        for path in ("/adapters", "/metrics", "/v1/models"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}{path}", timeout=10)
            assert refused.value.code == 401
        assert generate(url, "desc", ["a.py"])[0] == 401
        request = urllib.request.Request(f"{url}/generate", method="POST", data=b'{"adapter": "desc", "inputs": ["a"]}',
                                         headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert "desc" in [m.id for m in client.models.list().data]


def test_a_request_failing_midway_is_counted_once(fresh):
    url, app, _ = fresh
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=generate(url, "swap", DESC_INPUTS, **LONG)))
    thread.start()
    deadline = time.monotonic() + 10
    while app.state.worker.active_rows == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert call(f"{url}/adapters/swap", "DELETE")[0] == 200  # its rows fail at the next step
    thread.join(30)
    assert result["answer"][0] == 404
    samples = scrape(url)
    assert samples[("lexlora_requests_total", frozenset({"adapter": "swap", "route": "/generate", "status": "404"}.items()))] == 1
