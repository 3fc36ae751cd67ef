"""What `lexlora eval` produces, as data: the rows scored, how their file compares with the
training data, and the scores. The runner fills these in; the reports write them out (so neither
imports the other)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lexlora.evaluation.metrics import scalar_metrics

# DataCheck.status: the training file unchanged (or a file with the same bytes); the training file
# changed since (scored only with --allow-data-change); another file, given with --data; or not
# checked, as the adapter records no hash (old adapters, saved dataset dirs).
DATA_SAME, DATA_CHANGED, DATA_OTHER, DATA_UNCHECKED = "same", "changed", "other", "unchecked"


@dataclass
class DataCheck:
    """The scored data file against the one the adapter was trained on (its lexlora.json)."""

    status: str
    sha256: str | None  # of the file scored; None for a dataset dir
    trained_path: str | None
    trained_sha256: str | None

    def note(self, data_path: str) -> str | None:
        """One line for the report when the data is not (exactly) the training data."""
        now, then = _short(self.sha256), _short(self.trained_sha256)
        if self.status == DATA_CHANGED:
            return (f"{data_path} changed since the adapter was trained on it (sha256 {now} now, {then} then); "
                    "scored anyway (--allow-data-change): the split may hold other rows than it did")
        if self.status == DATA_OTHER:
            return (f"{data_path} is not the training data ({self.trained_path}, sha256 {then}; this file: {now}); "
                    "its splits are slices of this file")
        if self.status == DATA_UNCHECKED:
            return "not checked against the training data: the adapter records no sha256 of it"
        return None


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


@dataclass
class EvalRows:
    records: list[dict[str, str]]
    references: list[str]
    lines: list[int]  # line numbers in the data file, for tracing a row back
    data_path: str
    split: str
    data_check: DataCheck | None = None


@dataclass
class EvalResult:
    adapter: str
    split: str
    data_path: str
    task: str
    count: int
    adapter_scores: dict[str, Any]
    base_scores: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # input, reference, base, adapter
    seconds: dict[str, float] = field(default_factory=dict)
    data_check: DataCheck | None = None

    def table(self) -> list[dict[str, Any]]:
        """One row per scalar metric: base, adapter, absolute gain (the notebook's improvement table)."""
        adapter = scalar_metrics(self.adapter_scores)
        base = scalar_metrics(self.base_scores) if self.base_scores else {}
        return [
            {"metric": name, "base": base.get(name), "adapter": value,
             "gain": value - base[name] if name in base else None}
            for name, value in adapter.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "table": self.table()}


def qualitative_rows(result: EvalResult, count: int = 5) -> list[dict[str, Any]]:
    """A few rows to read: spread evenly over the split, so they are not all from its start."""
    rows: Sequence[dict[str, Any]] = result.rows
    if len(rows) <= count:
        return list(rows)
    step = len(rows) / count
    return [rows[int(i * step)] for i in range(count)]
