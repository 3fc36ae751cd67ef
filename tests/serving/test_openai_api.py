"""The OpenAI routes (openai_api.py, openai_schemas.py) on a bare FastAPI app with a fake service
and store: how a body becomes inputs and SamplingParams, the response and chunk shapes, usage, the
SSE stream, errors in OpenAI's shape (never FastAPI's 422), /v1/models; and the parser's property:
any body gives a request or an OpenAIError."""

import asyncio
import json
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from lexlora.serving.decoding import SamplingParams
from lexlora.serving.openai_api import _events, _once, openai_router
from lexlora.serving.openai_schemas import (
    OpenAIError,
    OpenAIRequest,
    parse_openai_request,
)
from lexlora.serving.service import ServiceError
from lexlora.serving.settings import ServeSettings

BASE = "google/flan-t5-small"
KNOWN = ["desc", "files", "org/hub-adapter@v2"]


def service_error(status, message, param=None, code=None, retry_after_s=None):
    """A ServiceError with these fields, whatever its constructor looks like."""
    fields = {"status": status, "message": message, "param": param, "code": code, "retry_after_s": retry_after_s}
    try:
        error = ServiceError(**fields)
    except TypeError:
        error = ServiceError(message)
    for name, value in fields.items():
        if getattr(error, name, None) != value:
            setattr(error, name, value)
    return error


@dataclass
class Completion:
    outputs: list
    finish_reasons: list
    prompt_tokens: int
    completion_tokens: int
    timing: str = "load;dur=0, queue;dur=1, ttft;dur=2, total;dur=3"


@dataclass
class TokenEvent:
    index: int
    text: str


def fake_output(item):
    """What the fake model answers: the input's words, reversed, and 'end'."""
    text = item if isinstance(item, str) else " ".join(f"{k}={v}" for k, v in item.items())
    return " ".join([*reversed(text.split()), "end"])


def fake_completion(inputs, params):
    outputs = [fake_output(i) for i in inputs]
    if params.max_new_tokens is not None:
        outputs = [" ".join(o.split()[: params.max_new_tokens]) for o in outputs]
    reasons = ["length" if params.max_new_tokens is not None else "stop" for _ in inputs]
    prompt = sum(len(fake_output(i).split()) - 1 for i in inputs)
    return Completion(outputs, reasons, prompt, sum(len(o.split()) for o in outputs))


class FakeStream:
    def __init__(self, completion, fail_after=None):
        self.final, self.fail_after, self.completion, self.cancelled = completion, fail_after, None, 0

    async def _events(self):
        sent = 0
        for index, output in enumerate(self.final.outputs):
            yield TokenEvent(index, "")  # an empty delta is never sent as a chunk
            for n, word in enumerate(output.split()):
                if sent == self.fail_after:
                    raise service_error(500, "generation failed: non-finite logits", code="generation_failed")
                sent += 1
                await asyncio.sleep(0)
                yield TokenEvent(index, word if n == 0 else " " + word)
        self.completion = self.final

    def __aiter__(self):
        return self._events()

    def cancel(self):
        self.cancelled += 1


class FakeService:
    def __init__(self):
        self.calls, self.streams, self.error, self.fail_after = [], [], None, None

    def _check(self, route, adapter, inputs, params):
        self.calls.append((route, adapter, list(inputs), params))
        if self.error is not None:
            raise self.error
        if adapter not in KNOWN:
            raise service_error(404, f"no adapter named {adapter!r}", "adapter", None)

    async def complete(self, http, route, adapter, inputs, params):
        self._check(route, adapter, inputs, params)
        return fake_completion(inputs, params)

    async def start_stream(self, http, route, adapter, inputs, params):
        self._check(route, adapter, inputs, params)
        self.streams.append(FakeStream(fake_completion(inputs, params), self.fail_after))
        return self.streams[-1]


class FakeStore:
    base_id = BASE

    def known(self):
        return list(KNOWN)


@pytest.fixture
def app():
    app = FastAPI()
    app.include_router(openai_router())
    app.state.service, app.state.store, app.state.settings = FakeService(), FakeStore(), None
    return app


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        yield client


def post(client, path, body, **kwargs):
    return client.post(f"/v1/{path}", content=json.dumps(body), headers={"content-type": "application/json"}, **kwargs)


def last_params(app) -> SamplingParams:
    return app.state.service.calls[-1][3]


def assert_openai_error(response, status, param, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param and body["error"]["message"]
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert body["error"]["code"] == code
    return body["error"]


# -- completions ------------------------------------------------------------------------------------

def test_a_string_prompt_is_one_input_and_one_choice(app, client):
    response = post(client, "completions", {"model": "desc", "prompt": "backup config json"})
    assert response.status_code == 200
    assert response.headers["server-timing"] == Completion([], [], 0, 0).timing
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "desc"
    assert body["choices"] == [{"text": "json config backup end", "index": 0, "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    route, adapter, inputs, params = app.state.service.calls[-1]
    assert (route, adapter, inputs) == ("/v1/completions", "desc", ["backup config json"])
    assert params == SamplingParams()  # the adapter's own decoding, as /generate's defaults


def test_a_json_object_prompt_is_a_record(app, client):
    post(client, "completions", {"model": "files", "prompt": '{"file": "main.c", "directory": "src"}'})
    assert app.state.service.calls[-1][2] == [{"file": "main.c", "directory": "src"}]
    for text in ["{not json", '{"a": "b"} trailing', "[1, 2]", '"quoted"', " {", "plain"]:
        post(client, "completions", {"model": "desc", "prompt": text})
        assert app.state.service.calls[-1][2] == [text]  # text, not a record
    error = assert_openai_error(post(client, "completions", {"model": "files", "prompt": '{"file": 1}'}), 400, "prompt")
    assert "'file'" in error["message"]


def test_a_list_of_prompts_gives_one_choice_each_in_order(app, client):
    prompts = ["a b", '{"file": "x"}', "c d e"]
    body = post(client, "completions", {"model": "desc", "prompt": prompts}).json()
    assert app.state.service.calls[-1][2] == ["a b", {"file": "x"}, "c d e"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == ["b a end", "file=x end", "e d c end"]
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["total_tokens"] == 6 + 9


@pytest.mark.parametrize("options, expected", [
    ({}, SamplingParams()),
    ({"temperature": 0}, SamplingParams(num_beams=1)),
    ({"temperature": 0, "top_p": 0.5, "top_k": 3}, SamplingParams(num_beams=1)),  # greedy wins
    ({"temperature": 0.7}, SamplingParams(num_beams=1, do_sample=True, temperature=0.7)),
    ({"temperature": 1}, SamplingParams(num_beams=1, do_sample=True)),
    ({"top_p": 0.9}, SamplingParams(num_beams=1, do_sample=True, top_p=0.9)),
    ({"top_p": 1}, SamplingParams()),
    ({"top_k": 5, "seed": 7}, SamplingParams(num_beams=1, do_sample=True, top_k=5, seed=7)),
    ({"max_tokens": 12, "seed": 3}, SamplingParams(max_new_tokens=12, seed=3)),
    ({"max_tokens": 512, "min_tokens": 2}, SamplingParams(max_new_tokens=512, min_new_tokens=2)),
    ({"stop": "\n"}, SamplingParams(stop=("\n",))),
    ({"stop": ["a", "bc", "d", "e"]}, SamplingParams(stop=("a", "bc", "d", "e"))),
    ({"stop": None, "n": 1, "max_tokens": None, "repetition_penalty": 1.3}, SamplingParams(repetition_penalty=1.3)),
    # Known fields at their defaults are accepted (clients send them).
    ({"echo": False, "best_of": 1, "logprobs": None, "suffix": None, "presence_penalty": 0,
      "frequency_penalty": 0.0, "logit_bias": {}, "user": "u1", "stream": False}, SamplingParams()),
])
def test_decoding_options(app, client, options, expected):
    response = post(client, "completions", {"model": "desc", "prompt": "x", **options})
    assert response.status_code == 200, response.text
    assert last_params(app) == expected


@pytest.mark.parametrize("options, param", [
    ({"n": 2}, "n"), ({"n": True}, "n"), ({"n": "1"}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 513}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": False}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 600}, "min_tokens"),
    ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": 2**63}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"), ({"stop": "x" * 65}, "stop"),
    ({"stop": 3}, "stop"), ({"stop": [None]}, "stop"),
    ({"logprobs": 1}, "logprobs"), ({"logprobs": 0}, "logprobs"), ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"), ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"echo": 0}, "echo"),
    ({"foo": 1}, "foo"), ({"messages": []}, "messages"), ({"max_completion_tokens": 5}, "max_completion_tokens"),
    ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"model": ""}, "model"), ({"model": 5}, "model"), ({"model": None}, "model"),
    ({"prompt": None}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"prompt": [[1]]}, "prompt"),
    ({"prompt": []}, "prompt"), ({"prompt": {"file": "x"}}, "prompt"),
])
def test_bad_parameters_answer_400_naming_them(app, client, options, param):
    response = post(client, "completions", {"model": "desc", "prompt": "x", **options})
    assert_openai_error(response, 400, param)
    assert not app.state.service.calls  # refused before the service


@pytest.mark.parametrize("raw, content_type", [
    (b"", "application/json"), (b"{", "application/json"), (b"[1]", "application/json"),
    (b"\xff\xfe", "application/json"), (b"[" * 3000, "application/json"), (b'"x"', "application/json"),
    (b"model=desc&prompt=x", "application/x-www-form-urlencoded"), (b'{"model": "desc"}', "text/plain"),
])
def test_malformed_bodies_are_400s_never_422s(client, raw, content_type):
    for path in ("completions", "chat/completions"):
        response = client.post(f"/v1/{path}", content=raw, headers={"content-type": content_type})
        assert_openai_error(response, 400, None)


def test_the_settings_limits_hold(app, client):
    app.state.settings = ServeSettings(max_body_bytes=300, max_inputs=2, max_input_chars=10)
    assert_openai_error(post(client, "completions", {"model": "desc", "prompt": "x" * 400}), 413, None)
    assert_openai_error(post(client, "completions", {"model": "desc", "prompt": ["a", "b", "c"]}), 413, "prompt")
    assert_openai_error(post(client, "completions", {"model": "desc", "prompt": ["a", "x" * 11]}), 413, "prompt")
    assert_openai_error(post(client, "completions", {"model": "files", "prompt": '{"file": "xxxxxxxxxxx"}'}), 413,
                        "prompt")
    chat = {"model": "desc", "messages": [{"role": "user", "content": "x" * 11}]}
    assert_openai_error(post(client, "chat/completions", chat), 413, "messages")
    raw = b'{"model": "desc", "prompt": "a\\ud800"}'
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert "surrogate" in assert_openai_error(response, 400, "prompt")["message"]
    assert not app.state.service.calls
    assert post(client, "completions", {"model": "desc", "prompt": ["a", "x" * 10]}).status_code == 200


# -- chat -------------------------------------------------------------------------------------------

def test_chat_takes_the_last_user_message(app, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first one"},
                {"role": "assistant", "content": "eno tsrif"}, {"role": "user", "content": "second one", "name": "u"},
                {"role": "assistant", "content": None, "tool_calls": []}]
    response = post(client, "chat/completions", {"model": "desc", "messages": messages, "max_completion_tokens": 2})
    assert response.status_code == 200, response.text
    route, _, inputs, params = app.state.service.calls[-1]
    assert (route, inputs, params.max_new_tokens) == ("/v1/chat/completions", ["second one"], 2)
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "desc"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "one second"},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_chat_content_parts_records_and_options(app, client):
    parts = [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]
    post(client, "chat/completions", {"model": "desc", "messages": [{"role": "user", "content": parts}]})
    assert app.state.service.calls[-1][2] == ["a b\nc"]
    record = [{"role": "user", "content": '{"file": "main.c", "directory": "src"}'}]
    post(client, "chat/completions", {"model": "files", "messages": record, "max_tokens": 4, "temperature": 0,
                                      "tool_choice": "none", "response_format": {"type": "text"}, "store": False})
    assert app.state.service.calls[-1][2] == [{"file": "main.c", "directory": "src"}]
    assert last_params(app) == SamplingParams(max_new_tokens=4, num_beams=1)


@pytest.mark.parametrize("options, param", [
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"), ({"messages": ["hi"]}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),  # no user message
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"), ({"messages": [{"role": ["user"]}]}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"messages": [{"role": "user", "content": []}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": '{"file": ["x"]}'}]}, "messages"),
    ({"prompt": "x"}, "prompt"), ({"n": 3}, "n"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"modalities": ["audio"]}, "modalities"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"suffix": "x"}, "suffix"),
])
def test_bad_chat_parameters_answer_400_naming_them(app, client, options, param):
    body = {"model": "desc", "messages": [{"role": "user", "content": "x"}], **options}
    assert_openai_error(post(client, "chat/completions", body), 400, param)


# -- errors from the service ------------------------------------------------------------------------

def test_an_unknown_model_is_404_model_not_found(client):
    for path, body in [("completions", {"prompt": "x"}), ("chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        for stream in (False, True):
            response = post(client, path, {"model": "nope", "stream": stream, **body})
            error = assert_openai_error(response, 404, "model", "model_not_found")
            assert "nope" in error["message"] and response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("error, param, header", [
    (service_error(503, "the queue is full", code="queue_full", retry_after_s=2), None, "2"),
    (service_error(413, "5 inputs; at most 4", "inputs"), "prompt", None),
    (service_error(422, "input 1: no field 'file'", "inputs.1", "bad_input"), "prompt.1", None),
    (service_error(499, "the client disconnected"), None, None),
    (service_error(500, "generation failed", code="generation_failed"), None, None),
])
def test_service_errors_map_straight_through(app, client, error, param, header):
    app.state.service.error = error
    for stream in (False, True):
        response = post(client, "completions", {"model": "desc", "prompt": ["a", "b"], "stream": stream})
        got = assert_openai_error(response, error.status, param, error.code)
        assert got["message"] == error.message and response.headers.get("retry-after") == header
    chat = {"model": "desc", "messages": [{"role": "user", "content": "x"}]}
    got = post(client, "chat/completions", chat).json()["error"]
    assert got["param"] == (param and "messages")


def test_an_unexpected_failure_is_a_500_in_openai_shape(app, client, caplog):
    app.state.service.error = RuntimeError("boom")
    error = assert_openai_error(post(client, "completions", {"model": "desc", "prompt": "x"}), 500, None)
    assert "RuntimeError" in error["message"] and "boom" in caplog.text


# -- streaming --------------------------------------------------------------------------------------

def sse(response):
    """The data fields of an SSE response, in order (JSON decoded; [DONE] as is)."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    datas = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


def test_streamed_completions_add_up_to_the_answer(app, client):
    body = {"model": "desc", "prompt": ["one two three", "four five"]}
    whole = post(client, "completions", body).json()
    events = sse(post(client, "completions", {**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == "desc" and "usage" not in c for c in chunks)
    texts = {0: "", 1: ""}
    for c in chunks:
        (choice,) = c["choices"]
        assert choice["logprobs"] is None and (choice["text"] or choice["finish_reason"])
        texts[choice["index"]] += choice["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in whole["choices"]]
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finals == [{"text": "", "index": i, "logprobs": None, "finish_reason": "stop"} for i in (0, 1)]
    assert chunks[-2:] == [c for c in chunks if c["choices"][0]["finish_reason"]]  # the finishes come last
    assert app.state.service.streams[-1].cancelled == 1  # cancel is harmless once the stream is done


def test_streamed_chat_with_usage(app, client):
    body = {"model": "desc", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 3}
    whole = post(client, "chat/completions", body).json()
    events = sse(post(client, "chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in events[:-1])
    assert all(c["usage"] is None for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == whole["choices"][0]["message"]["content"] == "c b a"
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_a_failure_mid_stream_is_an_error_event(app, client):
    app.state.service.fail_after = 2
    events = sse(post(client, "completions", {"model": "desc", "prompt": "a b c d", "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "d c"
    assert events[-1]["error"]["code"] == "generation_failed" and events[-1]["error"]["type"] == "server_error"
    assert app.state.service.streams[-1].cancelled == 1


def test_a_closed_stream_cancels_its_rows_once():
    request = OpenAIRequest(False, "desc", ["a b c"], SamplingParams(), True, False)

    async def drop_after_first_chunk():
        stream = FakeStream(fake_completion(["a b c"], SamplingParams()))
        cancel = _once(stream.cancel)
        events = _events(stream, request, cancel)
        first = json.loads(await events.__anext__())
        assert first["choices"][0]["text"] == "c"
        await events.aclose()  # what sse_starlette does when the client goes away
        cancel()  # and the response's background task after it
        return stream

    assert asyncio.run(drop_after_first_chunk()).cancelled == 1


# -- models -----------------------------------------------------------------------------------------

def test_models_list_the_base_and_every_known_adapter(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [BASE, *KNOWN]
    for model in body["data"]:
        assert model["object"] == "model" and model["owned_by"] == "lexlora" and isinstance(model["created"], int)
    assert body["data"][0]["parent"] is None and {m["parent"] for m in body["data"][1:]} == {BASE}
    one = client.get("/v1/models/org/hub-adapter@v2")
    assert one.status_code == 200 and one.json()["id"] == "org/hub-adapter@v2"
    assert client.get(f"/v1/models/{BASE}").json()["parent"] is None
    assert_openai_error(client.get("/v1/models/nope"), 404, "model", "model_not_found")


# -- the parser's property --------------------------------------------------------------------------

CHECK = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "robot"]) | json_scalars,
    "content": st.text(max_size=20) | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]) | json_scalars}, optional={"text": json_scalars})) | json_values,
}) | json_values, max_size=4)
near_bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["desc", "", "x" * 600]) | json_scalars,
    "prompt": st.text(max_size=20) | st.lists(st.text(max_size=10) | json_scalars, max_size=3) | json_values,
    "messages": messages,
    "max_tokens": st.integers(-2, 600) | json_scalars, "max_completion_tokens": st.integers(-2, 600) | json_scalars,
    "temperature": st.floats(-1, 3) | json_scalars, "top_p": st.floats(-0.5, 1.5) | json_scalars,
    "top_k": st.integers(-2, 60) | json_scalars, "n": st.integers(0, 3) | json_scalars,
    "stop": st.text(max_size=70) | st.lists(st.text(max_size=5) | json_scalars, max_size=6) | json_scalars,
    "seed": st.integers(-5, 2**64) | json_scalars, "stream": json_scalars,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_scalars, "other": json_scalars})
    | json_scalars,
    "logprobs": json_scalars, "echo": json_scalars, "presence_penalty": json_scalars, "tools": json_values,
    "stray": json_scalars,
})


def parse_or_openai_error(body, chat, content_type=None):
    try:
        request = parse_openai_request(body, chat, content_type, max_bytes=5000)
    except OpenAIError as exc:
        assert exc.message and exc.status in (400, 413)
        return None
    assert isinstance(request.params, SamplingParams) and request.inputs and request.model
    assert len(request.inputs) == 1 or not chat
    return request


@CHECK
@given(body=st.binary(max_size=300), chat=st.booleans())
@example(body=b"[" * 3000, chat=False)
@example(body=b'{"model": "a", "prompt": "{' + b"[" * 3000 + b'"}', chat=False)
@example(body=b'{"model": "a", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}", chat=False)
@example(body=b'{"model": "a", "prompt": "x", "temperature": NaN}', chat=False)
def test_any_bytes_parse_or_raise_an_openai_error(body, chat):
    parse_or_openai_error(body, chat)


@CHECK
@given(body=json_values | near_bodies, chat=st.booleans(),
       content_type=st.sampled_from([None, "application/json", "text/plain"]))
def test_any_json_body_parses_or_raises_an_openai_error(body, chat, content_type):
    parse_or_openai_error(body, chat, content_type)  # already decoded
    try:
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
    except ValueError:  # NaN and infinities are not JSON
        return
    parse_or_openai_error(raw, chat, content_type)
