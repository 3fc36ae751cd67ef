"""benchmarks/serve_ray.py's own arithmetic: the bound on any cache's hit ratio, and a hit counted
per replica only for a good answer whose adapter was resident (load;dur 0)."""

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

serve_ray = pytest.importorskip("serve_ray")


def test_best_share_is_the_share_of_the_most_popular():
    weights = [1 / (rank + 1) for rank in range(4)]  # 1, 1/2, 1/3, 1/4
    assert serve_ray.best_share(weights, 2) == pytest.approx(1.5 / (1 + 1 / 2 + 1 / 3 + 1 / 4))
    assert serve_ray.best_share(list(reversed(weights)), 4) == pytest.approx(1.0)


def test_hits_count_per_replica_for_good_answers_served_resident():
    tally = serve_ray.RayTally()
    tally.add(None, 0.1, 200, {"load": 0.0, "ttft": 5.0}, "{}", "r1")
    tally.add(None, 0.2, 200, {"load": 12.5, "ttft": 5.0}, "{}", "r1")
    tally.add(None, 0.1, 200, {"load": 0.0, "ttft": 5.0}, "{}", "r2")
    tally.add("unknown adapter", 0.1, 404, {}, "{}", "r2")  # a bad request is no answer to count
    tally.add(None, 0.1, 503, {}, "{}", "r2")
    assert tally.by_replica == {"r1": {"answers": 2, "hits": 1}, "r2": {"answers": 1, "hits": 1}}
    assert tally.errors_5xx == 1 and tally.wrong_count == 0
