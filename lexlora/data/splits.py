"""Deterministic splits of a data file (`datasets` slice syntax), read and validated."""

from __future__ import annotations

import random
from typing import Mapping, Sequence

from lexlora.config import DataConfig
from lexlora.data.prompts import PromptTemplate, required_fields
from lexlora.data.records import Record, read_records
from lexlora.errors import DataError


def split_records(records: Sequence[Record], splits: Mapping[str, str], shuffle_seed: int | None, source: str = "data") -> dict[str, list[Record]]:
    """Slice the records with `datasets` split syntax (`[:85%]`, `[100:200]`), deterministically."""
    from datasets import ReadInstruction

    ordered = list(records)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
    result: dict[str, list[Record]] = {}
    for name, spec in splits.items():
        spec = spec.strip()
        text = spec if spec.startswith("all") else f"all{spec}" if spec.startswith("[") else spec
        try:
            instructions = ReadInstruction.from_spec(text).to_absolute({"all": len(ordered)})
        except (ValueError, AssertionError) as exc:
            raise DataError(
                f"data.splits.{name}={spec!r} is not a valid slice (e.g. '[:85%]', '[85%:95%]', '[:1000]', 'all'): {exc}"
            ) from None
        rows: list[Record] = []
        for instruction in instructions:
            rows.extend(ordered[instruction.from_ : instruction.to])
        if not rows:
            raise DataError(f"data.splits.{name}={spec!r} leaves the {name} split of {source} empty ({len(ordered)} records)")
        result[name] = rows
    return result


def load_splits(data: DataConfig, fusion_enabled: bool) -> tuple[dict[str, list[Record]], PromptTemplate, str | None]:
    template, lexical, fields = required_fields(data, fusion_enabled)
    records = read_records(data.path, fields, data.target_field, data.format, data.skip_invalid,
                           id_field=data.id_field, on_duplicate_id=data.on_duplicate_id)
    return split_records(records, data.splits, data.shuffle_seed, data.path), template, lexical
