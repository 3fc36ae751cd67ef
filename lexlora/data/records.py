"""Read records from JSONL, JSON, CSV, parquet, a saved HF dataset or a Hugging Face dataset id, and
validate them before any model work.

Text formats are parsed with the standard library rather than Arrow's readers: Arrow reports byte
blocks instead of line numbers and coerces types (a CSV filename "123" becomes an int), while users
need "file.jsonl line 7: field 'file_desc' is missing". Parquet files, saved datasets and dataset
ids go through `datasets` (lexlora.data.arrow_sources): their rows are 0-based ("file.parquet row
7", "imdb train row 7"), and each record keeps its source split for `data.splits` ("train[:90%]").

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
from typing import Any, Collection, Iterable, Iterator, Sequence

from lexlora.config import DUPLICATE_IDS
from lexlora.data.arrow_sources import ARROW_FORMATS, RowProblem, arrow_rows
from lexlora.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


MAX_REPORTED_PROBLEMS = 10
DEFAULT_ID_FIELD = "id"


@dataclass(frozen=True)
class Record:
    """One validated record and where it came from: its 1-based line, or for Arrow sources
    (unit "row") its 0-based row in `split`, the source's own split (None for a file without splits)."""

    line: int
    fields: dict[str, str]
    split: str | None = None
    unit: str = "line"

    @property
    def place(self) -> str:
        """"line 7", "row 7" or "train row 7", for messages."""
        return _place(self.split, self.unit, self.line)


def _place(split: str | None, unit: str, line: int) -> str:
    return f"{split + ' ' if split else ''}{unit} {line}"


@dataclass(frozen=True)
class Problem:
    where: str  # "file.jsonl line 7"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """`fmt` unless auto: a directory is a saved dataset (save_to_disk) or else a dataset directory of
    data files (hub: load_dataset reads it); a path that does not exist but reads as a dataset id
    (`name`, `org/name`) is hub; otherwise the extension says."""
    from lexlora.data.arrow_sources import is_saved_dataset, looks_like_dataset_id

    if fmt != "auto":
        return fmt
    name, path = str(path), Path(path)
    if path.is_dir():
        return "hf" if is_saved_dataset(path) else "hub"
    if not path.exists() and looks_like_dataset_id(name):
        return "hub"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise DataError(
        f"{path}: cannot tell the format from the extension {suffix!r}; "
        "use .jsonl, .json, .csv, .parquet, a dataset directory or id, or set data.format"
    )


def read_records(
    path: str | Path,
    required_fields: Sequence[str],
    target_field: str,
    fmt: str = "auto",
    skip_invalid: bool = False,
    id_field: str | None = None,
    on_duplicate_id: str = "warn",
    subset: str | None = None,
    source_splits: Collection[str] | None = None,
) -> list[Record]:
    """All valid records of `path`, keeping only `required_fields` (all must be non-null strings;
    the target must not be blank). Invalid records raise `DataError` naming file, line and field,
    or with `skip_invalid` are skipped and counted in a warning. Rows repeating an earlier id
    (`id_field`, default `id` when present) are handled by `on_duplicate_id` (see the module doc).
    For a source with splits (a DatasetDict), `source_splits` names the ones to read (None: all;
    one it lacks is an error listing those it has); `subset` is a dataset id's config name."""
    if on_duplicate_id not in DUPLICATE_IDS:
        raise ConfigError(f"data.on_duplicate_id must be one of {', '.join(DUPLICATE_IDS)}; got {on_duplicate_id!r}")
    fmt = detect_format(path, fmt)
    if fmt != "hub" and not Path(path).exists():
        raise DataError(f"data file not found: {path}")
    path = Path(path) if fmt != "hub" else path
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv}
    if fmt not in (*readers, *ARROW_FORMATS):
        raise DataError(f"{path}: unknown data format {fmt!r}")
    if fmt not in ("hf", "hub") and path.is_dir():
        raise DataError(f"{path}: is a directory, not a {fmt} file (a saved dataset needs data.format=hf or auto)")
    where_word = "row" if fmt in ARROW_FORMATS else "line"

    records: list[Record] = []
    problems: list[Problem] = []
    ids: dict[str, tuple[str | None, int]] = {}  # id (as JSON) -> (split, line) of its first record
    duplicates: list[tuple[str, tuple[str | None, int], tuple[str | None, int]]] = []  # (id, first, this)
    rows = 0
    fields_seen: dict[str, None] = {}  # every key of every object row, in order of appearance
    id_name = id_field or DEFAULT_ID_FIELD
    try:
        rows_of = (arrow_rows(fmt, path, required_fields, subset, source_splits, id_name) if fmt in ARROW_FORMATS
                   else ((None, line, raw) for line, raw in readers[fmt](path, required_fields)))
        for split, line, raw in rows_of:
            rows += 1
            where = f"{path} {_place(split, where_word, line)}"
            if isinstance(raw, Problem):
                problems.append(raw)
                continue
            if isinstance(raw, RowProblem):
                problems.append(Problem(where, raw.message))
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
                    duplicates.append((key, ids[key], (split, line)))
                    if on_duplicate_id == "drop":
                        continue
                else:
                    ids[key] = (split, line)
            records.append(Record(line, {name: raw[name] for name in required_fields}, split, where_word))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None

    if rows == 0:
        raise DataError(f"{path}: the file is empty (no records)" if where_word == "line" else f"{path}: the dataset has no rows")
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


def _report_duplicates(path: Path, name: str, word: str, duplicates: list, policy: str) -> None:
    def pair(first: tuple[str | None, int], this: tuple[str | None, int]) -> str:
        if first[0] is None and this[0] is None:
            return f"{word}s {first[1]} and {this[1]}"
        return f"{first[0]} {word} {first[1]} and {this[0]} {word} {this[1]}"

    examples = "; ".join(f"{name} {key} on {pair(first, this)}" for key, first, this in duplicates[:5])
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


def long_target_error(
    source: str, split: str, records: Sequence[Record], lengths: Sequence[int], max_length: int
) -> DataError:
    """The error for targets over data.max_target_length when data.on_long_target=refuse;
    `lengths` are the targets' token counts, untruncated."""
    over = [(r.place, n) for r, n in zip(records, lengths) if n > max_length]
    shown = ", ".join(f"{place} ({n} tokens)" for place, n in over[:MAX_REPORTED_PROBLEMS])
    more = f" and {len(over) - MAX_REPORTED_PROBLEMS} more" if len(over) > MAX_REPORTED_PROBLEMS else ""
    return DataError(
        f"{source}: {len(over)} of {len(records)} targets of the {split} split are longer than "
        f"data.max_target_length={max_length} tokens (data.on_long_target=refuse): {shown}{more}. "
        "Raise data.max_target_length, shorten them, or set data.on_long_target=truncate to cut them."
    )
