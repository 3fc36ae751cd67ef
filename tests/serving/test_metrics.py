"""`ServerMetrics` alone, with fake worker and store objects: what is observed comes back in a
scrape parsed by prometheus_client's own parser, with its labels, and the gauges and store counters
follow the fakes as they change."""

from prometheus_client.parser import text_string_to_metric_families

from lexlora.serving.metrics import LATENCY_BUCKETS, NO_ADAPTER, ServerMetrics


class FakeWorker:
    pending = 0
    active_rows = 0


class FakeStore:
    def __init__(self):
        self.resident_count, self.resident_bytes = 0, 0
        self.stats = {"loads": 0, "evictions": 0, "load_failures": 0, "hits": 0, "misses": 0}
        self.on_load = []


def scrape(metrics):
    """{sample name: {frozenset of label items: value}} and {family name: type} of one scrape."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples, types = {}, {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples, types


def value(samples, name, **labels):
    return samples[name][frozenset(labels.items())]


def test_requests_and_tokens_by_adapter_route_and_status():
    metrics = ServerMetrics()
    metrics.observe_request("desc", "/generate", 200, 0.02, 0.004, prompt_tokens=12, completion_tokens=5)
    metrics.observe_request("desc", "/generate", 200, 0.5, 0.1, prompt_tokens=8, completion_tokens=3)
    metrics.observe_request("desc", "/v1/completions", 200, 1.5, 0.3, prompt_tokens=1, completion_tokens=1)
    metrics.observe_request(None, "/v1/completions", 404, 0.001, None)
    metrics.observe_request("desc", "/generate", 422, 0.002, None)
    samples, types = scrape(metrics)
    assert types["lexlora_requests"] == "counter"
    assert samples["lexlora_requests_total"] == {
        frozenset({"adapter": "desc", "route": "/generate", "status": "200"}.items()): 2.0,
        frozenset({"adapter": "desc", "route": "/v1/completions", "status": "200"}.items()): 1.0,
        frozenset({"adapter": NO_ADAPTER, "route": "/v1/completions", "status": "404"}.items()): 1.0,
        frozenset({"adapter": "desc", "route": "/generate", "status": "422"}.items()): 1.0,
    }
    assert NO_ADAPTER == "(none)"
    # tokens: summed per adapter over routes; a request with none adds no series
    assert samples["lexlora_prompt_tokens_total"] == {frozenset({"adapter": "desc"}.items()): 21.0}
    assert samples["lexlora_generation_tokens_total"] == {frozenset({"adapter": "desc"}.items()): 9.0}


def test_latency_and_ttft_histograms():
    metrics = ServerMetrics()
    metrics.observe_request("a", "/generate", 200, 0.02, 0.004)
    metrics.observe_request("a", "/generate", 200, 0.5, 0.1)
    metrics.observe_request("a", "/generate", 500, 70.0, None)  # past the last bucket; no first token
    samples, types = scrape(metrics)
    assert types["lexlora_request_duration_seconds"] == types["lexlora_time_to_first_token_seconds"] == "histogram"
    assert value(samples, "lexlora_request_duration_seconds_count", route="/generate") == 3
    assert abs(value(samples, "lexlora_request_duration_seconds_sum", route="/generate") - 70.52) < 1e-9
    assert value(samples, "lexlora_request_duration_seconds_bucket", route="/generate", le="0.025") == 1
    assert value(samples, "lexlora_request_duration_seconds_bucket", route="/generate", le="60.0") == 2
    assert value(samples, "lexlora_request_duration_seconds_bucket", route="/generate", le="+Inf") == 3
    assert value(samples, "lexlora_time_to_first_token_seconds_count", route="/generate") == 2
    assert value(samples, "lexlora_time_to_first_token_seconds_bucket", route="/generate", le="0.005") == 1
    buckets = {dict(k)["le"] for k in samples["lexlora_request_duration_seconds_bucket"]}
    assert buckets == {str(float(b)) for b in LATENCY_BUCKETS} | {"+Inf"}
    assert min(LATENCY_BUCKETS) == 0.005 and max(LATENCY_BUCKETS) == 60.0


def test_gauges_and_store_counters_follow_the_sources_at_scrape_time():
    worker, store = FakeWorker(), FakeStore()
    metrics = ServerMetrics(worker, store)
    samples, types = scrape(metrics)
    for name in ("lexlora_queue_depth", "lexlora_active_rows", "lexlora_resident_adapters",
                 "lexlora_resident_adapter_bytes"):
        assert types[name] == "gauge" and value(samples, name) == 0
    for name in ("lexlora_adapter_loads", "lexlora_adapter_evictions", "lexlora_adapter_load_failures"):
        assert types[name] == "counter" and value(samples, f"{name}_total") == 0

    worker.pending, worker.active_rows = 7, 3
    store.resident_count, store.resident_bytes = 32, 54_400_000
    store.stats.update(loads=40, evictions=8, load_failures=2, hits=100)
    samples, _ = scrape(metrics)
    assert value(samples, "lexlora_queue_depth") == 7 and value(samples, "lexlora_active_rows") == 3
    assert value(samples, "lexlora_resident_adapters") == 32
    assert value(samples, "lexlora_resident_adapter_bytes") == 54_400_000
    assert value(samples, "lexlora_adapter_loads_total") == 40
    assert value(samples, "lexlora_adapter_evictions_total") == 8
    assert value(samples, "lexlora_adapter_load_failures_total") == 2

    worker.pending = 0
    store.resident_count = 31
    samples, _ = scrape(metrics)
    assert value(samples, "lexlora_queue_depth") == 0 and value(samples, "lexlora_resident_adapters") == 31


def test_load_times_come_through_the_store_hook():
    store = FakeStore()
    metrics = ServerMetrics(None, store)
    assert store.on_load == [metrics.observe_load]
    for seconds in (0.004, 0.02, 3.0):
        for hook in store.on_load:
            hook(seconds)
    samples, types = scrape(metrics)
    assert types["lexlora_adapter_load_seconds"] == "histogram"
    assert value(samples, "lexlora_adapter_load_seconds_count") == 3
    assert abs(value(samples, "lexlora_adapter_load_seconds_sum") - 3.024) < 1e-9
    assert value(samples, "lexlora_adapter_load_seconds_bucket", le="0.005") == 1
    assert value(samples, "lexlora_adapter_load_seconds_bucket", le="0.05") == 2
    assert value(samples, "lexlora_adapter_load_seconds_bucket", le="+Inf") == 3


def test_without_worker_or_store_their_series_are_absent():
    samples, _ = scrape(ServerMetrics())
    for name in ("lexlora_queue_depth", "lexlora_active_rows", "lexlora_resident_adapters",
                 "lexlora_adapter_loads_total"):
        assert name not in samples
    samples, _ = scrape(ServerMetrics(FakeWorker()))
    assert value(samples, "lexlora_queue_depth") == 0 and "lexlora_resident_adapters" not in samples


def test_each_instance_has_its_own_registry():
    """Two apps in one process: no 'Duplicated timeseries' error, and no counts shared."""
    first, second = ServerMetrics(FakeWorker(), FakeStore()), ServerMetrics(FakeWorker(), FakeStore())
    first.observe_request("a", "/generate", 200, 0.1, 0.01)
    assert "lexlora_requests_total" in scrape(first)[0]
    assert "lexlora_requests_total" not in scrape(second)[0]  # a labelled counter with no child yet
