"""`GenerationService`: one request from its route to its answer, shared by `/generate` and the
OpenAI routes (openai_api.py), so both get the same adapter store, engine, errors and metrics.

    complete()       acquire the adapter (loading it if cold), check the inputs against its fields,
                     queue them on the worker, wait (a client that disconnects frees its rows), release
    start_stream()   the same up to queueing, then a `Stream` of TokenEvents from the engine's
                     per-token callback; every error up to there is raised before the first event,
                     so a route can still answer it as a plain HTTP error

A request on an adapter with a label set (trained on a label task) is constrained to it unless it
says constrain=false: it does not queue on the worker but is scored in one forward pass
(lexlora.model.label_scoring) on a thread, with the worker paused and one such call at a time
(`ExclusiveModel`, which the adapter store's hook changes also take); its completion carries every
label's probability. Streaming it is refused (422 naming `stream`): a label comes whole.

Errors come out as `ServiceError` (status, message, and the request part at fault); each request is
counted in the metrics with its adapter, route and status.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from lexlora.errors import AdapterError, DataError
from lexlora.model.label_scoring import resolve_constrain
from lexlora.serving.batcher import Batcher, Job
from lexlora.serving.decoding import SamplingParams
from lexlora.serving.engine import Engine, EngineRequest, GenerationFailed, QueueFull, ShuttingDown
from lexlora.serving.registry import LoadedAdapter
from lexlora.serving.store import AdapterNotFound, AdapterStore

STATIC_ONLY = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")


class ServiceError(Exception):
    """What a route answers instead of a completion."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after_s = status, message, param, code, retry_after_s


@dataclass
class Completion:
    outputs: list[str]
    finish_reasons: list[str]  # per input: "stop" (end token or a stop string) or "length" (max tokens)
    prompt_tokens: int
    completion_tokens: int
    timing: str  # a Server-Timing header: load, queue, ttft, total (ms)
    scores: list[dict[str, float]] | None = None  # constrained: each input's {label: probability}


@dataclass
class TokenEvent:
    index: int  # which input
    text: str  # new text since its last event (may be "")


_END = object()


@dataclass(eq=False)
class Stream:
    """The events of one streamed request; `completion` is set once the last one is out."""

    service: GenerationService
    route: str
    loaded: LoadedAdapter
    request: EngineRequest
    load_s: float
    started: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    completion: Completion | None = None
    _closed: bool = False

    def __aiter__(self):
        return self._events()

    async def _events(self):
        try:
            while True:
                event = await self.queue.get()
                if event is _END:
                    break
                yield event
            try:
                self.completion = self.service._finished(self.route, self.loaded, self.request, self.load_s,
                                                         self.started)
            except ServiceError as exc:  # complete() counts its own errors; a stream counts here
                self.service._count(self.route, self.loaded.name, exc.status, self.started, self.request)
                raise
        finally:
            self.cancel()

    def cancel(self) -> None:
        """The client is gone (or the stream ended): free its rows, release the adapter, once."""
        if self._closed:
            return
        self._closed = True
        if not self.request.future.done():
            self.request.cancel()
            self.service._count(self.route, self.loaded.name, 499, self.started, self.request)
        self.service.store.release(self.loaded)


class ExclusiveModel:
    """Model use outside the worker's own thread (label scoring, the store's hook changes): the worker
    paused, and one such user at a time (the engine's `paused()` alone lets several in together)."""

    def __init__(self, worker: Engine | Batcher):
        self.worker = worker
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self):
        with self._lock, self.worker.paused():
            yield


class GenerationService:
    def __init__(self, store: AdapterStore, worker: Engine | Batcher, metrics: Any = None,
                 exclusive: ExclusiveModel | None = None):
        self.store, self.worker, self.metrics = store, worker, metrics
        self.exclusive = exclusive or ExclusiveModel(worker)

    async def complete(self, http: Request | None, route: str, adapter: str, inputs: list[Any],
                       params: SamplingParams, constrain: bool | None = None) -> Completion:
        """`constrain`: None, the adapter's default (constrained when it has a label set)."""
        started = time.monotonic()
        loaded, load_s = await self._acquire(route, adapter, started)
        request = None
        try:
            self._check(loaded, inputs, params)
            if self._constrained(loaded, constrain, params):
                return await self._scored(route, loaded, inputs, load_s, started)
            if isinstance(self.worker, Engine):
                request = self._submit(loaded, inputs, params)
                await self._wait(http, request)
                return self._finished(route, loaded, request, load_s, started)
            outputs = await asyncio.wrap_future(self.worker.submit(
                Job(adapter, list(inputs), params.max_new_tokens, params.num_beams, params.min_new_tokens)))
            return self._static_completion(route, loaded, outputs, params, load_s, started)
        except ServiceError as exc:
            self._count(route, adapter, exc.status, started, request)
            raise
        except Exception as exc:
            error = _service_error(exc)
            self._count(route, adapter, error.status, started, request)
            raise error from None
        finally:
            self.store.release(loaded)

    async def start_stream(self, http: Request | None, route: str, adapter: str, inputs: list[Any],
                           params: SamplingParams, constrain: bool | None = None) -> Stream:
        started = time.monotonic()
        if not isinstance(self.worker, Engine):
            self._count(route, None, 400, started)
            raise ServiceError(400, "streaming needs the continuous engine (lexlora serve --engine continuous, "
                                    "a T5-family base)", param="stream")
        loaded, load_s = await self._acquire(route, adapter, started)
        loop = asyncio.get_running_loop()
        holder: list[Stream] = []

        def on_token(index: int, token_id: int, text: str) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(holder[0].queue.put_nowait, TokenEvent(index, text))

        try:
            self._check(loaded, inputs, params)
            if self._constrained(loaded, constrain, params):
                raise ServiceError(422, f"adapter {loaded.name!r} is constrained to its label set, and a label is "
                                        "scored whole, not streamed: send stream=false (or constrain=false)",
                                   param="stream")
            request = self._submit(loaded, inputs, params, on_token)
        except Exception as exc:
            self.store.release(loaded)
            error = exc if isinstance(exc, ServiceError) else _service_error(exc)
            self._count(route, adapter, error.status, started)
            raise error from None
        stream = Stream(self, route, loaded, request, load_s, started)
        holder.append(stream)
        request.future.add_done_callback(lambda _: loop.call_soon_threadsafe(stream.queue.put_nowait, _END))
        return stream

    # ---- the steps ---------------------------------------------------------------------------------------
    async def _acquire(self, route: str, adapter: str, started: float) -> tuple[LoadedAdapter, float]:
        if adapter == self.store.base_id and adapter not in self.store.registry:
            self._count(route, None, 400, started)
            raise ServiceError(400, f"{adapter!r} is the base model, which has no prompt template or input fields of "
                                    "its own: name one of its adapters (GET /v1/models)", param="model")
        try:
            loaded, load_s = await self.store.acquire_timed(adapter)
        except AdapterNotFound as exc:
            self._count(route, None, 404, started)
            raise ServiceError(404, str(exc), param="model", code="model_not_found") from None
        except AdapterError as exc:  # a bad name, or the adapter failed to load (corrupt, foreign base)
            self._count(route, None, 422, started)
            raise ServiceError(422, str(exc), param="model", code="adapter_load_failed") from None
        return loaded, load_s

    def _check(self, loaded: LoadedAdapter, inputs: list[Any], params: SamplingParams) -> None:
        """Checked here, not in the worker, so a bad request fails alone instead of its batch."""
        try:
            for index, item in enumerate(inputs):
                loaded.spec.format_input(item, index)
        except DataError as exc:
            raise ServiceError(422, str(exc), param="inputs") from None
        if isinstance(self.worker, Batcher):
            used = [n for n in STATIC_ONLY if getattr(params, n) != getattr(SamplingParams(), n)]
            if used:
                raise ServiceError(422, f"{', '.join(used)}: not available with the static engine "
                                        "(lexlora serve --engine continuous)", param=used[0])

    def _constrained(self, loaded: LoadedAdapter, constrain: bool | None, params: SamplingParams) -> bool:
        # Decoding options the request set (not the defaults) do not apply to scored labels.
        used = {n: True for n in (*STATIC_ONLY, "min_new_tokens") if getattr(params, n) != getattr(SamplingParams(), n)}
        if loaded.head is not None and (constrain is False or used):  # a classifier only ever predicts labels
            param = "constrain" if constrain is False else next(iter(used))
            raise ServiceError(422, f"adapter {loaded.name!r} is a classifier: it predicts one of its labels with "
                                    f"their probabilities, and {param} does not apply to it", param=param)
        try:
            return resolve_constrain(constrain, loaded.labels, used, loaded.name)
        except AdapterError as exc:
            raise ServiceError(422, str(exc), param="constrain") from None
        except DataError as exc:
            raise ServiceError(422, str(exc), param=next(iter(used))) from None

    async def _scored(self, route: str, loaded: LoadedAdapter, inputs: list[Any], load_s: float,
                      started: float) -> Completion:
        """A constrained request: every label scored in one forward pass, off the event loop."""
        registry = self.store.registry

        plans = [loaded.plan()] * len(inputs)

        def run():
            with self.exclusive():
                if loaded.unloaded:
                    raise AdapterError(f"adapter {loaded.name!r} was unloaded")
                predictions = registry.predict_labels(plans, list(inputs))
            # usage: the prompts' tokens as the model read them; a label is scored, not generated,
            # so a classifier's completion counts none and a seq2seq label its own tokens.
            prompt = sum(map(len, registry.pipeline.token_ids(plans, registry.pipeline.records(plans, list(inputs)))))
            label_tokens = 0 if loaded.head is not None else sum(
                len(ids) for ids in registry.tokenizer(text_target=[p.label for p in predictions])["input_ids"])
            return predictions, prompt, label_tokens

        predictions, prompt_tokens, completion_tokens = await asyncio.to_thread(run)
        total_ms = round((time.monotonic() - started) * 1000, 2)
        completion = Completion([p.label for p in predictions], ["stop"] * len(predictions), prompt_tokens,
                                completion_tokens, f"load;dur={round(load_s * 1000, 2)}, total;dur={total_ms}",
                                scores=[p.scores for p in predictions])
        self._count(route, loaded.name, 200, started, None, completion)
        return completion

    def _submit(self, loaded: LoadedAdapter, inputs: list[Any], params: SamplingParams,
                on_token: Any = None) -> EngineRequest:
        try:
            return self.worker.submit(loaded.name, list(inputs), params, on_token=on_token, loaded=loaded)
        except QueueFull as exc:
            raise ServiceError(503, str(exc), code="queue_full", retry_after_s=exc.retry_after_s) from None
        except ShuttingDown as exc:
            raise ServiceError(503, str(exc), code="shutting_down") from None

    async def _wait(self, http: Request | None, request: EngineRequest) -> list[str]:
        """The request's outputs; if the client disconnects first, its rows are dropped at the next step."""
        future = asyncio.wrap_future(request.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.1)
            if done:
                return future.result()
            if http is not None and await http.is_disconnected():
                request.cancel()
                raise ServiceError(499, "the client disconnected")

    def _finished(self, route: str, loaded: LoadedAdapter, request: EngineRequest, load_s: float,
                  started: float) -> Completion:
        if request.future.cancelled():
            raise ServiceError(499, "the request was cancelled")
        exc = request.future.exception()
        if exc is not None:  # counted by the caller, as every other error is
            raise _service_error(exc)
        completion = Completion(list(request.future.result()), [r or "stop" for r in request.finish_reasons],
                                request.prompt_tokens, request.completion_tokens, _timing(request, load_s))
        self._count(route, loaded.name, 200, started, request, completion)
        return completion

    def _static_completion(self, route: str, loaded: LoadedAdapter, outputs: list[str], params: SamplingParams,
                           load_s: float, started: float) -> Completion:
        # The static batcher returns text only: tokens are counted by re-tokenizing it.
        tokenizer = self.store.registry.tokenizer
        counts = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs]
        limit = loaded.plan(params.max_new_tokens).max_new_tokens
        total_ms = round((time.monotonic() - started) * 1000, 2)
        completion = Completion(list(outputs), ["length" if c >= limit else "stop" for c in counts], 0, sum(counts),
                                f"load;dur={round(load_s * 1000, 2)}, total;dur={total_ms}")
        self._count(route, loaded.name, 200, started, None, completion)
        return completion

    def _count(self, route: str, adapter: str | None, status: int, started: float,
               request: EngineRequest | None = None, completion: Completion | None = None) -> None:
        if self.metrics is None:
            return
        ttft = None
        if request is not None and request.first_token_at is not None:
            ttft = request.first_token_at - request.queued_at
        self.metrics.observe_request(adapter, route, status, time.monotonic() - started, ttft,
                                     completion.prompt_tokens if completion else 0,
                                     completion.completion_tokens if completion else 0)


def _service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, AdapterError):  # unloaded while queued or running
        return ServiceError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, DataError):
        return ServiceError(422, str(exc), param="inputs")
    if isinstance(exc, QueueFull):
        return ServiceError(503, str(exc), code="queue_full", retry_after_s=exc.retry_after_s)
    if isinstance(exc, ShuttingDown):
        return ServiceError(503, str(exc), code="shutting_down")
    if isinstance(exc, GenerationFailed):
        return ServiceError(500, str(exc), code="generation_failed")
    if isinstance(exc, asyncio.CancelledError):
        return ServiceError(499, "the request was cancelled")
    return ServiceError(500, f"internal error ({type(exc).__name__}); see the server log", code="internal_error")


def _timing(request: EngineRequest, load_s: float) -> str:
    """A W3C Server-Timing header: waiting for the adapter, queued, to the first token, in all (ms)."""
    def ms(end: float | None) -> float:
        return round(((end or request.queued_at) - request.queued_at) * 1000, 2)

    return (f"load;dur={round(load_s * 1000, 2)}, queue;dur={ms(request.admitted_at)}, "
            f"ttft;dur={ms(request.first_token_at)}, total;dur={ms(request.finished_at)}")
