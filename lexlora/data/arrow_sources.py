"""Rows of Arrow-backed sources: parquet files, saved datasets (`save_to_disk`) and Hugging Face
dataset ids or local dataset directories (`datasets.load_dataset`), for `read_records`.

Each row comes as (source split, 0-based row, dict of the required columns): the row is what
`dataset[split][row]` shows. Integer labels of a `datasets.ClassLabel` column become their names
("neg"/"pos" for IMDB's 0/1), so a target is text as in every other format; -1, datasets' "no
label", is a problem of that row, not a label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

from lexlora.errors import DataError

# `name` or `org/name` as the Hub spells ids; a path with a data file's extension is a missing file.
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
# What save_to_disk writes: a Dataset's state.json, a DatasetDict's dataset_dict.json.
_SAVED_MARKERS = ("state.json", "dataset_dict.json")
_BATCH = 1000
ARROW_FORMATS = ("parquet", "hf", "hub")

Row = tuple["str | None", int, Any]


def looks_like_dataset_id(path: str) -> bool:
    return bool(_DATASET_ID.match(path)) and not path.lower().endswith(_FILE_SUFFIXES)


def is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in _SAVED_MARKERS)


def arrow_rows(fmt: str, path: Any, required: Sequence[str], subset: str | None,
               splits: Collection[str] | None, id_field: str | None = None) -> Iterator[Row]:
    """The rows of a source of format parquet, hf (a saved dataset) or hub (load_dataset): the
    required columns, and `id_field` where the source has it (for the duplicate-id check)."""
    optional = (id_field,) if id_field and id_field not in required else ()
    if fmt == "parquet":
        return iter_parquet(path, required, optional)
    if fmt == "hf":
        return iter_saved(path, required, splits, optional)
    return iter_hub(str(path), subset, required, splits, optional)


def iter_parquet(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> Iterator[Row]:
    import datasets
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # ArrowInvalid, OSError: not parquet, truncated, ...
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    # Dataset(table) restores the features `datasets` stored in the schema (ClassLabel names)
    # without writing a cache copy, as load_dataset("parquet") would.
    yield from _rows(datasets.Dataset(table), None, required, str(path), optional)


def iter_saved(path: Path, required: Sequence[str], splits: Collection[str] | None,
               optional: Sequence[str] = ()) -> Iterator[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, ValueError, arrow errors
        raise DataError(f"{path}: not a saved Hugging Face dataset ({exc})") from None
    yield from _splits(loaded, required, splits, str(path), optional)


def iter_hub(name: str, subset: str | None, required: Sequence[str], splits: Collection[str] | None,
             optional: Sequence[str] = ()) -> Iterator[Row]:
    """`datasets.load_dataset(name, subset)`: a Hub id (from the datasets cache when offline) or a
    local directory of data files (splits named by file: train.parquet, test.csv)."""
    yield from _splits(load_hub(name, subset), required, splits, name, optional)


def load_hub(name: str, subset: str | None) -> Any:
    import datasets

    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    try:
        return datasets.load_dataset(name, subset)
    except ConnectionError as exc:
        how = ("HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, so only the datasets cache "
               f"({datasets.config.HF_DATASETS_CACHE}) is read" if offline else "the Hub could not be reached")
        raise DataError(
            f"data.path={name!r} is not a local file or directory, and the Hugging Face dataset {name!r}"
            f"{_subset(subset)} is not in the datasets cache: {how} ({exc}). Load it once where the Hub "
            f"is reachable (datasets.load_dataset({name!r}{', ' + repr(subset) if subset else ''})), set "
            "HF_DATASETS_CACHE to a cache holding it, or point data.path at a local file"
        ) from None
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(f"data.path={name!r}: no such Hugging Face dataset ({exc}); "
                        "check the id, or point data.path at a local file") from None
    except ValueError as exc:
        if "BuilderConfig" in str(exc) or "config name" in str(exc).lower():
            raise DataError(f"data.subset={subset!r} of dataset {name!r}: {exc}") from None
        raise DataError(f"data.path={name!r}{_subset(subset)}: cannot load the dataset ({exc})") from None
    except Exception as exc:  # a dataset script's or Arrow's own errors
        raise DataError(
            f"data.path={name!r}{_subset(subset)}: cannot load the dataset ({type(exc).__name__}: {exc})"
        ) from None


def _subset(subset: str | None) -> str:
    return f" (subset {subset!r})" if subset else ""


def _splits(loaded: Any, required: Sequence[str], wanted: Collection[str] | None, where: str,
            optional: Sequence[str]) -> Iterator[Row]:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        yield from _rows(loaded, None, required, where, optional)
        return
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{where}: expected a dataset with rows, got {type(loaded).__name__} (streaming is not supported)")
    names = list(loaded)
    missing = [name for name in (wanted or ()) if name not in loaded]
    if missing:
        raise DataError(
            f"{where} has no split {missing[0]!r} (named in data.splits); it has: {', '.join(names)}"
        )
    for name in names:
        if wanted is None or name in wanted:
            yield from _rows(loaded[name], name, required, where, optional)


def _rows(dataset: Any, split: str | None, required: Sequence[str], where: str, optional: Sequence[str]) -> Iterator[Row]:
    import datasets

    columns = list(dataset.column_names)
    missing = [name for name in required if name not in columns]
    if missing:
        raise DataError(
            f"{where}{' split ' + split if split else ''}: column(s) {', '.join(map(repr, missing))} missing "
            f"(it has: {', '.join(columns) or 'nothing'}). Check data.input_template, data.target_field "
            "and data.lexical_field"
        )
    names = {c: f.names for c in required if isinstance(f := dataset.features[c], datasets.ClassLabel)}
    subset = dataset.select_columns(list(dict.fromkeys([*required, *(c for c in optional if c in columns)])))
    row = 0
    for batch in subset.iter(batch_size=_BATCH):
        for values in zip(*(batch[c] for c in subset.column_names)):
            raw: Any = dict(zip(subset.column_names, values))
            for column, labels in names.items():
                raw[column] = _class_name(raw[column], labels, column)
                if isinstance(raw[column], RowProblem):
                    raw = raw[column]
                    break
            yield split, row, raw
            row += 1


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with a row as a whole (a ClassLabel id with no name); read_records adds where."""

    message: str


def _class_name(value: Any, labels: Sequence[str], column: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(labels):
            return labels[value]
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        note = " (-1 is datasets' 'no label')" if value == -1 else ""
        return RowProblem(f"field {column!r} holds class id {value}{note}, not one of its {len(labels)} "
                          f"ClassLabel names ({shown})")
    return value
