"""Read records from JSONL, JSON, CSV or a saved HF dataset, and validate them before any model work.

Text formats are parsed with the standard library rather than Arrow's readers: Arrow reports byte
blocks instead of line numbers and coerces types (a CSV filename "123" becomes an int), while users
need "file.jsonl line 7: field 'file_desc' is missing". Saved datasets go through `datasets`.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from lexlora.errors import DataError

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 10


@dataclass(frozen=True)
class Record:
    """One validated record and where it came from (1-based line, or row for saved datasets)."""

    line: int
    fields: dict[str, str]


@dataclass(frozen=True)
class Problem:
    where: str  # "file.jsonl line 7"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise DataError(
        f"{path}: cannot tell the format from the extension {suffix!r}; "
        "use .jsonl, .json, .csv, a saved dataset directory, or set data.format"
    )


def read_records(
    path: str | Path,
    required_fields: Sequence[str],
    target_field: str,
    fmt: str = "auto",
    skip_invalid: bool = False,
) -> list[Record]:
    """All valid records of `path`, keeping only `required_fields` (all must be non-null strings;
    the target must not be blank). Invalid records raise `DataError` naming file, line and field,
    or with `skip_invalid` are skipped and counted in a warning."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path, fmt)
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "hf": _iter_hf}
    if fmt not in readers:
        raise DataError(f"{path}: unknown data format {fmt!r}")
    where_word = "row" if fmt == "hf" else "line"

    records: list[Record] = []
    problems: list[Problem] = []
    for line, raw in readers[fmt](path, required_fields):
        where = f"{path} {where_word} {line}"
        if isinstance(raw, Problem):
            problems.append(raw)
            continue
        problem = _validate(raw, required_fields, target_field, where)
        if problem is not None:
            problems.append(problem)
            continue
        records.append(Record(line, {name: raw[name] for name in required_fields}))

    if problems and not skip_invalid:
        shown = "\n  ".join(str(p) for p in problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(
            f"{len(problems)} invalid record(s) in {path}:\n  {shown}{tail}\n"
            "Fix the data, or set data.skip_invalid=true to skip and count them."
        )
    if problems:
        logger.warning(
            "skipped %d invalid record(s) of %s (data.skip_invalid=true); first: %s",
            len(problems), path, problems[0],
        )
    if not records:
        raise DataError(f"{path}: no valid records")
    return records


def _validate(raw: Any, required: Sequence[str], target: str, where: str) -> Problem | None:
    if not isinstance(raw, dict):
        return Problem(where, f"expected an object with fields, got {type(raw).__name__}")
    for name in required:
        if name not in raw:
            return Problem(where, f"field {name!r} is missing")
        value = raw[name]
        if value is None:
            return Problem(where, f"field {name!r} is null")
        if not isinstance(value, str):
            return Problem(where, f"field {name!r} must be a string, got {type(value).__name__}")
    if not raw[target].strip():
        return Problem(where, f"target field {target!r} is empty")
    return None


def _decode_lines(path: Path) -> Iterator[tuple[int, str | Problem]]:
    with open(path, "rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                yield number, data.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, Problem(
                    f"{path} line {number}", f"not valid UTF-8 (byte {exc.start}: {exc.reason})"
                )


def _iter_jsonl(path: Path, _required: Sequence[str]) -> Iterable[tuple[int, Any]]:
    for number, text in _decode_lines(path):
        if isinstance(text, Problem):
            yield number, text
            continue
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, Problem(f"{path} line {number}", f"malformed JSON: {exc.msg} (column {exc.colno})")


def _iter_json(path: Path, _required: Sequence[str]) -> Iterable[tuple[int, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos >= len(text):
        raise DataError(f"{path}: the file is empty")
    if text[pos] != "[":
        raise DataError(f"{path}: expected a JSON array of records (use .jsonl for one record per line)")
    pos = _skip_space(text, pos + 1)
    # Decode element by element so each record keeps the line it starts on.
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        yield line, value
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{path} line {line}: malformed JSON: expected ',' or ']'")
    if pos >= len(text):
        raise DataError(f"{path}: malformed JSON: the array is not closed")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_csv(path: Path, required: Sequence[str]) -> Iterable[tuple[int, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            header = reader.fieldnames or []
            missing = [name for name in required if name not in header]
            if missing:
                raise DataError(
                    f"{path} line 1: column(s) {', '.join(map(repr, missing))} missing from the header "
                    f"(it has: {', '.join(header) or 'nothing'})"
                )
            for row in reader:
                # A short row gives None for the absent columns: report it as missing.
                yield reader.line_num, {k: v for k, v in row.items() if k is not None and v is not None}
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from None


def _iter_hf(path: Path, _required: Sequence[str]) -> Iterable[tuple[int, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, ValueError, arrow errors
        raise DataError(f"{path}: not a saved Hugging Face dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a saved DatasetDict needs a 'train' split; it has {list(loaded)}")
        loaded = loaded["train"]
    for index, row in enumerate(loaded):
        yield index, row
