"""`LexloraIngress`: the HTTP front of `lexlora serve --ray`. Ray's proxy hands it every request; it
finds the adapter the request names and forwards the request, untouched, to a `LexloraReplica`
with that adapter as the multiplexed model id, so Ray routes it to a replica holding the adapter.

    which adapter   the body's `model` (OpenAI routes) or `adapter` (/generate); POST /adapters' `name`.
                    Ray's proxy sees only headers, so routing by a body field takes this hop.
    answered here   /health, /adapters and /metrics, for every replica at once, from the snapshots they
                    push each second (ray_replica.py): /metrics labels each series with its `replica`.
                    PUT / DELETE /adapters/NAME are refused (405): they would reach one replica of many.
    a replica dies  a request in flight on it is retried once on another replica (generation has no
                    side effects), and a stream whose first bytes were not out yet; a stream cut midway
                    ends with an error event in its protocol's shape. A second failure answers 503
                    with Retry-After. Nothing waits on a dead replica: Ray fails its calls at once.

Auth (`--api-key`) and the body limits are checked here as in `lexlora serve`, and again by the
replica's app, which gets the request's headers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lexlora.serving.asgi_call import ForwardedRequest
from lexlora.serving.auth import BearerAuth, api_key_from
from lexlora.serving.limits import BodyLimits
from lexlora.serving.ray_replica import PUSH_S, board_for
from lexlora.serving.settings import ServeSettings

logger = logging.getLogger(__name__)

REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
STALE_S = 3 * PUSH_S  # a snapshot older than this is a replica that is gone
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, once per request; None for anything else (the replica's app
    answers a malformed body)."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def adapter_named(method: str, path: str, payload: dict[str, Any] | None) -> str:
    """The adapter a request names ("" when none): what Ray routes it by."""
    if path.startswith("/adapters/"):
        return path[len("/adapters/"):]
    if method != "POST" or payload is None:
        return ""
    for key in ("model", "adapter", "name"):
        if isinstance(payload.get(key), str):
            return payload[key]
    return ""


def wants_stream(payload: dict[str, Any] | None) -> bool:
    return payload is not None and payload.get("stream") is True


def _raw(headers: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers if k.lower() not in drop]


def merged_metrics(snapshots: dict[str, dict[str, Any]], own: CollectorRegistry) -> bytes:
    """Every replica's /metrics as one Prometheus text, each sample labelled with its `replica`,
    then the ingress's own series."""
    families: dict[str, Metric] = {}
    for replica, snapshot in sorted(snapshots.items()):
        for family in text_string_to_metric_families(snapshot["metrics"]):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value,
                                  sample.timestamp, sample.exemplar)

    class Snapshots:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshots())
    return generate_latest(registry) + generate_latest(own)


def _error_event(path: str, message: str) -> bytes:
    """A stream cut midway ends with its protocol's error event."""
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_failed"}}
        return f"data: {json.dumps(body)}\n\n".encode()
    return f"event: error\ndata: {json.dumps({'detail': message, 'status': 503})}\n\n".encode()


def _gone(path: str, exc: BaseException) -> Response:
    message = f"the replica serving this request failed twice ({type(exc).__name__}); retry shortly"
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_failed"}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


@serve.deployment(name="LexloraIngress")
@serve.ingress()
class LexloraIngress:
    def __init__(self, replica, settings: ServeSettings):
        self.replica, self.settings = replica, settings
        self.app_name = serve.get_replica_context().app_name
        self.metrics = CollectorRegistry(auto_describe=True)
        self.retries = Counter("lexlora_ray_retries", "Requests retried after their replica failed.",
                               registry=self.metrics)
        self.failures = Counter("lexlora_ray_replica_failures",
                                "Requests whose replica failed past the retry: answered 503, or a stream cut.",
                                ("outcome",), registry=self.metrics)
        self._board = None

    def __serve_build_asgi_app__(self):
        app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.scrape, methods=["GET"]),
            Route("/adapters", self.resident, methods=["GET"]),
            Route("/{path:path}", self.forward, methods=METHODS),
        ])
        asgi = BodyLimits(app, max_bytes=self.settings.max_body_bytes, timeout_s=self.settings.body_timeout_s)
        key = api_key_from(self.settings.api_key)
        return BearerAuth(asgi, api_key=key) if key is not None else asgi

    # ---- answered for every replica ------------------------------------------------------------------
    async def snapshots(self) -> dict[str, dict[str, Any]]:
        for _ in range(2):
            try:
                if self._board is None:
                    self._board = board_for(self.app_name)
                return await self._board.fresh.remote(STALE_S)
            except REPLICA_GONE:
                self._board = None
        return {}

    async def health(self, request: Request) -> Response:
        snapshots = await self.snapshots()
        replicas = [{"replica": r, "actor": s["actor"], "node": s["node"], **s["health"]}
                    for r, s in sorted(snapshots.items())]
        body = {"status": "ok" if replicas else "starting", "replicas": replicas,
                "adapters": sum(r.get("adapters", 0) for r in replicas)}
        return JSONResponse(body, status_code=200 if replicas else 503)

    async def scrape(self, request: Request) -> Response:
        return Response(merged_metrics(await self.snapshots(), self.metrics),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def resident(self, request: Request) -> Response:
        snapshots = await self.snapshots()
        adapters: dict[str, dict[str, Any]] = {}
        for replica, snapshot in sorted(snapshots.items()):
            for info in snapshot["adapters"]:
                adapters.setdefault(info["name"], {**info, "replicas": []})["replicas"].append(replica)
        return JSONResponse({"adapters": [adapters[n] for n in sorted(adapters)]})

    # ---- forwarded to a replica ----------------------------------------------------------------------
    async def forward(self, request: Request) -> Response:
        path = request.url.path
        if request.method in ("PUT", "DELETE") and path.startswith("/adapters/"):
            return JSONResponse({"detail": (
                f"{request.method} {path}: not with --ray, where each replica holds its own copy and a request "
                "reaches one of them. Adapters load on first request on each replica; to change one, save it "
                "under a new name, or redeploy to drop every replica's copy")}, status_code=405)
        body = await request.body()
        forwarded = ForwardedRequest(request.method, path, request.url.query.encode(),
                                     list(request.headers.items()), body)
        payload = json_object(body)
        name = adapter_named(request.method, path, payload) if self.settings.multiplex else ""
        handle = self.replica.options(multiplexed_model_id=name) if name else self.replica
        if wants_stream(payload):
            return await self._stream(handle, forwarded)
        answer = await self._retried(path, lambda: handle.forward.remote(forwarded))
        if isinstance(answer, Response):
            return answer
        status, headers, content = answer
        response = Response(content, status_code=status)
        response.raw_headers = _raw(headers)
        return response

    async def _retried(self, path: str, call):
        """`await call()`, made again once if its replica failed; a 503 Response if it failed twice."""
        for attempt in (1, 2):
            try:
                return await call()
            except REPLICA_GONE as exc:
                if attempt == 2:
                    self.failures.labels(outcome="503").inc()
                    return _gone(path, exc)
                logger.warning("%s: its replica failed (%s); retrying once", path, exc)
                self.retries.inc()

    async def _stream(self, handle, forwarded: ForwardedRequest) -> Response:
        streams = []

        def first_part():  # a new stream each try; its first part (the ResponseStart) awaited
            streams.append(handle.options(stream=True).forward_stream.remote(forwarded))
            return streams[-1].__anext__()

        start = await self._retried(forwarded.path, first_part)
        if isinstance(start, Response):
            return start
        stream = streams[-1]

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            except REPLICA_GONE as exc:
                self.failures.labels(outcome="stream_cut").inc()
                yield _error_event(forwarded.path, f"the replica serving this stream failed ({type(exc).__name__})")
            finally:
                stream.cancel()  # the client left (or it ended): the replica's app sees the disconnect

        response = StreamingResponse(rest(), status_code=start.status)
        response.raw_headers = _raw(start.headers, drop=("content-length",))
        return response
