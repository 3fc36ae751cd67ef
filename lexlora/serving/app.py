"""`lexlora serve`: an HTTP JSON API over a `LexLoRA` registry (one frozen base, many adapters).

    lexlora serve --adapters adapters/ --port 8000
    curl localhost:8000/adapters
    curl -X POST localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"adapter": "file-description", "inputs": ["backup_config.json"]}'
    curl -X POST localhost:8000/adapters -d '{"name": "file-type"}'      # load adapters/file-type
    curl -X DELETE localhost:8000/adapters/file-type

Requests are validated on arrival, then queued for a single worker thread (`Batcher`) that owns the
model: whatever is queued when it is free runs as ONE mixed-adapter batch, so concurrent requests for
different adapters share a forward pass instead of waiting for each other. Clients only ever name
adapters; paths are never taken from a request. OpenAPI schema at /openapi.json, docs at /docs.

Bad requests never reach the model: `parse_generate_request` turns any body into a request or a
`RequestError` (422 malformed, 413 too large; property-tested with hypothesis), and `BodyLimits`
refuses a body over `max_body_bytes` (413) or one that trickles in for more than `body_timeout_s`
(408) before any of it is parsed. A slow client holds only its own connection: the event loop
serves the others meanwhile. If a mixed batch fails anyway, each of its requests is retried alone,
so only the one at fault gets the error.
"""

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import lexlora
from lexlora.errors import AdapterError, DataError, LexloraError, RequestError
from lexlora.serving.registry import LexLoRA, check_adapter_name

logger = logging.getLogger(__name__)


# Hard caps on per-request generation settings: without them one request could hold the worker
# (and so every other client) for minutes.
MAX_NEW_TOKENS = 512
MAX_BEAMS = 8


@dataclass
class ServeSettings:
    max_inputs: int = 64  # inputs per request
    max_input_chars: int = 1000  # per string (an input, or a record's field)
    max_batch_rows: int = 32  # rows per model call
    batch_wait_ms: float = 5.0  # how long the first queued request waits for others to join its batch
    max_body_bytes: int = 4 << 20  # request body; 64 inputs of 1000 characters take at most ~400 KB
    body_timeout_s: float = 30.0  # a request body must arrive within this time of its first byte


# ---- request / response models (they make up the OpenAPI schema) ---------------------------------
class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1, max_length=128, description="name of a loaded adapter")
    inputs: list[str | dict[str, str]] = Field(
        description="one output per input: a string fills the adapter's single input field; a record "
        "(object of strings) gives each of its input_fields",
        examples=[["backup_config.json"]],
    )
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="default: the adapter's")
    num_beams: int | None = Field(None, ge=1, le=MAX_BEAMS, description="default: the adapter's")


class GenerateResponse(BaseModel):
    outputs: list[str]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="an adapter dir directly under the server's adapters dir")


class AdapterInfo(BaseModel):
    # Extra keys pass through: this mirrors LoadedAdapter.describe(), which may grow.
    model_config = ConfigDict(extra="allow")

    name: str
    path: str
    base: str | None = None
    rank: int | None = None
    input_fields: list[str]
    input_template: str
    target_field: str
    fusion_mode: str | None = None
    file_bytes: int
    memory_bytes: int
    metrics: dict[str, Any] = {}


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class DeleteResponse(BaseModel):
    deleted: str
    adapters: int = Field(description="adapters still loaded")


class Health(BaseModel):
    status: str
    adapters: int
    pending: int = Field(description="requests queued for the next batch")
    batches: int = Field(description="model calls made (each may mix adapters)")
    rows: int = Field(description="inputs generated")
    mixed_batches: int = Field(description="model calls that mixed two or more adapters")


class Error(BaseModel):
    detail: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Error} for code in codes}


# ---- batching ------------------------------------------------------------------------------------
class ShuttingDown(RuntimeError):
    """The batcher is closed: the request was not run."""


@dataclass
class Job:
    adapter: str
    inputs: list[Any]
    max_new_tokens: int | None
    num_beams: int | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """One worker thread owns the model. It waits for a request, gives others `wait_s` (counted from
    the oldest queued request) to join, then takes the registry `lock`, drains the queue (up to
    `max_rows` rows), and runs one `registry.generate` per generation setting with a per-row adapter
    list. `lock` also guards loading and unloading, so those never run during a generation; holding
    it from outside makes requests pile up in the queue (`pending`), which is how tests get a
    deterministic batch."""

    def __init__(self, registry: LexLoRA, max_rows: int = 32, wait_s: float = 0.005):
        self.registry = registry
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.lock = threading.Lock()
        self.stats = {"batches": 0, "rows": 0, "mixed_batches": 0}
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="lexlora-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                deadline = self._queue[0].queued_at + self.wait_s
                while not self._closed and sum(len(j.inputs) for j in self._queue) < self.max_rows:
                    if (remaining := deadline - time.monotonic()) <= 0:
                        break
                    self._cond.wait(remaining)
            # Drain only once the lock is ours: whatever queued while we waited joins this batch.
            with self.lock:
                jobs = self._take()
                try:
                    self._run(jobs)
                except Exception as exc:  # the worker must outlive any batch
                    logger.exception("batch failed")
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
        with self._cond:
            for job in self._queue:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ShuttingDown("the server is shutting down"))
            self._queue.clear()

    def _take(self) -> list[Job]:
        jobs: list[Job] = []
        rows = 0
        with self._cond:
            # Always at least one job, so a request larger than max_rows still runs (in chunks).
            while self._queue and (not jobs or rows + len(self._queue[0].inputs) <= self.max_rows):
                job = self._queue.popleft()
                if job.future.set_running_or_notify_cancel():  # False: the client gave up
                    jobs.append(job)
                    rows += len(job.inputs)
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        # Re-checked under the lock: an adapter may have been unloaded (or replaced) since the
        # request was validated. Only that request fails; the rest of the batch proceeds.
        adapters = self.registry.adapters
        groups: dict[tuple[int, int], list[tuple[Job, list[dict[str, str]]]]] = {}
        for job in jobs:
            loaded = adapters.get(job.adapter)
            if loaded is None:
                job.future.set_exception(AdapterError(f"adapter {job.adapter!r} was unloaded"))
                continue
            try:
                records = [loaded.spec.format_input(item, i) for i, item in enumerate(job.inputs)]
            except DataError as exc:
                job.future.set_exception(exc)
                continue
            # Grouped by the settings each row will really get, so each group is one model call
            # (registry.generate would split rows whose adapters' defaults differ anyway).
            defaults = loaded.generation_defaults
            key = (job.max_new_tokens or defaults["max_new_tokens"], job.num_beams or defaults["num_beams"])
            groups.setdefault(key, []).append((job, records))

        for (max_new_tokens, num_beams), members in groups.items():
            self._generate(members, max_new_tokens, num_beams)

    def _generate(self, members: list[tuple[Job, list[dict[str, str]]]], max_new_tokens: int, num_beams: int) -> None:
        inputs = [record for _, records in members for record in records]
        names = [job.adapter for job, records in members for _ in records]
        try:
            outputs = self.registry.generate(
                inputs, adapter=names, max_new_tokens=max_new_tokens, num_beams=num_beams,
                batch_size=self.max_rows,
            )
        except Exception as exc:
            if len(members) > 1:
                # One request's rows may be what failed: each alone, so only that one gets the error.
                logger.warning("a batch of %d requests failed (%s: %s); retrying each alone",
                               len(members), type(exc).__name__, exc)
                for member in members:
                    self._generate([member], max_new_tokens, num_beams)
                return
            logger.exception("generation failed for %d rows", len(inputs))
            members[0][0].future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(inputs)
        self.stats["mixed_batches"] += int(len(set(names)) > 1)
        start = 0
        for job, records in members:
            job.future.set_result(outputs[start : start + len(records)])
            start += len(records)


# ---- the app -------------------------------------------------------------------------------------
def check_inputs(inputs: Sequence[Any], settings: ServeSettings) -> None:
    """Size limits and text validity, before anything is queued: 422 for an empty list or text that
    is not valid Unicode, 413 for too much."""
    if not inputs:
        raise RequestError("inputs is empty; give at least one input", 422)
    if len(inputs) > settings.max_inputs:
        raise RequestError(f"{len(inputs)} inputs; at most {settings.max_inputs} per request", 413)
    for index, item in enumerate(inputs):
        texts = [item] if isinstance(item, str) else [*item.keys(), *item.values()]
        longest = max(map(len, texts), default=0)
        if longest > settings.max_input_chars:
            raise RequestError(
                f"input {index}: {longest} characters; at most {settings.max_input_chars} per string", 413
            )
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON allows "\ud800"; tokenizers reject it
                raise RequestError(f"input {index}: not valid text (an unpaired surrogate such as \\ud800)", 422) from None


def parse_generate_request(
    body: bytes | str | Any, settings: ServeSettings, content_type: str | None = None
) -> GenerateRequest:
    """A /generate body (raw bytes or text, or already-decoded JSON) -> a checked `GenerateRequest`,
    or a `RequestError` saying what is wrong: 422 malformed, 413 too large. Nothing else escapes,
    whatever the input (tests/test_properties.py). Whether the adapter is loaded is the caller's
    question (404). A body declared as something other than JSON is refused, as FastAPI does (it
    also keeps browsers' cross-site form posts out)."""
    if content_type is not None and "json" not in content_type.lower():
        raise RequestError(
            f"the body is declared as {content_type.split(';')[0].strip() or 'nothing'}; "
            "send the body as JSON with Content-Type: application/json", 422
        )
    if isinstance(body, (bytes, bytearray, str)):
        if isinstance(body, (bytes, bytearray)) and len(body) > settings.max_body_bytes:
            raise RequestError(f"request body of {len(body)} bytes; at most {settings.max_body_bytes}", 413)
        if not body.strip():
            raise RequestError(
                'the request body is empty; send a JSON object such as {"adapter": "name", "inputs": ["text"]}', 422
            )
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise RequestError(f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", 422) from None
        except UnicodeDecodeError:
            raise RequestError("the body is not valid JSON: it is not UTF-8 text", 422) from None
        except RecursionError:
            raise RequestError("the body is not valid JSON: nested too deeply", 422) from None
        except ValueError as exc:  # an integer of more than 4300 digits
            raise RequestError(f"the body is not valid JSON: {exc}", 422) from None
    else:
        data = body
    if not isinstance(data, dict):
        raise RequestError(
            f'the body must be a JSON object such as {{"adapter": "name", "inputs": ["text"]}}, got {_json_type(data)}',
            422,
        )
    try:
        request = GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestError(_validation_message(exc.errors()), 422) from None
    except RecursionError:
        raise RequestError("the body is nested too deeply", 422) from None
    try:
        check_adapter_name(request.adapter)
    except AdapterError as exc:
        raise RequestError(f"adapter: {exc}", 422) from None
    check_inputs(request.inputs, settings)
    return request


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def resolve_adapter_dir(adapters_dir: Path, name: str) -> Path:
    """The dir `name` directly under `adapters_dir`, or 400: a client names adapters, never paths."""
    try:
        check_adapter_name(name)
    except AdapterError as exc:
        raise HTTPException(400, str(exc)) from None
    root = adapters_dir.resolve()
    path = (root / name).resolve()  # follows symlinks: a link pointing elsewhere is refused below
    if path.parent != root:
        raise HTTPException(400, f"adapter {name!r} is not a dir directly under the adapters dir")
    return path


def _validation_message(errors: Sequence[Any], limit: int = 5) -> str:
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        reason = (error.get("ctx") or {}).get("error")  # e.g. what is wrong with the JSON
        parts.append(f"{where}: {error.get('msg')}" + (f" ({reason})" if isinstance(reason, str) else ""))
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts) or "invalid request"


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


def create_app(registry: LexLoRA, adapters_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    adapters_dir = Path(adapters_dir)
    batcher = Batcher(registry, max_rows=settings.max_batch_rows, wait_s=settings.batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        title="lexlora",
        version=lexlora.__version__,
        description="Generate with LoRA + lexical fusion adapters sharing one frozen base; "
        "concurrent requests for different adapters run as one mixed-adapter batch.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.batcher = batcher
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
        detail = _validation_message(exc.errors())
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
        return Health(status="ok", adapters=len(registry), pending=batcher.pending, **batcher.stats)

    @app.get("/adapters", response_model=AdapterList)
    def list_adapters() -> dict[str, Any]:
        # From a snapshot of the registry rather than under the lock, so listing never waits for a batch.
        return {"adapters": [a.describe() for a in registry.adapters.values()]}

    @app.post("/adapters", status_code=201, response_model=AdapterInfo, responses=_errors(400, 404, 409, 422))
    def load_adapter(request: LoadRequest) -> dict[str, Any]:
        path = resolve_adapter_dir(adapters_dir, request.name)
        if not path.is_dir():
            raise HTTPException(404, f"no adapter dir named {request.name!r} in {adapters_dir}")
        with batcher.lock:
            if request.name in registry:
                raise HTTPException(409, f"an adapter named {request.name!r} is already loaded")
            try:
                loaded = registry.load_adapter(path, name=request.name)
            except (LexloraError, OSError) as exc:
                raise HTTPException(422, str(exc)) from None
        logger.info("loaded adapter %s from %s", request.name, path)
        return loaded.describe()

    @app.delete("/adapters/{name}", response_model=DeleteResponse, responses=_errors(404))
    def delete_adapter(name: str) -> DeleteResponse:
        with batcher.lock:
            if name not in registry:
                raise HTTPException(404, f"no adapter named {name!r} is loaded")
            registry.delete_adapter(name)
            left = len(registry)
        logger.info("unloaded adapter %s", name)
        return DeleteResponse(deleted=name, adapters=left)

    @app.post(
        "/generate", response_model=GenerateResponse, responses=_errors(404, 408, 413, 422),
        # The body is parsed by parse_generate_request (one function, property-tested) rather than by
        # FastAPI; its schema is still GenerateRequest's.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}},
    )
    async def generate(http: Request) -> GenerateResponse:
        request = parse_generate_request(await http.body(), settings, http.headers.get("content-type"))
        # Validated here, not in the worker, so a bad request fails alone instead of its batch.
        loaded = registry.adapters.get(request.adapter)
        if loaded is None:
            names = ", ".join(sorted(registry.adapters)) or "none"
            raise HTTPException(404, f"no adapter named {request.adapter!r} is loaded (loaded: {names})")
        try:
            for index, item in enumerate(request.inputs):
                loaded.spec.format_input(item, index)
        except DataError as exc:
            raise HTTPException(422, str(exc)) from None
        job = Job(request.adapter, list(request.inputs), request.max_new_tokens, request.num_beams)
        try:
            outputs = await asyncio.wrap_future(batcher.submit(job))
        except AdapterError as exc:  # unloaded while queued
            raise HTTPException(404, str(exc)) from None
        except DataError as exc:  # replaced by an adapter with other input fields while queued
            raise HTTPException(422, str(exc)) from None
        except ShuttingDown as exc:
            raise HTTPException(503, str(exc)) from None
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


# ---- the command ---------------------------------------------------------------------------------
def _registry_for_first_base(found: Sequence[Path], device: str | None) -> LexLoRA | None:
    """A registry on the base recorded by the first adapter whose base loads: one broken adapter
    dir must not stop the server."""
    for path in found:
        try:
            return LexLoRA.for_adapter(path, device=device)
        except LexloraError as exc:
            logger.warning("cannot load the base of adapter %s: %s", path.name, exc)
    return None


def serve(args) -> int:
    """Build the registry, load every adapter dir under --adapters (skipping, with a log line, any
    that fails), and serve until interrupted."""
    import uvicorn

    from lexlora.adapters.catalog import find_adapters

    adapters_dir = Path(args.adapters)
    found = find_adapters(adapters_dir)  # AdapterError (exit 2) if the dir does not exist
    if args.base:
        registry = LexLoRA.from_pretrained(args.base, device=args.device)
    else:
        registry = _registry_for_first_base(found, args.device)
        if registry is None:
            raise AdapterError(
                f"no adapter dir in {adapters_dir} names a loadable base ({len(found)} found); pass --base MODEL_ID"
            )

    for path in found:
        try:
            registry.load_adapter(path, name=path.name, allow_pickle=args.allow_pickle)
        except (LexloraError, OSError) as exc:
            logger.warning("skipping adapter %s: %s", path.name, exc)

    settings = ServeSettings(
        max_inputs=args.max_inputs, max_input_chars=args.max_input_chars,
        max_batch_rows=args.max_batch_rows, batch_wait_ms=args.batch_wait_ms,
        max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout_s,
    )
    app = create_app(registry, adapters_dir, settings)
    url = f"http://{args.host}:{args.port}"
    print(f"lexlora: serving {len(registry)} adapter(s) on {url} (API docs: {url}/docs)", flush=True)
    for info in registry.list_adapters():
        print(f"  {info['name']}  inputs: {', '.join(info['input_fields'])}  ({info['path']})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
