"""Evaluation reports: eval.json (every figure), report.md (base vs adapter table, qualitative rows),
predictions.jsonl (every row) and PNG charts, written into a temp dir and renamed like adapters, so
an interrupted run never leaves a half report."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from lexlora.adapters.files import publish
from lexlora.evaluation.results import EvalResult, qualitative_rows
from lexlora.fileio import make_staging_dir

logger = logging.getLogger(__name__)


RESULTS_NAME = "eval.json"
REPORT_NAME = "report.md"
PREDICTIONS_NAME = "predictions.jsonl"
METRICS_PNG = "metrics.png"
CONFUSION_PNG = "confusion.png"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        return fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def eval_markdown(result: EvalResult, charts: Sequence[str], samples: int = 5) -> str:
    table = [{**row, "gain": None if row["gain"] is None else f"{row['gain']:+.4f}"} for row in result.table()]
    note = result.data_check.note(result.data_path) if result.data_check else None
    parts = [
        f"# Evaluation of `{result.adapter}`",
        "",
        f"- Data: `{result.data_path}`, split `{result.split}`, {result.count} rows",
        *([f"- **Data**: {note}"] if note else []),
        f"- Task: {result.task} ("
        + ("ROUGE F-measures, rouge_score through `evaluate`" if result.task == "text" else "exact label match")
        + ")",
        f"- Generation seconds: {', '.join(f'{k} {v}' for k, v in result.seconds.items())}",
        "",
        "## Base vs adapter (same rows, same prompts)",
        "",
        markdown_table(table, ["metric", "base", "adapter", "gain"]),
        "",
    ]
    per_class = result.adapter_scores.get("per_class")
    if per_class:
        rows = [{"label": label, **values} for label, values in per_class.items()]
        parts += ["## Per class (adapter)", "", markdown_table(rows, ["label", "precision", "recall", "f1", "support"]), ""]
    parts += [f"![{Path(c).stem}]({c})" for c in charts]
    parts += ["", "## Sample rows", "", markdown_table(qualitative_rows(result, samples),
                                                        ["input", "reference", "base", "adapter"]), ""]
    return "\n".join(parts)


def write_eval_report(result: EvalResult, out_dir: str | Path, samples: int = 5) -> Path:
    """Write the report into `out_dir`, replacing an earlier one only once the new one is complete."""
    staging = make_staging_dir(out_dir)
    try:
        (staging / RESULTS_NAME).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        with open(staging / PREDICTIONS_NAME, "w", encoding="utf-8") as handle:
            for row in result.rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        charts = _charts(result, staging)
        (staging / REPORT_NAME).write_text(eval_markdown(result, charts, samples))
        return publish(staging, out_dir, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _charts(result: EvalResult, directory: Path) -> list[str]:
    """PNG charts; a plotting failure costs the chart, never the figures (logged)."""
    from lexlora.evaluation import plots

    charts = []
    try:
        plots.metric_bars_png(result.table(), directory / METRICS_PNG, title=f"{result.adapter}: base vs adapter")
        charts.append(METRICS_PNG)
        confusion = result.adapter_scores.get("confusion")
        if confusion:
            plots.confusion_matrix_png(confusion["labels"], confusion["matrix"], directory / CONFUSION_PNG,
                                       title=f"{result.adapter}: confusion matrix ({result.split})")
            charts.append(CONFUSION_PNG)
    except Exception as exc:  # noqa: BLE001 - the report is still worth having without its charts
        logger.warning("could not draw the charts (%s: %s); the report has the figures", type(exc).__name__, exc)
    return charts
