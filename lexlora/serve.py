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
"""

import asyncio
import collections
import concurrent.futures
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
from pydantic import BaseModel, ConfigDict, Field

import lexlora
from lexlora.errors import AdapterError, DataError, LexloraError
from lexlora.registry import LexLoRA, check_adapter_name

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
            inputs = [record for _, records in members for record in records]
            names = [job.adapter for job, records in members for _ in records]
            try:
                outputs = self.registry.generate(
                    inputs, adapter=names, max_new_tokens=max_new_tokens, num_beams=num_beams,
                    batch_size=self.max_rows,
                )
            except Exception as exc:
                logger.exception("generation failed for %d rows", len(inputs))
                for job, _ in members:
                    job.future.set_exception(exc)
                continue
            self.stats["batches"] += 1
            self.stats["rows"] += len(inputs)
            self.stats["mixed_batches"] += int(len(set(names)) > 1)
            start = 0
            for job, records in members:
                job.future.set_result(outputs[start : start + len(records)])
                start += len(records)


# ---- the app -------------------------------------------------------------------------------------
def check_inputs(inputs: Sequence[Any], settings: ServeSettings) -> None:
    """Size limits, before anything is queued: 422 for an empty list, 413 for too much."""
    if not inputs:
        raise HTTPException(422, "inputs is empty; give at least one input")
    if len(inputs) > settings.max_inputs:
        raise HTTPException(413, f"{len(inputs)} inputs; at most {settings.max_inputs} per request")
    for index, item in enumerate(inputs):
        texts = [item] if isinstance(item, str) else [*item.keys(), *item.values()]
        longest = max(map(len, texts), default=0)
        if longest > settings.max_input_chars:
            raise HTTPException(
                413, f"input {index}: {longest} characters; at most {settings.max_input_chars} per string"
            )


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


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()))
        reason = (error.get("ctx") or {}).get("error")  # e.g. what is wrong with the JSON
        parts.append(f"{where}: {error.get('msg')}" + (f" ({reason})" if isinstance(reason, str) else ""))
    return "; ".join(parts) or "invalid request"


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

    @app.post("/generate", response_model=GenerateResponse, responses=_errors(404, 413, 422))
    async def generate(request: GenerateRequest) -> GenerateResponse:
        check_inputs(request.inputs, settings)
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

    from lexlora.catalog import find_adapters

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
            registry.load_adapter(path, name=path.name)
        except (LexloraError, OSError) as exc:
            logger.warning("skipping adapter %s: %s", path.name, exc)

    settings = ServeSettings(
        max_inputs=args.max_inputs, max_input_chars=args.max_input_chars,
        max_batch_rows=args.max_batch_rows, batch_wait_ms=args.batch_wait_ms,
    )
    app = create_app(registry, adapters_dir, settings)
    url = f"http://{args.host}:{args.port}"
    print(f"lexlora: serving {len(registry)} adapter(s) on {url} (API docs: {url}/docs)", flush=True)
    for info in registry.list_adapters():
        print(f"  {info['name']}  inputs: {', '.join(info['input_fields'])}  ({info['path']})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
