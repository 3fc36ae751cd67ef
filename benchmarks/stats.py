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
