"""Property tests (hypothesis): whatever bytes a data file holds and whatever body a client sends,
lexlora either parses them or raises its own error type, never anything else (no UnicodeDecodeError,
RecursionError, ValueError, pydantic or csv exceptions escaping).

Deterministic (derandomize) and small, so the suite stays quick; raise max_examples locally to hunt."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lexlora.data.records import _validate, read_records
from lexlora.errors import DataError, LexloraError, RequestError
from lexlora.serving import ServeSettings
from lexlora.serving.registry import ADAPTER_NAME
from lexlora.serving.schemas import GenerateRequest, parse_generate_request

FIELDS = ["filename", "file_desc"]
CHECK = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
LIMITS = ServeSettings(max_inputs=4, max_input_chars=20, max_body_bytes=4000)

# JSON values, with the strings a user's data really holds: any text, lone surrogates included.
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Rows close to valid: the right field names with any values, plus stray keys.
near_rows = st.fixed_dictionaries(
    {}, optional={"filename": json_values, "file_desc": json_values, "id": json_scalars, "extra": json_values}
)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def read_or_data_error(path: Path, **kwargs):
    """Records, or None for a DataError; any other exception fails the property."""
    try:
        records = read_records(path, FIELDS, "file_desc", **kwargs)
    except DataError as exc:
        assert str(exc) and str(path) in str(exc)  # every message names the file
        return None
    assert records
    for record in records:
        assert set(record.fields) == set(FIELDS)
        assert all(isinstance(v, str) for v in record.fields.values())
        record.fields["file_desc"].encode("utf-8")  # valid text: a tokenizer can take it
        assert record.fields["file_desc"].strip()
    return records


@CHECK
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
@example(data=b"[" * 3000, suffix=".jsonl")
@example(data=b'{"filename": "a", "file_desc": ' + b"9" * 5000 + b"}", suffix=".json")
@example(data=b"\xef\xbb\xbf\r\n\xff\xfe", suffix=".csv")
def test_any_file_bytes_give_records_or_a_data_error(workdir, data, suffix):
    path = workdir / f"d{suffix}"
    path.write_bytes(data)
    read_or_data_error(path)


@CHECK
@given(rows=st.lists(near_rows | json_values, max_size=6), crlf=st.booleans(), bom=st.booleans(),
       skip=st.booleans(), duplicates=st.sampled_from(["warn", "drop", "refuse", "ignore"]))
def test_any_jsonl_rows_give_records_or_a_data_error(workdir, rows, crlf, bom, skip, duplicates):
    ending = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + "".join(json.dumps(row) + ending for row in rows)
    path = workdir / "rows.jsonl"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    records = read_or_data_error(path, skip_invalid=skip, on_duplicate_id=duplicates)
    valid = [row for row in rows if _validate(row, FIELDS, "file_desc", "x") is None]
    if records is not None and not skip and duplicates in ("warn", "ignore"):
        assert len(records) == len(valid) == len(rows)  # nothing invalid was let through or lost


@CHECK
@given(row=near_rows | json_values)
def test_the_record_validator_accepts_exactly_valid_text_rows(row):
    problem = _validate(row, FIELDS, "file_desc", "d.jsonl line 1")
    valid = (
        isinstance(row, dict)
        and all(isinstance(row.get(f), str) for f in FIELDS)
        and row["file_desc"].strip() != ""
        and all(_encodes(row[f]) for f in FIELDS)
    )
    assert (problem is None) == valid
    if problem is not None:
        assert str(problem).startswith("d.jsonl line 1: ")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_or_request_error(body, content_type=None):
    try:
        request = parse_generate_request(body, LIMITS, content_type)
    except RequestError as exc:
        assert exc.status in (413, 422) and str(exc)
        return None
    except LexloraError as exc:  # pragma: no cover - the property says this never happens
        pytest.fail(f"a LexloraError that is not a RequestError: {exc!r}")
    assert isinstance(request, GenerateRequest)
    assert ADAPTER_NAME.match(request.adapter) and ".." not in request.adapter
    assert 1 <= len(request.inputs) <= LIMITS.max_inputs
    for item in request.inputs:
        texts = [item] if isinstance(item, str) else [*item, *item.values()]
        assert all(isinstance(t, str) and len(t) <= LIMITS.max_input_chars and _encodes(t) for t in texts)
    return request


@CHECK
@given(body=st.binary(max_size=300))
@example(body=b"[" * 2000)
@example(body=b'{"adapter": "a", "inputs": ["\\ud800"]}')
@example(body=b'{"adapter": "a", "inputs": [' + b"1" * 5000 + b"]}")
def test_any_request_bytes_parse_or_raise_a_request_error(body):
    parse_or_request_error(body)


@CHECK
@given(body=json_values)
def test_any_json_body_parses_or_raises_a_request_error(body):
    parse_or_request_error(json.dumps(body).encode("utf-8", "surrogatepass"))
    parse_or_request_error(body)  # already decoded


names = st.sampled_from(["desc", "file-type", "a.b_c", "", "..", "../x", "a/b", "/etc/passwd", "x" * 200]) | st.text(max_size=12)
inputs = st.lists(st.text(max_size=25) | st.dictionaries(st.text(max_size=8), st.text(max_size=25) | json_scalars, max_size=3)
                  | json_scalars, max_size=6)
near_requests = st.fixed_dictionaries(
    {}, optional={"adapter": names | json_scalars, "inputs": inputs | json_values,
                  "max_new_tokens": st.integers(-5, 600) | json_scalars, "num_beams": st.integers(-1, 10) | json_scalars,
                  "stray": json_scalars},
)


@CHECK
@given(body=near_requests, content_type=st.sampled_from([None, "application/json", "application/json; charset=utf-8",
                                                          "text/plain", "application/x-www-form-urlencoded", ""]))
def test_near_valid_requests_parse_or_raise_a_request_error(body, content_type):
    request = parse_or_request_error(json.dumps(body).encode("utf-8", "surrogatepass"), content_type)
    if request is not None:
        assert content_type is None or "json" in content_type
        assert set(body) <= {"adapter", "inputs", "max_new_tokens", "num_beams"}
