"""`lexlora eval`: generate for a split with the adapter and with the base alone (same rows, same
prompts), score both against the references, and write the report.

The rows come from the adapter's own data settings (its config.yaml, or lexlora.json) unless
another data file is given; the task (free text → ROUGE, a small label set → accuracy / F1) is
detected from the references unless set."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lexlora.adapters.format import read_metadata
from lexlora.config import DataConfig
from lexlora.data.splits import load_splits
from lexlora.errors import ConfigError, DataError
from lexlora.evaluation.metrics import detect_task, scalar_metrics, score

TASKS = ("auto", "text", "labels")


@dataclass
class EvalRows:
    records: list[dict[str, str]]
    references: list[str]
    lines: list[int]  # line numbers in the data file, for tracing a row back
    data_path: str
    split: str


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


def data_config_for(adapter_dir: Path, meta: dict[str, Any]) -> DataConfig:
    """The data settings the adapter was trained with (lexlora.json keeps all but the path)."""
    recorded = dict(meta.get("data") or {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    config = DataConfig(**{k: v for k, v in recorded.items() if k in known})
    config.path = (meta.get("dataset") or {}).get("path") or ""
    adapter = meta["adapter"]
    config.input_template = adapter["input_template"]
    config.target_field = adapter["target_field"]
    config.lexical_field = adapter.get("lexical_field") or config.lexical_field
    return config


def eval_rows(
    adapter_dir: str | Path,
    split: str = "test",
    data_path: str | None = None,
    max_rows: int | None = None,
) -> EvalRows:
    """The split's records (as the adapter's template needs them) and references.

    `split` names one of the adapter's data.splits, or "all" for every row of the file."""
    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    data = data_config_for(adapter_dir, meta)
    if data_path:
        data.path = str(data_path)
    if not data.path or not Path(data.path).exists():
        raise DataError(
            f"data file {data.path or '(none recorded)'} not found (recorded in {adapter_dir}/lexlora.json "
            "relative to where training ran); pass --data FILE"
        )
    if split == "all":
        data.splits = {"all": "[:100%]"}
    elif split not in data.splits:
        raise ConfigError(
            f"split {split!r} is not one of this adapter's splits {sorted(data.splits)} "
            "(or use --split all for the whole file)"
        )
    splits, _, _ = load_splits(data, fusion_enabled=bool(meta["adapter"].get("fusion_mode")))
    records = splits[split][:max_rows] if max_rows else splits[split]
    if not records:
        raise DataError(f"{data.path}: split {split!r} ({data.splits[split]}) has no rows")
    return EvalRows(
        records=[dict(r.fields) for r in records],
        references=[r.fields[data.target_field] for r in records],
        lines=[r.line for r in records],
        data_path=data.path,
        split=split,
    )


def evaluate_adapter(
    registry,
    name: str,
    rows: EvalRows,
    task: str = "auto",
    with_base: bool = True,
    bleu: bool = False,
    **generate_kwargs: Any,
) -> EvalResult:
    """Generate with the adapter `name` of a LexLoRA registry (and with its base alone on the same
    prompts), then score both."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    task = detect_task(rows.references) if task == "auto" else task
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    adapter_out = registry.generate(rows.records, adapter=name, **generate_kwargs)
    seconds["adapter_generate"] = round(time.perf_counter() - started, 3)
    base_out = None
    if with_base:
        started = time.perf_counter()
        with registry.disable_adapters():
            base_out = registry.generate(rows.records, adapter=name, **generate_kwargs)
        seconds["base_generate"] = round(time.perf_counter() - started, 3)
    spec = registry.adapters[name].spec
    shown = spec.lexical_field or spec.input_fields[0]
    return EvalResult(
        adapter=name,
        split=rows.split,
        data_path=rows.data_path,
        task=task,
        count=len(rows.references),
        adapter_scores=score(task, adapter_out, rows.references, bleu=bleu),
        base_scores=score(task, base_out, rows.references, bleu=bleu) if base_out is not None else None,
        rows=[
            {"line": line, "input": record[shown] if len(spec.input_fields) == 1 else record,
             "reference": ref, "base": base_out[i] if base_out else None, "adapter": out}
            for i, (line, record, ref, out) in enumerate(zip(rows.lines, rows.records, rows.references, adapter_out))
        ],
        seconds=seconds,
    )


def qualitative_rows(result: EvalResult, count: int = 5) -> list[dict[str, Any]]:
    """A few rows to read: spread evenly over the split, so they are not all from its start."""
    rows: Sequence[dict[str, Any]] = result.rows
    if len(rows) <= count:
        return list(rows)
    step = len(rows) / count
    return [rows[int(i * step)] for i in range(count)]


def run_evaluation(
    adapter_dir: str | Path,
    split: str = "test",
    data_path: str | None = None,
    out_dir: str | Path | None = None,
    task: str = "auto",
    max_rows: int | None = None,
    with_base: bool = True,
    bleu: bool = False,
    base: str | None = None,
    device: str | None = None,
    samples: int = 5,
    **generate_kwargs: Any,
) -> tuple[EvalResult, Path]:
    """The whole `lexlora eval`: rows, registry on the adapter's base, generation, scores, report
    (default: `<adapter>/eval/<split>`)."""
    from lexlora.evaluation.reports import write_eval_report
    from lexlora.serving.registry import LexLoRA

    adapter_dir = Path(adapter_dir)
    rows = eval_rows(adapter_dir, split, data_path, max_rows)  # fails fast, before any model loads
    if task == "auto":
        task = _recorded_task(read_metadata(adapter_dir))
    registry = LexLoRA.from_pretrained(base, device=device) if base else LexLoRA.for_adapter(adapter_dir, device=device)
    name = adapter_dir.resolve().name
    registry.load_adapter(adapter_dir, name=name)
    result = evaluate_adapter(registry, name, rows, task=task, with_base=with_base, bleu=bleu, **generate_kwargs)
    out = write_eval_report(result, Path(out_dir) if out_dir else adapter_dir / "eval" / split, samples)
    return result, out


def _recorded_task(meta: dict[str, Any]) -> str:
    """The task the adapter was trained for, when its config set one (data.task)."""
    task = (meta.get("data") or {}).get("task") or "auto"
    return task if task in TASKS else "auto"
