"""`GET /metrics` of `lexlora serve`: Prometheus counters and histograms for requests, tokens and
adapter loads, and gauges read from the worker and the adapter store at scrape time.

Each `ServerMetrics` owns its `CollectorRegistry` (never prometheus_client's global one): several
apps live in one test process, and registering the same metric names twice in one registry fails.
Values the worker and the store already keep (queue depth, rows, residents, `store.stats`) are read
when a scrape comes, not copied on every change, so they can never drift from the source."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

NO_ADAPTER = "(none)"
"""The adapter label of a request whose adapter was not given or not resolved: the names clients
send are only trusted once the store knows them, else made-up names would grow a series each."""

# A warm one-row request takes a few ms on a GPU; a long beam search on CPU, tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A small LoRA loads in a few ms from the page cache; a Hub download can take seconds.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_STORE_COUNTERS = (  # (metric name without _total, store.stats key, help)
    ("lexlora_adapter_loads", "loads", "Adapters loaded into the resident set."),
    ("lexlora_adapter_evictions", "evictions", "Adapters evicted from the resident set (LRU or cap)."),
    ("lexlora_adapter_load_failures", "load_failures", "Adapter loads that failed (missing, corrupt, foreign base)."),
    ("lexlora_adapter_cache_hits", "hits", "Requests whose adapter was resident when they asked for it."),
    ("lexlora_adapter_cache_misses", "misses", "Requests that waited for their adapter to load (failed loads included)."),
)


class ServerMetrics:
    """The server's metrics. `worker` (engine or batcher: `pending`, `active_rows`) and `store`
    (`resident_count`, `resident_bytes`, `stats`, `on_load`) may be None: their series are then
    absent, which keeps this testable alone. The store's load-time hook is attached here, so the
    store must be given at construction for `lexlora_adapter_load_seconds` to fill."""

    def __init__(self, worker: Any = None, store: Any = None):
        self.worker, self.store = worker, store
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lexlora_requests", "Requests answered, by adapter, route and HTTP status.",
            ("adapter", "route", "status"), registry=self.registry)
        self.prompt_tokens = Counter(
            "lexlora_prompt_tokens", "Input tokens of answered requests.", ("adapter",), registry=self.registry)
        self.generation_tokens = Counter(
            "lexlora_generation_tokens", "Tokens generated for answered requests.", ("adapter",),
            registry=self.registry)
        self.duration = Histogram(
            "lexlora_request_duration_seconds", "Time from a request's arrival to its last byte.", ("route",),
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram(
            "lexlora_time_to_first_token_seconds", "Time from a request's arrival to its first generated token.",
            ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.load_seconds = Histogram(
            "lexlora_adapter_load_seconds", "Time to make an adapter resident (successful loads).",
            buckets=LOAD_BUCKETS, registry=self.registry)
        self.registry.register(_LiveCollector(self))
        if store is not None:
            store.on_load.append(self.observe_load)

    def observe_request(self, adapter: str | None, route: str, status: int, seconds: float,
                        ttft_s: float | None, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Count one answered request (any status). `adapter` None: not given or not resolved
        (labelled "(none)"); `ttft_s` None: no token was generated (an error, an empty input)."""
        label = NO_ADAPTER if adapter is None else adapter
        self.requests.labels(adapter=label, route=route, status=str(int(status))).inc()
        self.duration.labels(route=route).observe(seconds)
        if ttft_s is not None:
            self.ttft.labels(route=route).observe(ttft_s)
        if prompt_tokens:
            self.prompt_tokens.labels(adapter=label).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(adapter=label).inc(completion_tokens)

    def observe_load(self, seconds: float) -> None:
        """One successful adapter load (the store's `on_load` hook)."""
        self.load_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a `/metrics` answer in the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LiveCollector(Collector):
    """The series whose values live in the worker and the store, read at each scrape."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        worker, store = self.metrics.worker, self.metrics.store
        if worker is not None:
            yield _gauge("lexlora_queue_depth", "Requests waiting to start decoding.", worker.pending)
            yield _gauge("lexlora_active_rows", "Rows decoding now.", worker.active_rows)
        if store is not None:
            yield _gauge("lexlora_resident_adapters", "Adapters resident in memory.", store.resident_count)
            yield _gauge("lexlora_resident_adapter_bytes", "Bytes of resident adapter tensors.", store.resident_bytes)
            stats = store.stats
            for name, key, documentation in _STORE_COUNTERS:
                yield CounterMetricFamily(name, documentation, value=stats.get(key, 0))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
