"""The parts of `lexlora serve --ray` that need no cluster: the in-process ASGI call, what the
ingress routes by, the merged /metrics, and the replica options settings give."""

import asyncio
import json

import pytest

pytest.importorskip("ray")

from prometheus_client import CollectorRegistry, Counter  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from lexlora.cli_parser import _min_max  # noqa: E402
from lexlora.errors import ConfigError  # noqa: E402
from lexlora.serving.asgi_call import ForwardedRequest, ResponseStart, call_app  # noqa: E402
from lexlora.serving.ray_app import ingress_options, replica_options, require_ray  # noqa: E402
from lexlora.serving.ray_ingress import adapter_named, json_object, merged_metrics, wants_stream  # noqa: E402
from lexlora.serving.settings import ServeSettings  # noqa: E402


def collect(app, request, extra=()):
    async def run():
        return [part async for part in call_app(app, request, list(extra))]
    return asyncio.run(run())


def test_call_app_gives_the_start_then_the_body_and_adds_headers():
    async def echo(request):
        return JSONResponse({"body": (await request.body()).decode(), "q": request.query_params.get("q"),
                             "auth": request.headers.get("authorization")}, status_code=201)

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    parts = collect(app, ForwardedRequest("POST", "/echo", b"q=1", [("Authorization", "Bearer k")], b"hello"),
                    [("x-lexlora-replica", "r1")])
    start, body = parts[0], b"".join(parts[1:])
    assert isinstance(start, ResponseStart) and start.status == 201 and start.header("x-lexlora-replica") == "r1"
    assert json.loads(body) == {"body": "hello", "q": "1", "auth": "Bearer k"}


def test_call_app_streams_chunks_and_tells_an_abandoned_app_the_client_left():
    seen = []

    async def events(request):
        async def chunks():
            for i in range(100):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.01)
        response = StreamingResponse(chunks(), media_type="text/event-stream")
        return response

    async def watch(scope, receive, send):  # the app that records the disconnect it is told of
        async def spy():
            message = await receive()
            seen.append(message["type"])
            return message
        await Starlette(routes=[Route("/s", events)])(scope, spy, send)

    async def run():
        got = []
        stream = call_app(watch, ForwardedRequest("GET", "/s"))
        async for part in stream:
            got.append(part)
            if len(got) == 3:
                break
        await stream.aclose()
        return got

    got = asyncio.run(run())
    assert got[0].status == 200 and got[1:] == [b"data: 0\n\n", b"data: 1\n\n"]
    assert "http.disconnect" in seen


def test_an_app_that_raises_before_answering_is_a_500():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    parts = collect(broken, ForwardedRequest("GET", "/x"), [("x-lexlora-replica", "r")])
    assert parts[0].status == 500 and parts[0].header("x-lexlora-replica") == "r"
    assert "internal error" in json.loads(b"".join(parts[1:]))["detail"]


@pytest.mark.parametrize("method,path,body,name", [
    ("POST", "/v1/completions", b'{"model": "file-type", "prompt": "a"}', "file-type"),
    ("POST", "/generate", b'{"adapter": "desc", "inputs": ["a"]}', "desc"),
    ("POST", "/adapters", b'{"name": "extra"}', "extra"),
    ("PUT", "/adapters/org/name@v1", b"", "org/name@v1"),
    ("POST", "/generate", b'{"adapter": "desc", "inputs": [', ""),  # malformed: the replica answers it
    ("POST", "/generate", b'["desc"]', ""),
    ("GET", "/v1/models", b"", ""),
])
def test_the_ingress_routes_by_the_adapter_the_request_names(method, path, body, name):
    assert adapter_named(method, path, json_object(body)) == name


def test_wants_stream_only_for_a_true_stream_field():
    assert wants_stream(json_object(b'{"stream": true}')) and not wants_stream(json_object(b'{"stream": "yes"}'))
    assert not wants_stream(json_object(b"{")) and not wants_stream(json_object(b""))
    assert not wants_stream(json_object(b'[{"stream": true}]'))


def test_merged_metrics_label_every_sample_with_its_replica():
    def replica_text(value):
        registry = CollectorRegistry()
        Counter("lexlora_requests", "Requests.", ("adapter",), registry=registry).labels(adapter="a").inc(value)
        from prometheus_client import generate_latest
        return generate_latest(registry).decode()

    own = CollectorRegistry()
    Counter("lexlora_ray_retries", "Retries.", registry=own).inc(2)
    text = merged_metrics({"r1": {"metrics": replica_text(3)}, "r2": {"metrics": replica_text(5)}}, own).decode()
    assert 'lexlora_requests_total{adapter="a",replica="r1"} 3.0' in text
    assert 'lexlora_requests_total{adapter="a",replica="r2"} 5.0' in text
    assert text.count("# TYPE lexlora_requests_total counter") == 1 and "lexlora_ray_retries_total 2.0" in text


def test_replica_options_follow_the_settings_and_the_cluster():
    options = replica_options(ServeSettings(replicas=3, replica_cpus=2, max_batch_rows=16))
    assert options["num_replicas"] == 3
    assert {k: options["ray_actor_options"][k] for k in ("num_cpus", "num_gpus")} == {"num_cpus": 2, "num_gpus": 0.0}
    assert options["max_ongoing_requests"] == 16
    on_gpus = replica_options(ServeSettings(), gpus_in_cluster=4)  # one replica per GPU
    assert on_gpus["num_replicas"] == 4 and on_gpus["ray_actor_options"]["num_gpus"] == 1.0
    scaled = replica_options(ServeSettings(autoscale=(1, 4)))
    assert "num_replicas" not in scaled and scaled["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(ConfigError, match="give one"):
        replica_options(ServeSettings(replicas=2, autoscale=(1, 4)))


def test_the_ingress_reserves_no_cpu_and_scales_by_its_own_count():
    options = ingress_options(ServeSettings(ingress_replicas=3))
    assert options["num_replicas"] == 3 and options["ray_actor_options"]["num_cpus"] == 0
    with pytest.raises(ConfigError, match="ingress-replicas"):
        ingress_options(ServeSettings(ingress_replicas=0))


def test_autoscale_is_parsed_as_min_max():
    assert _min_max("1:4") == (1, 4) and _min_max("0:2") == (0, 2)
    for bad in ("4:1", "3", "a:b", "0:0"):
        with pytest.raises(Exception, match="MIN:MAX"):
            _min_max(bad)


def test_require_ray_names_the_extra_when_ray_is_missing(monkeypatch):
    import sys

    require_ray()  # installed here
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r'pip install "lexlora\[ray\]"'):
        require_ray()
