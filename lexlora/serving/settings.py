"""`ServeSettings`: everything `lexlora serve` is told, its own module so that the request parser,
the app and the server read one set of defaults (the CLI's too) without importing each other."""

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeSettings:
    # Where the adapters are, where to listen, and the base they share.
    adapters_dir: Path = Path("adapters")  # each adapter dir under it is served under its dir name
    host: str = "127.0.0.1"  # this machine only
    port: int = 8000
    base: str | None = None  # base model id or path; None: the first adapter's that loads
    task: str = "seq2seq"  # the kind of adapters a --base serves: seq2seq, or classification (its encoder)
    device: str = "auto"  # "auto": CUDA when present, else CPU (as training picks); or any torch device
    allow_pickle: bool = False  # startup loads only; POST /adapters stays safetensors-only
    skip_invalid: bool = False  # a pinned / preloaded adapter that fails: serve without it instead of refusing to start
    # The adapter store: adapters are loaded on first request and kept in a bounded resident set.
    max_resident_adapters: int = 128  # resident at once (least recently used without requests in flight evicted)
    max_resident_mb: float | None = 512.0  # their tensors' size; None: no byte cap
    pin: tuple[str, ...] = ()  # loaded at startup and never evicted
    preload: tuple[str, ...] = ()  # loaded at startup (evictable)
    preload_all: bool = False  # load every adapter dir at startup (as before the store): a failing one stops it
    allow_hub: bool = False  # names org/name[@revision] load from the Hugging Face Hub (or its local cache)
    failure_ttl_s: float = 10.0  # a failed load is answered from memory this long before it is retried
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on every route but /health; env LEXLORA_API_KEY
    # Limits on each request.
    max_inputs: int = 64  # inputs per request
    max_input_chars: int = 1000  # per string (an input, or a record's field)
    max_batch_rows: int = 32  # rows decoding at once (the engine's slots; the static batcher's batch)
    batch_wait_ms: float = 5.0  # static batcher only: how long a request waits for others to join its batch
    engine: str = "continuous"  # "continuous": rows join and leave every step; "static": one batch at a time
    max_queue: int = 256  # requests waiting for a slot; beyond it, 503 with Retry-After at once
    lexical_cache_entries: int = 20_000  # lexical vectors kept in memory (~2 KB each); none written to disk
    max_body_bytes: int = 4 << 20  # request body; 64 inputs of 1000 characters take at most ~400 KB
    body_timeout_s: float = 30.0  # a request body must arrive within this time of its first byte
    # Ray Serve (`--ray`, ray_app.py): the same app on replicas that each hold a base, an engine and a store.
    ray: bool = False
    ray_address: str | None = None  # None: start a Ray cluster on this machine; "auto", "ray://host:10001", ...
    replicas: int | None = None  # fixed replica count; None: one per GPU of the cluster, else 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled by requests in flight
    replica_cpus: float | None = None  # Ray CPUs per replica (torch threads follow it); None: 1
    replica_gpus: float | None = None  # Ray GPUs per replica; None: 1 where the cluster has GPUs, else 0
    multiplex: bool = True  # route each request to a replica holding its adapter (off: Ray's plain routing)
    ingress_replicas: int = 1  # the ingress forwards ~90 requests/s per core (benchmarks/results/serve_ray.md)

    def __post_init__(self) -> None:
        self.adapters_dir = Path(self.adapters_dir)
        self.pin, self.preload = tuple(self.pin or ()), tuple(self.preload or ())
        if self.autoscale is not None:
            self.autoscale = tuple(self.autoscale)
