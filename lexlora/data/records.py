"""Read records from JSONL, JSON, CSV or a saved HF dataset, and validate them before any model work.

Text formats are parsed with the standard library rather than Arrow's readers: Arrow reports byte
blocks instead of line numbers and coerces types (a CSV filename "123" becomes an int), while users
need "file.jsonl line 7: field 'file_desc' is missing". Saved datasets go through `datasets`.

Whatever the bytes of a file, `read_records` returns records or raises `DataError` (tested with
hypothesis): undecodable bytes, JSON nested too deeply, numbers too long to convert, CSV fields over
the csv module's limit and strings that are not valid text (unpaired surrogates) are all reported
with the file and line.

Duplicate ids: records usually carry an id (`id` in every file under ../shared and examples/). Like
`datasets`, lexlora keeps every row by default, but it says so: a warning counts the rows that repeat
an earlier id and names the first ones (`data.on_duplicate_id=warn`), because the same id in two
splits leaks between training and evaluation. `drop` keeps the first row of each id, `refuse` stops
with the list, `ignore` says nothing. The id field is `data.id_field`, by default `id` where the
records have one; its values may be strings or numbers (compared as JSON, so 1 and "1" differ).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from lexlora.config import DUPLICATE_IDS
from lexlora.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


MAX_REPORTED_PROBLEMS = 10
DEFAULT_ID_FIELD = "id"


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
    id_field: str | None = None,
    on_duplicate_id: str = "warn",
) -> list[Record]:
    """All valid records of `path`, keeping only `required_fields` (all must be non-null strings;
    the target must not be blank). Invalid records raise `DataError` naming file, line and field,
    or with `skip_invalid` are skipped and counted in a warning. Rows repeating an earlier id
    (`id_field`, default `id` when present) are handled by `on_duplicate_id` (see the module doc)."""
    if on_duplicate_id not in DUPLICATE_IDS:
        raise ConfigError(f"data.on_duplicate_id must be one of {', '.join(DUPLICATE_IDS)}; got {on_duplicate_id!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path, fmt)
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "hf": _iter_hf}
    if fmt not in readers:
        raise DataError(f"{path}: unknown data format {fmt!r}")
    if fmt != "hf" and path.is_dir():
        raise DataError(f"{path}: is a directory, not a {fmt} file (a saved dataset needs data.format=hf or auto)")
    where_word = "row" if fmt == "hf" else "line"

    records: list[Record] = []
    problems: list[Problem] = []
    ids: dict[str, int] = {}  # id (as JSON) -> line of its first record
    duplicates: list[tuple[str, int, int]] = []  # (id, first line, this line)
    rows = 0
    fields_seen: dict[str, None] = {}  # every key of every object row, in order of appearance
    id_name = id_field or DEFAULT_ID_FIELD
    try:
        for line, raw in readers[fmt](path, required_fields):
            rows += 1
            where = f"{path} {where_word} {line}"
            if isinstance(raw, Problem):
                problems.append(raw)
                continue
            if isinstance(raw, dict):
                fields_seen.update(dict.fromkeys(k for k in raw if isinstance(k, str)))
            problem = _validate(raw, required_fields, target_field, where)
            if problem is not None:
                problems.append(problem)
                continue
            if on_duplicate_id != "ignore" and raw.get(id_name) is not None:
                key = _id_key(raw[id_name])
                if key in ids:
                    duplicates.append((key, ids[key], line))
                    if on_duplicate_id == "drop":
                        continue
                else:
                    ids[key] = line
            records.append(Record(line, {name: raw[name] for name in required_fields}))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None

    if rows == 0:
        raise DataError(f"{path}: the file is empty (no records)" if fmt != "hf" else f"{path}: the dataset has no rows")
    if problems:
        _refuse_absent_fields(path, required_fields, fields_seen, problems)
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
    if id_field is not None and not ids and on_duplicate_id != "ignore":
        raise DataError(f"{path}: data.id_field={id_field!r}, but no record has that field")
    if duplicates:
        _report_duplicates(path, id_name, where_word, duplicates, on_duplicate_id)
    if not records:
        raise DataError(f"{path}: no valid records ({len(problems)} invalid, all skipped)")
    return records


def _refuse_absent_fields(path: Path, required: Sequence[str], seen: dict[str, None], problems: list[Problem]) -> None:
    """A field that no record has is a settings mistake (a template or target naming the wrong
    field), not bad rows: one line saying so instead of one per row."""
    if not seen:
        return
    absent = [name for name in required if name not in seen]
    if absent:
        also = f" (so are {', '.join(map(repr, absent[1:]))})" if len(absent) > 1 else ""
        found = ", ".join(list(seen)[:20]) + (", ..." if len(seen) > 20 else "")
        raise DataError(
            f"{path}: field {absent[0]!r} is missing from every record{also}; the records have: {found}. "
            "Check data.input_template, data.target_field and data.lexical_field"
        )


def _report_duplicates(path: Path, name: str, word: str, duplicates: list[tuple[str, int, int]], policy: str) -> None:
    examples = "; ".join(f"{name} {key} on {word}s {first} and {line}" for key, first, line in duplicates[:5])
    count = len(duplicates)
    if policy == "refuse":
        raise DataError(
            f"{path}: {count} record(s) repeat an earlier {name!r} (data.on_duplicate_id=refuse): {examples}"
            + (" ..." if count > 5 else "")
            + "\nRemove them, or set data.on_duplicate_id=drop to keep the first record of each id."
        )
    if policy == "drop":
        logger.warning("%s: dropped %d record(s) repeating an earlier %r (data.on_duplicate_id=drop); e.g. %s",
                       path, count, name, examples)
    else:
        logger.warning(
            "%s: %d record(s) repeat an earlier %r, kept (e.g. %s); the same id in two splits leaks between "
            "training and evaluation: data.on_duplicate_id=drop keeps the first of each, refuse stops",
            path, count, name, examples,
        )


def _id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


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
        if not _is_text(value):
            return Problem(where, f"field {name!r} is not valid text (an unpaired surrogate such as \\ud800)")
    if not raw[target].strip():
        return Problem(where, f"target field {target!r} is empty")
    return None


def _is_text(value: str) -> bool:
    """False for strings holding lone surrogates (JSON allows "\\ud800"); tokenizers reject them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_value(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return Problem(where, f"malformed JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return Problem(where, "malformed JSON: nested too deeply")
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return Problem(where, f"malformed JSON: {exc}")


def _decode_lines(path: Path) -> Iterator[tuple[int, str | Problem]]:
    """Each line of a text file without its line ending (LF or CRLF), a leading BOM removed; a
    line that is not UTF-8 is a Problem, the others are still read."""
    with open(path, "rb") as handle:
        for number, data in enumerate(handle, start=1):
            if number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                yield number, data.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, Problem(
                    f"{path} line {number}", f"not valid UTF-8 (byte {exc.start + 1} of the line: {exc.reason})"
                )


def _iter_jsonl(path: Path, _required: Sequence[str]) -> Iterable[tuple[int, Any]]:
    for number, text in _decode_lines(path):
        if isinstance(text, Problem):
            yield number, text
            continue
        if not text.strip():
            continue
        yield number, _json_value(text, f"{path} line {number}")


def _read_text(path: Path) -> str:
    """The whole file as text (BOM removed); undecodable bytes are reported with their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({exc.reason})") from None


def _iter_json(path: Path, _required: Sequence[str]) -> Iterable[tuple[int, Any]]:
    text = _read_text(path)
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos >= len(text):
        return  # empty: read_records says so
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
        except RecursionError:
            raise DataError(f"{path} line {line}: malformed JSON: nested too deeply") from None
        except ValueError as exc:
            raise DataError(f"{path} line {line}: malformed JSON: {exc}") from None
        yield line, value
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{path} line {line}: malformed JSON: expected ',' or ']'")
    if pos >= len(text):
        raise DataError(f"{path}: malformed JSON: the array is not closed")
    rest = _skip_space(text, pos + 1)
    if rest < len(text):
        line = text.count("\n", 0, rest) + 1
        raise DataError(f"{path} line {line}: malformed JSON: text after the closing ']'")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _CsvLines:
    """Decoded lines, endings kept (what csv expects of a file opened with newline=""), counting
    them: csv's own line_num lags by one when it raises on a line."""

    def __init__(self, path: Path, handle):
        self.path, self.handle, self.number = path, handle, 0

    def __iter__(self) -> Iterator[str]:
        for data in self.handle:
            self.number += 1
            if self.number == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{self.path} line {self.number}: not valid UTF-8 (byte {exc.start + 1} of the line: {exc.reason})"
                ) from None


def _iter_csv(path: Path, required: Sequence[str]) -> Iterable[tuple[int, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, "rb") as handle:
        lines = _CsvLines(path, handle)
        reader = csv.DictReader(iter(lines), delimiter=delimiter)
        try:
            header = reader.fieldnames
            if header is None:
                return  # empty: read_records says so
            missing = [name for name in required if name not in header]
            if missing:
                raise DataError(
                    f"{path} line 1: column(s) {', '.join(map(repr, missing))} missing from the header "
                    f"(it has: {', '.join(header) or 'nothing'})"
                )
            for row in reader:
                # A short row gives None for the absent columns: report it as missing.
                yield reader.line_num, {k: v for k, v in row.items() if k is not None and v is not None}
        except csv.Error as exc:
            raise DataError(f"{path} line {lines.number}: malformed CSV ({exc})") from None


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


def long_target_error(
    source: str, split: str, records: Sequence[Record], lengths: Sequence[int], max_length: int
) -> DataError:
    """The error for targets over data.max_target_length when data.on_long_target=refuse;
    `lengths` are the targets' token counts, untruncated."""
    over = [(r.line, n) for r, n in zip(records, lengths) if n > max_length]
    shown = ", ".join(f"line {line} ({n} tokens)" for line, n in over[:MAX_REPORTED_PROBLEMS])
    more = f" and {len(over) - MAX_REPORTED_PROBLEMS} more" if len(over) > MAX_REPORTED_PROBLEMS else ""
    return DataError(
        f"{source}: {len(over)} of {len(records)} targets of the {split} split are longer than "
        f"data.max_target_length={max_length} tokens (data.on_long_target=refuse): {shown}{more}. "
        "Raise data.max_target_length, shorten them, or set data.on_long_target=truncate to cut them."
    )
