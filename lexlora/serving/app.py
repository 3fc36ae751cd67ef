"""`create_app`: the HTTP JSON API of `lexlora serve` over a `LexLoRA` registry (one frozen base,
many adapters).

    lexlora serve --adapters adapters/ --port 8000
    curl localhost:8000/adapters
    curl -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"adapter": "file-description", "inputs": ["backup_config.json"]}'
    curl -X POST localhost:8000/adapters -d '{"name": "file-type"}'      # load adapters/file-type now
    curl -X PUT localhost:8000/adapters/file-type                        # reload it from disk, atomically
    curl -X DELETE localhost:8000/adapters/file-type
    curl localhost:8000/metrics                                          # Prometheus text format

A request passes `BearerAuth` (auth.py, with --api-key) and `BodyLimits` (limits.py), is parsed and
checked (schemas.py; openai_api.py for the OpenAI routes), then runs through the
`GenerationService` (service.py): the `AdapterStore` (store.py) makes its adapter resident, loading
it on first use, and the `Engine` (engine.py) decodes it alongside whatever else is running, joining
at the next decoder step; `--engine static` (or a base the engine cannot run) uses the `Batcher`
(batcher.py) instead, one mixed-adapter batch at a time. A full queue answers 503 with Retry-After at
once; a client that disconnects frees its rows at the next step.
Clients only ever name adapters; paths are never taken from a request. OpenAPI schema at
/openapi.json, docs at /docs.
"""

import json
import logging
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from lexlora.errors import AdapterError, LexloraError, RequestError
from lexlora.serving.auth import BearerAuth, api_key_from
from lexlora.serving.batcher import Batcher
from lexlora.serving.engine import Engine
from lexlora.serving.limits import BodyLimits
from lexlora.serving.metrics import ServerMetrics
from lexlora.serving.openai_api import openai_router
from lexlora.serving.registry import LexLoRA
from lexlora.serving.running import engine_supports
from lexlora.serving.schemas import (
    AdapterInfo,
    AdapterList,
    DeleteResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    LoadRequest,
    SkippedAdapter,
    error_responses,
    parse_generate_request,
    validation_message,
)
from lexlora.serving.service import ExclusiveModel, GenerationService, ServiceError, Stream
from lexlora.serving.settings import ServeSettings
from lexlora.serving.store import AdapterNotFound, AdapterStore
from lexlora.version import __version__

logger = logging.getLogger(__name__)


def create_app(
    registry: LexLoRA, adapters_dir: str | Path | None, settings: ServeSettings | None = None,
    skipped: Mapping[str, str] | None = None,
) -> FastAPI:
    """The app serving adapters on `registry`'s base: dirs directly under `adapters_dir` (and Hub
    repos with `settings.allow_hub`), loaded on first request into a resident set bounded by
    `settings.max_resident_adapters` / `max_resident_mb`. Adapters already in the registry start
    resident. `skipped` (dir name -> why it failed to load at startup) is reported by GET /health."""
    settings = settings or ServeSettings()
    worker = make_worker(registry, settings)
    exclusive = ExclusiveModel(worker)  # label scoring and the store's hook changes: never beside a step
    store = AdapterStore(
        registry, adapters_dir, max_resident=settings.max_resident_adapters,
        max_resident_bytes=None if settings.max_resident_mb is None else int(settings.max_resident_mb * 2**20),
        pins=tuple(settings.pin), allow_hub=settings.allow_hub, failure_ttl_s=settings.failure_ttl_s,
        pause=exclusive,
    )
    metrics = ServerMetrics(worker, store)
    service = GenerationService(store, worker, metrics, exclusive)
    skipped = dict(skipped or {})
    api_key = api_key_from(settings.api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()
        store.close()

    app = FastAPI(
        title="lexlora",
        version=__version__,
        description="Generate with LoRA + lexical fusion adapters sharing one frozen base, loaded on first use; "
        "concurrent requests for different adapters decode together (continuous batching). "
        "OpenAI-compatible routes under /v1, Prometheus metrics at /metrics.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.worker = worker
    app.state.batcher = worker  # the name before the engine existed
    app.state.settings = settings
    app.state.store = store
    app.state.service = service
    app.state.metrics = metrics
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if api_key is not None:  # outermost: a request without the key is refused before its body is read
        app.add_middleware(BearerAuth, api_key=api_key)
    app.include_router(openai_router())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        return JSONResponse(status_code=exc.status, content={"detail": exc.message}, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default puts a list under "detail"; clients get one readable line there instead,
        # and the structured list (without echoing the input back) under "errors".
        errors = [{k: e.get(k) for k in ("loc", "msg", "type")} for e in exc.errors()]
        detail = validation_message(exc.errors())
        if "json" not in request.headers.get("content-type", "json"):  # e.g. curl -d without -H
            detail += "; send the body as JSON with Content-Type: application/json"
        return JSONResponse(status_code=422, content={"detail": detail, "errors": jsonable_encoder(errors)})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by the server; the client gets JSON like every other error.
        detail = f"internal error ({type(exc).__name__}); see the server log"
        return JSONResponse(status_code=500, content={"detail": detail})

    @app.get("/health", response_model=Health)
    def health() -> Health:
        # An adapter fixed and loaded since startup is no longer missing.
        failed = {**skipped, **store.failures()}
        still = [SkippedAdapter(name=n, reason=r) for n, r in failed.items() if n not in registry]
        stats = worker.stats
        return Health(status="ok", adapters=store.resident_count, engine=worker.name, pending=worker.pending,
                      active_rows=worker.active_rows, batches=stats["batches"], rows=stats["rows"],
                      mixed_batches=stats["mixed_batches"], row_steps=stats.get("row_steps", stats["rows"]),
                      resident_bytes=store.resident_bytes, max_resident=store.max_resident,
                      loads=store.stats["loads"], evictions=store.stats["evictions"],
                      load_failures=store.stats["load_failures"], skipped=still)

    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/adapters", response_model=AdapterList)
    def list_adapters() -> dict[str, Any]:
        """The resident adapters (GET /v1/models lists every adapter the server can load)."""
        return {"adapters": [a.describe() for a in sorted(store.resident(), key=lambda a: a.name)]}

    @app.post("/adapters", status_code=201, response_model=AdapterInfo, responses=error_responses(400, 404, 409, 422))
    def load_adapter(request: LoadRequest) -> dict[str, Any]:
        """Make an adapter resident now rather than on its first request."""
        if request.name in registry:
            raise HTTPException(409, f"an adapter named {request.name!r} is already loaded")
        loaded = _store_call(store, store.load, request.name)
        logger.info("loaded adapter %s from %s", request.name, loaded.path)
        return loaded.describe()

    @app.put("/adapters/{name:path}", response_model=AdapterInfo, responses=error_responses(400, 404, 422))
    def replace_adapter(name: str) -> dict[str, Any]:
        """Reload an adapter from its dir (or Hub repo) as it is now: requests in flight finish on the
        old weights, new ones get the new. A failed load leaves the old one serving."""
        loaded = _store_call(store, store.replace, name)
        logger.info("replaced adapter %s from %s", name, loaded.path)
        return loaded.describe()

    @app.delete("/adapters/{name:path}", response_model=DeleteResponse, responses=error_responses(404))
    def delete_adapter(name: str) -> DeleteResponse:
        try:
            store.unload(name)
        except AdapterNotFound:
            raise HTTPException(404, f"no adapter named {name!r} is loaded") from None
        logger.info("unloaded adapter %s", name)
        return DeleteResponse(deleted=name, adapters=store.resident_count)

    @app.post(
        "/generate", response_model=GenerateResponse, responses=error_responses(404, 408, 413, 422, 503),
        # The body is parsed by parse_generate_request (one function, property-tested) rather than by
        # FastAPI; its schema is still GenerateRequest's.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}},
    )
    async def generate(http: Request) -> Any:
        request = parse_generate_request(await http.body(), settings, http.headers.get("content-type"))
        try:
            params = request.sampling()
        except LexloraError as exc:
            raise HTTPException(422, str(exc)) from None
        if request.stream:
            stream = await service.start_stream(http, "/generate", request.adapter, list(request.inputs), params,
                                                request.constrain)
            return EventSourceResponse(_generate_events(stream), headers={"Cache-Control": "no-cache"})
        completion = await service.complete(http, "/generate", request.adapter, list(request.inputs), params,
                                            request.constrain)
        body: dict[str, Any] = {"outputs": completion.outputs}
        if completion.scores is not None:
            body["scores"] = completion.scores
        return JSONResponse(content=body, headers={"Server-Timing": completion.timing})

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["GenerateRequest"] = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def make_worker(registry: LexLoRA, settings: ServeSettings) -> Engine | Batcher:
    """The continuous engine, unless asked for the static batcher or the base is one it cannot run."""
    if settings.engine == "continuous":
        why = engine_supports(registry)
        if why is None:
            return Engine(registry, max_rows=settings.max_batch_rows, max_queue=settings.max_queue)
        logger.warning("serving with the static batcher: %s", why)
    return Batcher(registry, max_rows=settings.max_batch_rows, wait_s=settings.batch_wait_ms / 1000)


def _store_call(store: AdapterStore, method, name: str):
    """A store change answered as HTTP: 400 an impossible name, 404 unknown, 422 a failed load."""
    try:
        store.check_name(name)
    except AdapterError as exc:
        raise HTTPException(400, str(exc)) from None
    try:
        return method(name)
    except AdapterNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except (LexloraError, OSError) as exc:
        raise HTTPException(422, str(exc)) from None


async def _generate_events(stream: Stream):
    """/generate's server-sent events: `token` {index, text} as text is produced, then `done`
    {outputs, finish_reasons, usage}, or `error` {detail, status} if the request fails midway."""
    try:
        async for event in stream:
            yield {"event": "token", "data": json.dumps({"index": event.index, "text": event.text})}
        done = stream.completion
        yield {"event": "done", "data": json.dumps({
            "outputs": done.outputs, "finish_reasons": done.finish_reasons,
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}})}
    except ServiceError as exc:
        yield {"event": "error", "data": json.dumps({"detail": exc.message, "status": exc.status})}
    finally:
        stream.cancel()
