"""`ServeSettings`: everything `lexlora serve` is told, its own module so that the request parser,
the app and the server read one set of defaults (the CLI's too) without importing each other."""

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeSettings:
    # Where the adapters are, where to listen, and the base they share.
    adapters_dir: Path = Path("adapters")  # each adapter dir under it is loaded under its dir name
    host: str = "127.0.0.1"  # this machine only
    port: int = 8000
    base: str | None = None  # base model id or path; None: the first adapter's that loads
    device: str = "auto"  # "auto": CUDA when present, else CPU (as training picks); or any torch device
    allow_pickle: bool = False  # startup loads only; POST /adapters stays safetensors-only
    skip_invalid: bool = False  # serve the adapters that load instead of refusing to start
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

    def __post_init__(self) -> None:
        self.adapters_dir = Path(self.adapters_dir)
