"""The OpenAI-compatible routes of `lexlora serve`, so existing clients, gateways and tools work
unchanged: `model` is the adapter's name, the prompt (or the last user message) its input.

    client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="x")
    client.completions.create(model="file-description", prompt="backup_config.json")
    client.chat.completions.create(model="file-description",
                                   messages=[{"role": "user", "content": "backup_config.json"}])
    client.completions.create(model="files", prompt='{"file": "main.c", "directory": "src"}')  # a record
    client.models.list()                                                  # the base and every adapter

POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events,
token by token), GET /v1/models and /v1/models/{id}. A body is parsed by `parse_openai_request`
(openai_schemas.py, which also says how temperature maps to decoding: absent, the adapter's own
decoding, greedy like /generate), then run by the app's `GenerationService` (`app.state.service`).
Every error, the service's included, answers OpenAI's shape {"error": {message, type, param, code}}.
"""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from lexlora.errors import RequestError
from lexlora.serving.openai_schemas import (
    OpenAIError,
    OpenAIRequest,
    parse_openai_request,
)
from lexlora.serving.schemas import check_inputs
from lexlora.serving.service import ServiceError

logger = logging.getLogger(__name__)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"  # the route labels the service records


def openai_router() -> APIRouter:
    """The /v1 routes; they read `app.state.service`, `.store` and `.settings` at request time."""
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.post(COMPLETIONS.removeprefix("/v1"), summary="OpenAI text completions (model = adapter name)")
    async def completions(http: Request) -> Response:
        return await _serve(http, chat=False)

    @router.post(CHAT.removeprefix("/v1"), summary="OpenAI chat completions (the last user message is the input)")
    async def chat_completions(http: Request) -> Response:
        return await _serve(http, chat=True)

    @router.get("/models", summary="The base model and every adapter the store can serve")
    def list_models(http: Request) -> Response:  # sync: the store may list a dir (run in a thread)
        try:
            return JSONResponse({"object": "list", "data": _models(http)})
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's shape, logged with its traceback
            return _error(_as_openai(exc, chat=False))

    @router.get("/models/{model:path}", summary="One model: the base or an adapter")
    def retrieve_model(http: Request, model: str) -> Response:
        try:
            found = next((m for m in _models(http) if m["id"] == model), None)
        except Exception as exc:  # noqa: BLE001
            return _error(_as_openai(exc, chat=False))
        if found is None:
            return _error(OpenAIError(f"the model {model!r} does not exist", "model", 404, "model_not_found"))
        return JSONResponse(found)

    return router


async def _serve(http: Request, chat: bool) -> Response:
    route = CHAT if chat else COMPLETIONS
    try:
        settings = getattr(http.app.state, "settings", None)
        request = parse_openai_request(await http.body(), chat, http.headers.get("content-type"),
                                       getattr(settings, "max_body_bytes", None))
        if settings is not None:
            _check_sizes(request, settings)
        service = http.app.state.service
        if request.stream:
            # Every refusal (unknown model, bad input, full queue) is raised here, before any byte
            # of the stream, so it is a plain HTTP error.
            stream = await service.start_stream(http, route, request.model, request.inputs, request.params)
            cancel = _once(stream.cancel)

            async def close() -> None:  # if the generator never started, its finally never runs
                cancel()

            return EventSourceResponse(_events(stream, request, cancel), background=BackgroundTask(close))
        completion = await service.complete(http, route, request.model, request.inputs, request.params)
        body = (_chat_body if chat else _completion_body)(request, completion)
    except Exception as exc:  # noqa: BLE001 - every error on /v1 answers OpenAI's shape
        return _error(_as_openai(exc, chat))
    timing = getattr(completion, "timing", None)
    return JSONResponse(body, headers={"Server-Timing": timing} if timing else None)


def _check_sizes(request: OpenAIRequest, settings: Any) -> None:
    """/generate's limits on inputs (count, characters, valid text): 413 too many or too long, 400
    text a tokenizer cannot take."""
    try:
        check_inputs(request.inputs, settings)
    except RequestError as exc:
        param = "messages" if request.chat else "prompt"
        raise OpenAIError(str(exc), param, 400 if exc.status == 422 else exc.status) from None


def _completion_body(request: OpenAIRequest, completion: Any) -> dict[str, Any]:
    choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
               for i, (text, reason) in enumerate(zip(completion.outputs, completion.finish_reasons))]
    return {**_head(request, f"cmpl-{uuid.uuid4().hex}", "text_completion"), "choices": choices,
            "usage": _usage(completion)}


def _chat_body(request: OpenAIRequest, completion: Any) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}
               for i, (text, reason) in enumerate(zip(completion.outputs, completion.finish_reasons))]
    return {**_head(request, f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"), "choices": choices,
            "usage": _usage(completion)}


def _head(request: OpenAIRequest, id_: str, kind: str) -> dict[str, Any]:
    return {"id": id_, "object": kind, "created": int(time.time()), "model": request.model}


def _usage(completion: Any) -> dict[str, int]:
    prompt, generated = int(completion.prompt_tokens), int(completion.completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


async def _events(stream: Any, request: OpenAIRequest, cancel: Callable[[], None]) -> AsyncIterator[str]:
    """The stream as OpenAI's chunks: (chat: a first delta with the role), one chunk per piece of
    new text, a chunk per choice with its finish_reason, the usage if asked, then [DONE]. A client
    that goes away closes this generator (or it never starts): `cancel` frees its rows either way."""
    chat = request.chat
    head = _head(request, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                 "chat.completion.chunk" if chat else "text_completion")
    extra = {"usage": None} if request.include_usage else {}

    def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        return _json({**head, "choices": [choice], **extra})

    try:
        if chat:
            yield chunk(0, None, role=True)
        async for event in stream:
            if event.text:
                yield chunk(event.index, event.text)
        completion = stream.completion
        for index, reason in enumerate(completion.finish_reasons):
            yield chunk(index, None, finish=reason)
        if request.include_usage:
            yield _json({**head, "choices": [], "usage": _usage(completion)})
        yield "[DONE]"
    except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield _json(_as_openai(exc, chat).body())
    finally:
        cancel()


def _as_openai(exc: Exception, chat: bool) -> OpenAIError:
    """Any error as an `OpenAIError`: the service's fields straight through (its `inputs`/`adapter`
    params renamed to the OpenAI request's `prompt`/`messages`/`model`); an unexpected one is a 500,
    logged with its traceback."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ServiceError):
        code = exc.code or ("model_not_found" if exc.status == 404 else None)
        return OpenAIError(exc.message, _param(exc.param, chat), exc.status, code, exc.retry_after_s)
    if isinstance(exc, RequestError):
        return OpenAIError(str(exc), status=exc.status)
    if isinstance(exc, HTTPException):
        return OpenAIError(str(exc.detail), status=exc.status_code)
    logger.error("%s failed", CHAT if chat else COMPLETIONS, exc_info=exc)
    return OpenAIError(f"internal error ({type(exc).__name__}); see the server log", status=500)


def _param(param: str | None, chat: bool) -> str | None:
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    if head == "inputs":
        return "messages" if chat else "prompt" + dot + rest
    return "model" if head == "adapter" else param


def _error(error: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _models(http: Request) -> list[dict[str, Any]]:
    store = http.app.state.store
    created = int(time.time())
    base = {"id": store.base_id, "object": "model", "created": created, "owned_by": "lexlora",
            "root": store.base_id, "parent": None}
    names = [n for n in store.known() if n != store.base_id]
    return [base] + [{"id": n, "object": "model", "created": created, "owned_by": "lexlora", "root": n,
                      "parent": store.base_id} for n in names]


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """`action` run at most once, however many of the generator's finally and the response's
    background task get to it."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
