"""Deterministic splits of a data source (`datasets` split syntax), read and validated.

A value without a split name slices all rows in order, as before: "[:85%]" is "all[:85%]". A value
may also name the source's own splits, as `datasets` does: "train[:90%]", "train[90%:]", "test",
"train[:1000]+test[:100]". For a source with splits (a DatasetDict: IMDB's train and test) "all" is
its splits one after another, in the source's order.
"""

from __future__ import annotations

import logging
import random
from typing import Mapping, Sequence

from lexlora.config import DataConfig
from lexlora.data.prompts import PromptTemplate, required_fields
from lexlora.data.records import Record, read_records
from lexlora.errors import DataError

logger = logging.getLogger(__name__)

ALL = "all"


def source_splits(splits: Mapping[str, str]) -> set[str] | None:
    """The source splits that `splits` reads; None when one slices all rows (so every split is read)."""
    names: set[str] = set()
    for key, spec in splits.items():
        names.update(_parse(key, spec)[1])
    return None if ALL in names else names


def split_records(records: Sequence[Record], splits: Mapping[str, str], shuffle_seed: int | None, source: str = "data") -> dict[str, list[Record]]:
    """Slice the records with `datasets` split syntax (`[:85%]`, `[100:200]`, `train[90%:]`),
    deterministically; a named split is the records of that source split (`Record.split`)."""
    ordered = list(records)
    groups: dict[str, list[Record]] = {}
    for record in ordered:
        if record.split is not None:
            groups.setdefault(record.split, []).append(record)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
        for rows in groups.values():
            random.Random(shuffle_seed).shuffle(rows)
    lookup = {ALL: ordered, **groups}
    result: dict[str, list[Record]] = {}
    for name, spec in splits.items():
        instruction, used = _parse(name, spec)
        unknown = [split for split in used if split not in lookup]
        if unknown:
            raise DataError(_unknown_split(name, spec, unknown[0], source, list(groups)))
        if ALL in used and groups and ALL not in groups:
            logger.warning(
                "data.splits.%s=%r slices all %d rows of %s, its splits %s one after another; name one "
                "to slice only it (e.g. '%s[:90%%]')", name, spec, len(ordered), source, ", ".join(groups), next(iter(groups)),
            )
        rows: list[Record] = []
        for part in instruction.to_absolute({split: len(rows_) for split, rows_ in lookup.items()}):
            rows.extend(lookup[part.splitname][part.from_ : part.to])
        if not rows:
            raise DataError(f"data.splits.{name}={spec!r} leaves the {name} split of {source} empty ({len(ordered)} records)")
        result[name] = rows
    return result


def _parse(name: str, spec: str):
    """The ReadInstruction of a data.splits value and the split names it uses ("all" for a bare slice)."""
    from datasets import ReadInstruction

    text = spec.strip()
    text = f"{ALL}{text}" if text.startswith("[") else text
    try:
        instruction = ReadInstruction.from_spec(text)
    except (ValueError, AssertionError) as exc:
        raise DataError(
            f"data.splits.{name}={spec!r} is not a valid slice (e.g. '[:85%]', '[85%:95%]', '[:1000]', "
            f"'all', 'train[:90%]', 'test'): {exc}"
        ) from None
    used = [part.strip().split("[", 1)[0].strip() for part in text.split("+")]
    return instruction, used


def _unknown_split(name: str, spec: str, split: str, source: str, has: list[str]) -> str:
    if has:
        return f"data.splits.{name}={spec!r} names the split {split!r}, which {source} lacks; it has: {', '.join(has)}"
    return (f"data.splits.{name}={spec!r} names the split {split!r}, but {source} has no splits of its own "
            "(one file): slice all its rows instead, e.g. '[:90%]' and '[90%:]'")


def load_splits(data: DataConfig, fusion_enabled: bool) -> tuple[dict[str, list[Record]], PromptTemplate, str | None]:
    template, lexical, fields = required_fields(data, fusion_enabled)
    wanted = source_splits(data.splits)  # before reading: an invalid spec is reported at once
    records = read_records(data.path, fields, data.target_field, data.format, data.skip_invalid,
                           id_field=data.id_field, on_duplicate_id=data.on_duplicate_id,
                           subset=data.subset, source_splits=wanted)
    return split_records(records, data.splits, data.shuffle_seed, data.path), template, lexical
