"""`create_app`: the HTTP JSON API of `lexlora serve` over a `LexLoRA` registry (one frozen base,
many adapters).

    lexlora serve --adapters adapters/ --port 8000
    curl localhost:8000/adapters
    curl -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"adapter": "file-description", "inputs": ["backup_config.json"]}'
    curl -X POST localhost:8000/adapters -d '{"name": "file-type"}'      # load adapters/file-type
    curl -X DELETE localhost:8000/adapters/file-type

A request passes `BodyLimits` (limits.py), is parsed and checked (schemas.py), then submitted to
the `Engine` (engine.py), which decodes it alongside whatever else is running, joining at the next
decoder step; `--engine static` (or a base the engine cannot run) uses the `Batcher` (batcher.py)
instead, one mixed-adapter batch at a time. A full queue answers 503 with Retry-After at once; a
client that disconnects frees its rows at the next step.
Clients only ever name adapters; paths are never taken from a request. OpenAPI schema at
/openapi.json, docs at /docs.
"""

import asyncio
import logging
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lexlora.errors import AdapterError, DataError, LexloraError, RequestError
from lexlora.serving.batcher import Batcher, Job
from lexlora.serving.engine import Engine, EngineRequest, GenerationFailed, QueueFull, ShuttingDown
from lexlora.serving.running import engine_supports
from lexlora.serving.limits import BodyLimits
from lexlora.serving.registry import LexLoRA
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
    resolve_adapter_dir,
    validation_message,
)
from lexlora.serving.settings import ServeSettings
from lexlora.version import __version__

logger = logging.getLogger(__name__)


def create_app(
    registry: LexLoRA, adapters_dir: str | Path, settings: ServeSettings | None = None,
    skipped: Mapping[str, str] | None = None,
) -> FastAPI:
    """The app serving `registry`; POST /adapters loads dirs directly under `adapters_dir`.
    `skipped` (dir name -> why it failed to load at startup) is reported by GET /health."""
    settings = settings or ServeSettings()
    adapters_dir = Path(adapters_dir)
    worker = make_worker(registry, settings)
    skipped = dict(skipped or {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(
        title="lexlora",
        version=__version__,
        description="Generate with LoRA + lexical fusion adapters sharing one frozen base; "
        "concurrent requests for different adapters run as one mixed-adapter batch.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.worker = worker
    app.state.batcher = worker  # the name before the engine existed
    app.state.settings = settings
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

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
        # An adapter fixed and loaded over HTTP since startup is no longer missing.
        still = [SkippedAdapter(name=n, reason=r) for n, r in skipped.items() if n not in registry]
        stats = worker.stats
        return Health(status="ok", adapters=len(registry), engine=worker.name, pending=worker.pending,
                      active_rows=worker.active_rows, batches=stats["batches"], rows=stats["rows"],
                      mixed_batches=stats["mixed_batches"], row_steps=stats.get("row_steps", stats["rows"]),
                      skipped=still)

    @app.get("/adapters", response_model=AdapterList)
    def list_adapters() -> dict[str, Any]:
        # From a snapshot of the registry rather than under the lock, so listing never waits for a batch.
        return {"adapters": [a.describe() for a in registry.adapters.values()]}

    @app.post("/adapters", status_code=201, response_model=AdapterInfo, responses=error_responses(400, 404, 409, 422))
    def load_adapter(request: LoadRequest) -> dict[str, Any]:
        path = resolve_adapter_dir(adapters_dir, request.name)
        if not path.is_dir():
            raise HTTPException(404, f"no adapter dir named {request.name!r} in {adapters_dir}")
        with worker.paused():
            if request.name in registry:
                raise HTTPException(409, f"an adapter named {request.name!r} is already loaded")
            try:
                loaded = registry.load_adapter(path, name=request.name)
            except (LexloraError, OSError) as exc:
                raise HTTPException(422, str(exc)) from None
        logger.info("loaded adapter %s from %s", request.name, path)
        return loaded.describe()

    @app.delete("/adapters/{name}", response_model=DeleteResponse, responses=error_responses(404))
    def delete_adapter(name: str) -> DeleteResponse:
        with worker.paused():
            if name not in registry:
                raise HTTPException(404, f"no adapter named {name!r} is loaded")
            registry.delete_adapter(name)
            left = len(registry)
        logger.info("unloaded adapter %s", name)
        return DeleteResponse(deleted=name, adapters=left)

    @app.post(
        "/generate", response_model=GenerateResponse, responses=error_responses(404, 408, 413, 422),
        # The body is parsed by parse_generate_request (one function, property-tested) rather than by
        # FastAPI; its schema is still GenerateRequest's.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}},
    )
    async def generate(http: Request) -> Any:
        request = parse_generate_request(await http.body(), settings, http.headers.get("content-type"))
        # Validated here, not in the worker, so a bad request fails alone instead of its batch.
        loaded = registry.adapters.get(request.adapter)
        if loaded is None:
            names = ", ".join(sorted(registry.adapters)) or "none"
            raise HTTPException(404, f"no adapter named {request.adapter!r} is loaded (loaded: {names})")
        try:
            for index, item in enumerate(request.inputs):
                loaded.spec.format_input(item, index)
            params = request.sampling()
        except DataError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            if isinstance(worker, Engine):
                submitted = worker.submit(request.adapter, list(request.inputs), params)
                outputs = await _wait(http, submitted)
                return JSONResponse(content={"outputs": outputs}, headers={"Server-Timing": _timing(submitted)})
            else:
                if request.uses_engine_only_options:
                    raise HTTPException(422, f"{', '.join(request.uses_engine_only_options)}: not available with "
                                             "the static engine (lexlora serve --engine continuous)")
                job = Job(request.adapter, list(request.inputs), request.max_new_tokens, request.num_beams,
                          request.min_new_tokens)
                outputs = await asyncio.wrap_future(worker.submit(job))
        except QueueFull as exc:
            return JSONResponse(status_code=503, content={"detail": str(exc)},
                                headers={"Retry-After": str(exc.retry_after_s)})
        except AdapterError as exc:  # unloaded while queued
            raise HTTPException(404, str(exc)) from None
        except DataError as exc:  # replaced by an adapter with other input fields while queued
            raise HTTPException(422, str(exc)) from None
        except ShuttingDown as exc:
            raise HTTPException(503, str(exc)) from None
        except GenerationFailed as exc:
            raise HTTPException(500, str(exc)) from None
        return GenerateResponse(outputs=outputs)

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


def _timing(request: EngineRequest) -> str:
    """A W3C Server-Timing header: time queued, to the first token, and in all (milliseconds)."""
    def ms(end: float | None) -> float:
        return round(((end or request.queued_at) - request.queued_at) * 1000, 2)

    return (f"queue;dur={ms(request.admitted_at)}, ttft;dur={ms(request.first_token_at)}, "
            f"total;dur={ms(request.finished_at)}")


async def _wait(http: Request, request: EngineRequest) -> list[str]:
    """The request's outputs; if the client disconnects first, its rows are dropped at the next step."""
    future = asyncio.wrap_future(request.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.1)
        if done:
            return future.result()
        if await http.is_disconnected():
            request.cancel()
            raise HTTPException(499, "the client disconnected")
