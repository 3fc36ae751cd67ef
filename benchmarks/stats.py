"""Statistics shared by the quality studies (benchmarks/quality.py, benchmarks/classify.py): the mean
and spread over seeds, and paired-bootstrap intervals of a difference between two arms scored on the
same rows."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of `values`; the sd is NaN for a single value (one
    seed says nothing about the spread over seeds)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def format_mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """`0.431 ± 0.012` (just the mean where the sd is undefined)."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def seed_mean_rows(per_seed: Sequence[Sequence[float]]) -> np.ndarray:
    """Per row, the mean of its scores over seeds (`per_seed[s][i]`: seed s, row i): the row's score
    for an arm, before two arms are compared row by row."""
    lengths = {len(rows) for rows in per_seed}
    if not per_seed or len(lengths) != 1:
        raise ValueError(f"every seed must score the same rows (row counts per seed: {[len(r) for r in per_seed]})")
    return np.asarray(per_seed, dtype=float).mean(axis=0)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(a - b) over paired rows and its percentile bootstrap interval (rows resampled with
    replacement, `resamples` times, from `seed`): (diff, low, high). An interval that contains 0 does
    not tell the two arms apart on these rows."""
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length, non-empty lists of row scores (got {a.shape} and {b.shape})")
    diff = a - b
    if np.all(diff == diff[0]):  # every resample has the same mean; scipy would warn about a degenerate sample
        return float(diff[0]), float(diff[0]), float(diff[0])
    interval = bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=confidence,
                         rng=np.random.default_rng(seed), method="percentile").confidence_interval
    return float(diff.mean()), float(interval.low), float(interval.high)


BOOTSTRAP_METRICS = ("accuracy", "macro_f1")


def _label_ids(predictions: Sequence[Sequence[str]], references: Sequence[str], labels: Sequence[str] | None):
    """Seeds x rows of prediction ids and the rows' reference ids over `labels` (default: the sorted
    distinct references); a prediction outside the labels gets the extra id len(labels), which is
    wrong everywhere and joins no class (as lexlora.evaluation.metrics does with "(other)")."""
    refs = [r.strip() for r in references]
    labels = sorted(set(refs)) if labels is None else list(dict.fromkeys(label.strip() for label in labels))
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(refs) - set(index))
    if unknown:
        raise ValueError(f"references outside the given labels: {unknown}")
    pred_ids = np.array([[index.get(p.strip(), len(labels)) for p in seed] for seed in predictions], dtype=np.int64)
    return pred_ids, np.array([index[r] for r in refs], dtype=np.int64), len(labels)


def _metric_per_sample(pred_ids: np.ndarray, ref_ids: np.ndarray, classes: int, weights: np.ndarray, metric: str) -> np.ndarray:
    """The metric of every (resample, seed): `weights` is resamples x rows (how often each row was
    drawn). Macro-F1 averages per-class F1 over the classes present in the resample's references or
    predictions (scikit-learn's default set), as lexlora's classification_metrics does."""
    out = np.empty((weights.shape[0], pred_ids.shape[0]))
    ref_hot = np.eye(classes + 1)[ref_ids][:, :classes]  # rows x classes
    for s, pred in enumerate(pred_ids):
        correct = (pred == ref_ids).astype(float)
        if metric == "accuracy":
            out[:, s] = weights @ correct / weights.sum(axis=1)
            continue
        pred_hot = np.eye(classes + 1)[pred][:, :classes]
        tp = weights @ (ref_hot * correct[:, None])
        support = weights @ ref_hot + weights @ pred_hot  # 2 tp + fp + fn
        present = support > 0
        f1 = np.divide(2 * tp, support, out=np.zeros_like(tp), where=present)
        out[:, s] = f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return out


def paired_bootstrap_metric(preds_a: Sequence[Sequence[str]], preds_b: Sequence[Sequence[str]], references: Sequence[str],
                            metric: str = "macro_f1", labels: Sequence[str] | None = None, resamples: int = 10_000,
                            seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """Arm a minus arm b on a metric computed over the rows (accuracy or macro-F1, which no per-row
    score gives), and its percentile bootstrap interval: (diff, low, high). `preds_a[s][i]`: arm a's
    label for row i with seed s (each arm may have its own number of seeds); an arm's value is the
    mean over its seeds of the metric. Each resample draws rows with replacement and recomputes both
    arms' values on the same drawn rows, so the pairing is kept."""
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"metric must be one of {', '.join(BOOTSTRAP_METRICS)}, got {metric!r}")
    rows = len(references)
    if rows == 0 or not preds_a or not preds_b or any(len(p) != rows for p in [*preds_a, *preds_b]):
        raise ValueError(f"every seed's predictions must cover the same {rows} reference rows (and there must be some)")
    both, ref_ids, classes = _label_ids([*preds_a, *preds_b], references, labels)
    a_ids, b_ids = both[: len(preds_a)], both[len(preds_a):]
    full = np.ones((1, rows))
    diff = float(_metric_per_sample(a_ids, ref_ids, classes, full, metric).mean()
                 - _metric_per_sample(b_ids, ref_ids, classes, full, metric).mean())
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for start in range(0, resamples, 1000):  # resample weights in chunks: bounded memory
        count = min(1000, resamples - start)
        drawn = rng.integers(0, rows, size=(count, rows))
        weights = np.zeros((count, rows))
        np.add.at(weights, (np.arange(count)[:, None], drawn), 1.0)
        diffs[start : start + count] = (_metric_per_sample(a_ids, ref_ids, classes, weights, metric).mean(axis=1)
                                        - _metric_per_sample(b_ids, ref_ids, classes, weights, metric).mean(axis=1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return diff, float(low), float(high)
