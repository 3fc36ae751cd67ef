"""benchmarks/stats.py: mean ± sd over seeds, per-row seed means, paired-bootstrap intervals."""

import math
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from stats import format_mean_sd, mean_sd, paired_bootstrap, seed_mean_rows  # noqa: E402


def test_mean_sd_is_the_sample_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, sd = mean_sd([0.5])
    assert mean == 0.5 and math.isnan(sd)  # one seed says nothing about the spread
    with pytest.raises(ValueError):
        mean_sd([])


def test_format_mean_sd():
    assert format_mean_sd([0.40, 0.42, 0.44]) == "0.420 ± 0.020"
    assert format_mean_sd([0.4]) == "0.400"
    assert format_mean_sd([100, 110], 0) == "105 ± 7"


def test_seed_mean_rows_averages_each_row_over_seeds():
    assert seed_mean_rows([[0.0, 1.0, 0.5], [1.0, 1.0, 0.0]]).tolist() == [0.5, 1.0, 0.25]
    with pytest.raises(ValueError, match="same rows"):
        seed_mean_rows([[0.0, 1.0], [1.0]])


def test_paired_bootstrap_constant_shift_is_exact():
    a = np.linspace(0, 1, 30)
    assert paired_bootstrap(a + 0.1, a, resamples=200, seed=0) == pytest.approx((0.1, 0.1, 0.1))


def test_paired_bootstrap_interval_brackets_the_difference_and_is_reproducible():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=100), rng.uniform(size=100)
    diff, low, high = paired_bootstrap(a, b, resamples=2000, seed=0)
    assert diff == pytest.approx(float(np.mean(a - b)))
    assert low < diff < high
    # The spread of a mean of 100 uniform differences: sd ~ 0.41 / 10, so the interval is ~0.16 wide.
    assert 0.08 < high - low < 0.25
    assert paired_bootstrap(a, b, resamples=2000, seed=0) == (diff, low, high)
    assert paired_bootstrap(a, b, resamples=2000, seed=1) != (diff, low, high)


def test_paired_bootstrap_sees_a_clear_gain_and_no_gain():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=200)
    better = base + rng.normal(0.05, 0.02, size=200)
    assert paired_bootstrap(better, base, resamples=2000, seed=0)[1] > 0
    noisy = base + rng.normal(0.0, 0.2, size=200)
    _, low, high = paired_bootstrap(noisy, base, resamples=2000, seed=0)
    assert low < 0 < high


def test_paired_bootstrap_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([0.1, 0.2], [0.1], resamples=100, seed=0)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([], [], resamples=100, seed=0)
