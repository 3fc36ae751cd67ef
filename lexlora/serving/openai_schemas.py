"""What an OpenAI client sends `POST /v1/completions` and `/v1/chat/completions`, turned into the
inputs and `SamplingParams` that /generate would run, or an `OpenAIError` naming the parameter.

`parse_openai_request` takes any body (bytes, text or decoded JSON) to an `OpenAIRequest` or an
`OpenAIError`, never another exception (property-tested in tests/serving/test_openai_api.py). It reads
the JSON itself rather than through FastAPI, so a bad body answers OpenAI's 400 shape, never a 422.

Decoding follows OpenAI's parameters as far as a seq2seq adapter can:
- `temperature` absent: the adapter's own decoding, as /generate's defaults (greedy, or the beams
  its metadata asks for); OpenAI's default would be sampling at 1, but a client that names no
  temperature gets the output the adapter was evaluated with;
- `temperature` 0: greedy (one beam); above 0, or `top_p` below 1, or `top_k`: sampling.
Fields OpenAI knows but lexlora cannot honour (logprobs, echo, best_of, tools...) are refused when
set to anything but their default; keys OpenAI does not know are refused, except vLLM's `top_k`,
`repetition_penalty` and `min_tokens` (an OpenAI client sends them through `extra_body`).
"""

import json
import math
from dataclasses import dataclass
from typing import Any

from lexlora.errors import DataError
from lexlora.serving.decoding import SamplingParams
from lexlora.serving.schemas import MAX_NEW_TOKENS, MAX_STOP, MAX_STOP_CHARS

MAX_MODEL_CHARS = 512  # a model name is an adapter name or a Hub id (org/name@revision)
MAX_SEED = 2**63 - 1

# Accepted and ignored: they do not change what is generated.
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# Known to OpenAI, refused unless at their default (the values listed, or absent).
COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None,), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,), "verbosity": (None,),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
          "top_k", "repetition_penalty", "min_tokens"}
COMPLETION_KEYS = COMMON | {"prompt"} | IGNORED | set(COMPLETION_UNSUPPORTED)
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens"} | IGNORED | set(CHAT_UNSUPPORTED)
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class OpenAIRequest:
    chat: bool
    model: str
    inputs: list[str | dict[str, str]]  # one per choice; chat: exactly one
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def parse_openai_request(body: bytes | str | Any, chat: bool, content_type: str | None = None,
                         max_bytes: int | None = None) -> OpenAIRequest:
    """A /v1/completions (or, with `chat`, /v1/chat/completions) body -> an `OpenAIRequest`, or an
    `OpenAIError` (400; 413 over `max_bytes`) whose `param` names the part at fault. Whether the
    model exists, and the inputs' sizes, are the service's question."""
    data = _decode(body, content_type, max_bytes)
    known = CHAT_KEYS if chat else COMPLETION_KEYS
    for key in data:
        if key not in known:
            raise OpenAIError(f"unknown parameter {key!r}{' for chat completions' if chat else ''}", key)
    for name, defaults in (CHAT_UNSUPPORTED if chat else COMPLETION_UNSUPPORTED).items():
        value = data.get(name)
        if not any(_same(value, d) for d in defaults):
            raise OpenAIError(f"{name}={_show(value)} is not supported by lexlora; leave it out", name)
    model = data.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        raise OpenAIError(f"model must be an adapter name (a non-empty string), got {_show(model)}", "model")
    n = data.get("n")
    if n is not None and not (type(n) is int and n == 1):
        raise OpenAIError(f"n must be 1 (one choice per prompt), got {_show(n)}", "n")
    inputs = [_chat_input(data.get("messages"))] if chat else _prompts(data.get("prompt"))
    stream = _flag(data, "stream")
    include_usage = _stream_options(data.get("stream_options"), stream)
    return OpenAIRequest(chat, model, inputs, _sampling(data, chat), stream, include_usage)


def _decode(body: Any, content_type: str | None, max_bytes: int | None) -> dict[str, Any]:
    if content_type is not None and "json" not in content_type.lower():
        kind = content_type.split(";")[0].strip() or "nothing"
        raise OpenAIError(f"the body is declared as {kind}; send JSON with Content-Type: application/json")
    if isinstance(body, (bytes, bytearray, str)):
        if max_bytes is not None and len(body) > max_bytes:
            raise OpenAIError(f"request body of {len(body)} bytes; at most {max_bytes}", status=413)
        if not body.strip():
            raise OpenAIError('the request body is empty; send a JSON object such as {"model": "name", ...}')
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise OpenAIError(f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
        except UnicodeDecodeError:
            raise OpenAIError("the body is not valid JSON: it is not UTF-8 text") from None
        except RecursionError:
            raise OpenAIError("the body is not valid JSON: nested too deeply") from None
        except ValueError as exc:  # an integer of more than 4300 digits
            raise OpenAIError(f"the body is not valid JSON: {exc}") from None
    else:
        data = body
    if not isinstance(data, dict):
        raise OpenAIError(f"the body must be a JSON object, got {_kind(data)}")
    return data


def _prompts(prompt: Any) -> list[str | dict[str, str]]:
    """A string, or a list of strings: one input (and one choice) each."""
    if isinstance(prompt, str):
        return [_input(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        for index, item in enumerate(prompt):
            if not isinstance(item, str):
                raise OpenAIError(f"prompt.{index}: each prompt must be a string (token ids are not supported), "
                                  f"got {_kind(item)}", "prompt")
        return [_input(item, f"prompt.{index}") for index, item in enumerate(prompt)]
    if isinstance(prompt, list):
        raise OpenAIError("prompt is an empty list; give at least one prompt", "prompt")
    raise OpenAIError(f"prompt must be a string or a list of strings, got {_kind(prompt)}", "prompt")


def _input(text: str, where: str) -> str | dict[str, str]:
    """A prompt text fills the adapter's input field; a JSON object of strings is a record (one
    value per input field, as /generate's records)."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return text  # text that merely starts with "{"
    if not isinstance(record, dict):
        return text
    bad = [k for k, v in record.items() if not isinstance(v, str)]
    if bad:
        raise OpenAIError(f"{where}: a JSON object prompt is a record of strings; {bad[0]!r} is "
                          f"{_kind(record[bad[0]])}", "prompt" if where.startswith("prompt") else "messages")
    return record


def _chat_input(messages: Any) -> str | dict[str, str]:
    """The content of the last user message (its text parts joined by newlines)."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(f"messages must be a non-empty list of {{role, content}} objects, got {_kind(messages)}",
                          "messages")
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise OpenAIError(f"messages.{index}: each message needs a role ({', '.join(sorted(ROLES))}), "
                              f"got {_show(role) if isinstance(message, dict) else _kind(message)}", "messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise OpenAIError("messages has no user message; the last user message's content is the input", "messages")
    where, content = f"messages.{last}.content", messages[last].get("content")
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(f"{where}.{index}: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                  "are supported", "messages")
            texts.append(part["text"])
        if not texts:
            raise OpenAIError(f"{where} is an empty list; give the input text", "messages")
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise OpenAIError(f"{where} must be a string or a list of text parts, got {_kind(content)}", "messages")
    return _input(content, where)


def _sampling(data: dict[str, Any], chat: bool) -> SamplingParams:
    max_tokens = _integer(data, "max_tokens", 1, MAX_NEW_TOKENS)
    if chat and data.get("max_completion_tokens") is not None:
        max_tokens = _integer(data, "max_completion_tokens", 1, MAX_NEW_TOKENS)
    temperature = _number(data, "temperature", 0, 2)
    top_p = _number(data, "top_p", 0, 1, open_low=True)
    top_k = _integer(data, "top_k", 0, None)
    repetition_penalty = _number(data, "repetition_penalty", 0, 100, open_low=True)
    min_tokens = _integer(data, "min_tokens", 0, MAX_NEW_TOKENS) or 0
    seed = _integer(data, "seed", 0, MAX_SEED)
    stop = _stop(data.get("stop"))
    if temperature == 0:  # greedy whatever top_p / top_k say, as OpenAI and vLLM
        sample, num_beams = False, 1
    elif temperature is not None or (top_p is not None and top_p < 1) or top_k:
        sample, num_beams = True, 1
    else:  # nothing said: the adapter's own decoding
        sample, num_beams = False, None
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=min_tokens, num_beams=num_beams, do_sample=sample,
            temperature=temperature if sample and temperature is not None else 1.0,
            top_k=top_k if sample else None, top_p=top_p if sample and top_p is not None else 1.0,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty, seed=seed, stop=stop,
        )
    except DataError as exc:
        raise OpenAIError(str(exc)) from None


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise OpenAIError(f"stop must be a string or a list of at most {MAX_STOP} strings, got {_show(stop)}", "stop")
    for item in items:
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_STOP_CHARS:
            raise OpenAIError(f"each stop string needs 1 to {MAX_STOP_CHARS} characters, got {_show(item)}", "stop")
    return tuple(items)


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise OpenAIError("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise OpenAIError(f"stream_options must be an object, got {_kind(options)}", "stream_options")
    for key in options:
        if key not in ("include_usage", "include_obfuscation"):
            raise OpenAIError(f"unknown stream option {key!r}", f"stream_options.{key}")
    return _flag(options, "include_usage", "stream_options.")


def _flag(data: dict[str, Any], name: str, prefix: str = "") -> bool:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise OpenAIError(f"{prefix}{name} must be true or false, got {_show(value)}", prefix + name)
    return bool(value)


def _integer(data: dict[str, Any], name: str, low: int, high: int | None) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise OpenAIError(f"{name} must be an integer {span}, got {_show(value)}", name)
    return value


def _number(data: dict[str, Any], name: str, low: float, high: float, open_low: bool = False) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    ok = type(value) in (int, float) and math.isfinite(value) and (value > low if open_low else value >= low)
    if not ok or value > high:
        span = f"{'above' if open_low else 'at least'} {low} and at most {high}"
        raise OpenAIError(f"{name} must be a number {span}, got {_show(value)}", name)
    return float(value)


def _same(value: Any, default: Any) -> bool:
    # 0 == False == 0.0 in Python; a default of 0 must not accept `false`, nor `false` a 0.
    return type(value) is type(default) and value == default or (
        isinstance(default, (int, float)) and not isinstance(default, bool)
        and type(value) in (int, float) and value == default)


def _kind(value: Any) -> str:
    names = {list: "an array", dict: "an object", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."
