"""PNG plots written by lexlora itself, so looking at a run needs nothing else installed or running.

matplotlib is imported inside the functions (it is only needed when a plot is drawn), and figures
are built with the object-oriented API on an Agg canvas, never through pyplot: no GUI backend, no
change to the process's global backend (harmless inside a notebook or the server), no figure
registry to leak, and safe from any thread.

Every plot function takes its data (or the file it lives in) and a PNG path, draws on the axes from
`_figure`, and returns the path written:

    with _figure(png_path, title="...") as (fig, ax):
        ax.plot(...)
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

DPI = 110
SIZE = (7.0, 4.0)  # inches
LOSS_COLOR = "tab:blue"
VAL_COLOR = "tab:orange"
METRIC_COLOR = "tab:green"


@contextmanager
def _figure(png_path: str | Path, title: str | None = None, size: tuple[float, float] = SIZE) -> Iterator[tuple[Any, Any]]:
    """A figure with one axes; written to `png_path` when the block ends without an error."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    yield fig, ax
    if title:
        ax.set_title(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, skipping blank lines."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def loss_curve_png(
    metrics_jsonl_path: str | Path, png_path: str | Path, metric: str | None = None, title: str = "Training run"
) -> Path:
    """Training loss by step and validation loss by epoch from a training log (metrics.jsonl), with
    `metric` (default: the run's eval_metric from the log's summary, when not val_loss) on a second
    axis. The kept (best) epoch is circled."""
    records = read_jsonl(metrics_jsonl_path)
    train = [r for r in records if "loss" in r and "step" in r]
    epochs = [r for r in records if "val_loss" in r and "step" in r]
    if metric is None:
        summary = next((r["summary"] for r in records if isinstance(r.get("summary"), dict)), {})
        metric = summary.get("eval_metric")
    if metric == "val_loss" or not any(metric in r for r in epochs):
        metric = None
    if not train and not epochs:
        raise ValueError(f"{metrics_jsonl_path}: no training or validation loss to plot")

    png_path = Path(png_path)
    with _figure(png_path, title=title) as (_, ax):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=LOSS_COLOR, label="train loss",
                    marker="." if len(train) <= 50 else None)
        if epochs:
            ax.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", color=VAL_COLOR,
                    label="validation loss (per epoch)")
        ax.grid(True, alpha=0.3)
        axes = [ax]
        if metric is not None:
            scored = [r for r in epochs if metric in r]
            right = ax.twinx()
            right.set_ylabel(metric)
            right.plot([r["step"] for r in scored], [r[metric] for r in scored], "s--", color=METRIC_COLOR,
                       label=f"validation {metric}")
            if all(r[metric] >= 0 for r in scored):  # scores in 0..1: keep 0 as the floor
                right.set_ylim(bottom=0)
            axes.append(right)
        kept = [r for r in epochs if r.get("best")][-1:]
        if kept:
            on, key = (axes[-1], metric) if metric in kept[0] else (ax, "val_loss")
            on.plot([kept[0]["step"]], [kept[0][key]], "o", markersize=14, fillstyle="none", color="black",
                    label="kept epoch")
        handles, labels = [], []
        for each in axes:
            more_handles, more_labels = each.get_legend_handles_labels()
            handles += more_handles
            labels += more_labels
        ax.legend(handles, labels, loc="best", fontsize="small")
    return png_path


def metric_bars_png(table: list[dict[str, Any]], png_path: str | Path, title: str | None = None) -> Path:
    """Base vs adapter per metric (rows of `EvalResult.table()`), the notebook's bar chart."""
    names = [row["metric"] for row in table]
    positions = list(range(len(names)))
    width = 0.38
    with _figure(png_path, title=title) as (_, ax):
        if any(row.get("base") is not None for row in table):
            base = [row.get("base") or 0.0 for row in table]
            ax.bar([p - width / 2 for p in positions], base, width, label="base", color="tab:gray")
            offset = width / 2
        else:
            offset = 0.0
        adapter = [row["adapter"] for row in table]
        bars = ax.bar([p + offset for p in positions], adapter, width, label="adapter", color=LOSS_COLOR)
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
        ax.set_xticks(positions, names)
        ax.set_ylabel("score")
        ax.set_ylim(0, max([1.0, *adapter]) * 1.05)
        ax.legend(loc="best", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    return Path(png_path)


def confusion_matrix_png(labels: list[str], matrix: list[list[int]], png_path: str | Path, title: str | None = None) -> Path:
    """Rows: references; columns: predictions (counts written in the cells)."""
    size = max(4.0, 0.7 * len(labels) + 2.5)
    with _figure(png_path, title=title, size=(size + 1.0, size)) as (fig, ax):
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ticks = list(range(len(labels)))
        ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize="small")
        ax.set_yticks(ticks, labels, fontsize="small")
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        peak = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize="small",
                        color="white" if peak and count > peak / 2 else "black")
    return Path(png_path)
