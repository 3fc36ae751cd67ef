"""What a client sends `lexlora serve` and what it gets back: the request / response models (they
make up the OpenAPI schema) and the checks that turn a request body into a `GenerateRequest` or a
`RequestError` before anything reaches the model.

`parse_generate_request` takes any body to a request or a `RequestError` (422 malformed, 413 too
large), never another exception (property-tested with hypothesis in tests/test_properties.py).
Clients only ever name adapters; the adapter store (store.py) keeps a name from becoming a path.
"""

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lexlora.errors import AdapterError, RequestError
from lexlora.serving.decoding import SamplingParams
from lexlora.serving.registry import MAX_ADAPTER_NAME, check_adapter_name
from lexlora.serving.settings import ServeSettings

# Hard caps on per-request generation settings: without them one request could hold the worker
# (and so every other client) for minutes.
MAX_NEW_TOKENS = 512
MAX_BEAMS = 8
MAX_STOP = 4  # stop strings per request (OpenAI's limit), each at most MAX_STOP_CHARS
MAX_STOP_CHARS = 64


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(min_length=1, max_length=MAX_ADAPTER_NAME, description="name of a loaded adapter")
    inputs: list[str | dict[str, str]] = Field(
        description="one output per input: a string fills the adapter's single input field; a record "
        "(object of strings) gives each of its input_fields",
        examples=[["backup_config.json"]],
    )
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="default: the adapter's")
    num_beams: int | None = Field(None, ge=1, le=MAX_BEAMS, description="default: the adapter's")
    min_new_tokens: int = Field(0, ge=0, le=MAX_NEW_TOKENS, description="the end token is blocked until this many")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0, le=100, description="sampling temperature")
    top_k: int | None = Field(None, ge=0, description="keep the k likeliest tokens (0 or null: all)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the likeliest tokens up to this mass")
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="as transformers' repetition_penalty")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="a sampled request's seed: the same seed, the same output")
    stop: list[str] = Field([], max_length=MAX_STOP, description="the output ends before the first of these strings")
    stream: bool = Field(False, description="server-sent events: `token` {index, text} as text is produced, then `done`")
    constrain: bool | None = Field(
        None, description="constrain the output to the adapter's label set and return each label's probability "
        "(`scores`); default (null): on for adapters trained on a label task, which record one. Not with `stream`")

    def sampling(self) -> "SamplingParams":
        """The decoding settings the engine runs (DataError if they do not go together)."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, num_beams=self.num_beams,
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=tuple(self.stop),
        )


class GenerateResponse(BaseModel):
    outputs: list[str]
    scores: list[dict[str, float]] | None = Field(
        None, description="constrained requests: per input, every label's probability (they sum to 1)")


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
    labels: list[str] | None = Field(None, description="its label set (a label task): generation is constrained to it by default")
    file_bytes: int
    memory_bytes: int
    metrics: dict[str, Any] = {}


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class DeleteResponse(BaseModel):
    deleted: str
    adapters: int = Field(description="adapters still loaded")


class SkippedAdapter(BaseModel):
    name: str = Field(description="its dir name under the adapters dir")
    reason: str = Field(description="why it did not load")


class Health(BaseModel):
    status: str
    adapters: int = Field(description="adapters resident now")
    engine: str = Field(description="continuous (rows join and leave at every decoder step) or static")
    pending: int = Field(description="requests waiting for a slot")
    active_rows: int = Field(0, description="rows decoding now")
    batches: int = Field(description="decoder steps (continuous) or model calls (static) made; each may mix adapters")
    rows: int = Field(description="inputs generated")
    mixed_batches: int = Field(description="model calls that mixed two or more adapters")
    row_steps: int = Field(0, description="rows summed over decoder steps (row_steps / batches: mean batch occupancy)")
    resident_bytes: int = Field(0, description="bytes of the resident adapters' tensors")
    max_resident: int = Field(0, description="the resident set's cap (lexlora serve --max-resident-adapters)")
    loads: int = Field(0, description="adapter loads since startup")
    evictions: int = Field(0, description="adapters evicted to make room")
    load_failures: int = Field(0, description="adapter loads that failed")
    skipped: list[SkippedAdapter] = Field(
        default=[],
        description="adapters that failed to load, at startup (lexlora serve --skip-invalid) or in the last "
        "failure_ttl_s seconds, and are still not loaded",
    )


class Error(BaseModel):
    detail: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """An endpoint's error statuses for the OpenAPI schema; each one's body is an `Error`."""
    return {code: {"model": Error} for code in codes}


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
        raise RequestError(validation_message(exc.errors()), 422) from None
    except RecursionError:
        raise RequestError("the body is nested too deeply", 422) from None
    try:
        check_adapter_name(request.adapter)
    except AdapterError as exc:
        raise RequestError(f"adapter: {exc}", 422) from None
    check_inputs(request.inputs, settings)
    for index, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise RequestError(f"stop.{index}: a stop string needs 1 to {MAX_STOP_CHARS} characters, got {len(stop)}", 422)
    return request


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def validation_message(errors: Sequence[Any], limit: int = 5) -> str:
    """pydantic's error list as one line for a client: where each of the first `limit` is, and why."""
    parts = []
    for error in errors[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        reason = (error.get("ctx") or {}).get("error")  # e.g. what is wrong with the JSON
        parts.append(f"{where}: {error.get('msg')}" + (f" ({reason})" if isinstance(reason, str) else ""))
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts) or "invalid request"

