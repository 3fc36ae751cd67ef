"""`lexlora serve` under load, against what the model can do in process, side by side in one run.

    HF_HUB_CACHE=$(realpath ../shared/hf/hub) HF_HUB_OFFLINE=1 python benchmarks/serve_load.py [--quick]

flan-t5-small shape with random weights; 50 r=8 adapters with an `add` fusion projection; one-row
requests whose adapter follows a Zipf-like popularity (weight 1/rank) and whose input is a filename
never seen before (so every request embeds its lexical field); 16 new tokens forced
(min_new_tokens = max_new_tokens = 16) in every arm. Measured, in order:

  in process   the limit: `registry.generate` on 32-row mixed batches (rows/s); a lone one-row
               generate (latency); HF `generate` on the base alone, no adapters, batch 32 (rows/s);
               the engine in process with a saturated queue (rows/s, decode step time); the
               limit and HF are measured before and after the engine and averaged
  over HTTP    the real server as a subprocess, closed loop at 1, 4, 16, 32, 64 clients and open-loop
               Poisson arrivals at three rates (requests/s, p50, p99, time to first token from the
               Server-Timing header, mean batch occupancy, server RSS); the static batcher
               (`--engine static`, running beside it and driven in turn) at the same client counts
               (--quick: 1 and 32); then a soak at 32 clients for RSS drift; the limit and a lone
               generate are measured again between the HTTP runs (the machine's speed drifts)

The last line is `RESULT served_ratio=… p50_ratio_1=… p99_over_p50_32=… engine_vs_hf=… rss_drift=…`:
served rows/s at 32 clients over the in-process limit (the mean of its measurements); p50 at 1
client over a lone generate (the mean of its two measurements); p99/p50
at 32 clients; engine in-process rows/s over HF generate on the base; RSS change from the soak's
first minute to its end (--quick: from 15 s to 45 s).
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hotswap import MODEL_ID, make_adapters  # noqa: E402

from lexlora.config import ModelConfig  # noqa: E402
from lexlora.serving.decoding import SamplingParams  # noqa: E402
from lexlora.serving.engine import Engine  # noqa: E402
from lexlora.serving.registry import LexLoRA  # noqa: E402

NEW_TOKENS = 16
WORDS = ["config", "backup", "main", "setup", "utils", "test", "index", "report", "notes", "schema", "model", "train",
         "server", "client", "data", "parse", "render", "cache", "auth", "invoice", "draft", "final", "module", "core"]
EXTS = ["py", "json", "md", "txt", "csv", "yaml", "c", "h", "js", "ts", "html", "sql", "log", "ini", "toml", "xml"]


class Filenames:
    """Plausible filenames, never the same twice (thread-safe)."""

    def __init__(self, seed: int):
        self._random = random.Random(seed)
        self._count = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self._count += 1
            r = self._random
            return f"{r.choice(WORDS)}_{r.choice(WORDS)}_{self._count}.{r.choice(EXTS)}"


class Popularity:
    """Adapter names drawn with weight 1/rank (Zipf-like, s=1)."""

    def __init__(self, names: list[str], seed: int):
        self.names = names
        self.weights = [1 / (rank + 1) for rank in range(len(names))]
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, count: int = 1) -> list[str]:
        with self._lock:
            return self._random.choices(self.names, self.weights, k=count)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)] if values else float("nan")


# ---- in process ----------------------------------------------------------------------------------
def in_process(adapters_dir: Path, quick: bool) -> tuple[dict, object, object]:
    """The in-process figures, and functions measuring the limit and a lone generate again (called
    between the HTTP runs, while the servers are idle)."""
    config = ModelConfig(name_or_path=MODEL_ID, random_init=True)
    registry = LexLoRA.from_config(config)
    registry.lexical_cache_entries = 20_000  # as the server keeps them: in memory, nothing written to disk
    names = [d.name for d in sorted(adapters_dir.iterdir())]
    for d in sorted(adapters_dir.iterdir()):
        registry.load_adapter(d)
    names_of, text = Popularity(names, 1), Filenames(1)
    forced = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    reps = 2 if quick else 4
    base, tokenizer = registry.base, registry.tokenizer
    registry.generate([text() for _ in range(32)], adapter=names_of(32), **forced)  # warm: embedding model, caches

    def limit() -> float:
        """registry.generate on 32-row mixed batches, rows/s."""
        start = time.perf_counter()
        for _ in range(reps):
            registry.generate([text() for _ in range(32)], adapter=names_of(32), **forced)
        return reps * 32 / (time.perf_counter() - start)

    def hf() -> float:
        """HF generate on the base alone (no adapters, no fusion), batch 32, rows/s."""
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(reps):
                enc = tokenizer(["Describe the file " + text() + ":" for _ in range(32)], return_tensors="pt", padding=True)
                base.generate(**enc, **forced)
        return reps * 32 / (time.perf_counter() - start)

    def engine_run(engine: Engine) -> tuple[float, float, float]:
        """A saturated engine: reps*3 batches' worth of one-row requests queued at once (rows/s,
        mean occupancy, ms per decoder step including the admissions between steps)."""
        params = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        steps0, occupancy0 = engine.stats["batches"], engine.stats["row_steps"]
        count = reps * 3 * 32
        start = time.perf_counter()
        requests = [engine.submit(name, [text()], params) for name in names_of(count)]
        for request in requests:
            request.future.result()
        elapsed = time.perf_counter() - start
        steps = engine.stats["batches"] - steps0
        return count / elapsed, (engine.stats["row_steps"] - occupancy0) / max(steps, 1), elapsed / max(steps, 1) * 1000

    # Each reference before and after the engine, averaged: the machine's speed drifts within a run.
    limits, hfs = [limit()], [hf()]
    base.generate(**tokenizer(["warm"], return_tensors="pt"), max_new_tokens=2)
    engine = Engine(registry, max_rows=32, max_queue=10_000)
    engine.generate(names[0], [text() for _ in range(4)], SamplingParams(max_new_tokens=NEW_TOKENS))
    engine_rows, occupancy, step_ms = engine_run(engine)
    engine.close()
    limits.append(limit())
    hfs.append(hf())

    def lone_generate() -> float:
        """The median latency of a one-row generate (s)."""
        times = []
        for _ in range(5 if quick else 10):
            t0 = time.perf_counter()
            registry.generate([text()], adapter=names_of(1), **forced)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    lone = lone_generate()
    floor_ms, step_flops = decode_floor(base, 32)
    result = {
        "limit": statistics.mean(limits), "limits": limits, "lone_s": lone, "hf": statistics.mean(hfs),
        "hfs": hfs, "engine": engine_rows, "engine_occupancy": occupancy, "step_ms": step_ms, "floor_ms": floor_ms,
        "step_gflop": step_flops / 1e9,
    }
    del engine
    gc.collect()
    return result, limit, lone_generate


def decode_floor(base, rows: int) -> tuple[float, float]:
    """The FLOPs of one decoder step for `rows` rows (2 per multiply-add of every decoder weight and
    the LM head; attention over ~16 positions is negligible) and the time this machine's best matmul
    rate would need for them (ms)."""
    decoder = sum(p.numel() for n, p in base.named_parameters() if n.startswith("decoder.") and "embed" not in n)
    head = base.get_output_embeddings().weight.numel()
    flops = 2 * rows * (decoder + head)
    a, b = torch.randn(rows, 512), torch.randn(512, 32128)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    rate = 20 * 2 * rows * 512 * 32128 / (time.perf_counter() - start)  # FLOP/s at the LM head's shape
    return flops / rate * 1000, flops


# ---- over HTTP -----------------------------------------------------------------------------------
class Server:
    """`lexlora serve` as a subprocess, up once /health answers (`startup_s`: from process start)."""

    def __init__(self, adapters_dir: Path, port: int, engine: str = "continuous", flags: tuple[str, ...] = (),
                 poll_s: float = 0.5, timeout_s: float = 180):
        self.port = port
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lexlora.cli", "serve", "--adapters", str(adapters_dir), "--port", str(port),
             "--engine", engine, "--max-queue", "512", *flags],
            stdout=subprocess.DEVNULL, stderr=self.log, text=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.health()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    self.log.seek(0)
                    raise RuntimeError(f"the server did not start: {self.log.read()[-2000:]}") from None
                time.sleep(poll_s)
        self.startup_s = time.perf_counter() - started

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Client:
    """One keep-alive connection sending one-row requests."""

    def __init__(self, port: int, names, text):
        self.port, self.names, self.text = port, names, text
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self) -> tuple[float, float | None, int]:
        body = json.dumps({"adapter": self.names(1)[0], "inputs": [self.text()], "max_new_tokens": NEW_TOKENS,
                           "min_new_tokens": NEW_TOKENS})
        start = time.perf_counter()
        try:
            self.conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            return time.perf_counter() - start, None, 0
        return time.perf_counter() - start, _ttft(response.getheader("Server-Timing")), response.status


def _ttft(header: str | None) -> float | None:
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == "ttft" and dur:
            return float(dur) / 1000
    return None


class Tally:
    """Latencies and times to first token of the requests that succeeded, and a count of the others."""

    def __init__(self):
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.errors = 0
        self._lock = threading.Lock()

    def record(self, latency: float, ttft: float | None, status: int) -> None:
        with self._lock:
            if status != 200:
                self.errors += 1
                return
            self.latencies.append(latency)
            if ttft is not None:
                self.ttfts.append(ttft)


def closed_loop(server: Server, clients: int, seconds: float, names, text) -> dict[str, float]:
    before = server.health()
    tally = Tally()
    stop_at = time.perf_counter() + seconds

    def run():
        client = Client(server.port, names, text)
        while time.perf_counter() < stop_at:
            tally.record(*client.send())

    start = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return summarize(server, before, tally.latencies, tally.ttfts, tally.errors, elapsed)


def open_loop(server: Server, rate: float, seconds: float, names, text) -> dict[str, float]:
    """Poisson arrivals at `rate` requests/s; each request on its own connection and thread."""
    before = server.health()
    tally = Tally()
    arrivals = random.Random(7)
    threads = []

    def one():
        tally.record(*Client(server.port, names, text).send())

    start = time.perf_counter()
    next_at = start
    while next_at < start + seconds:
        time.sleep(max(next_at - time.perf_counter(), 0))
        thread = threading.Thread(target=one)
        thread.start()
        threads.append(thread)
        next_at += arrivals.expovariate(rate)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return summarize(server, before, tally.latencies, tally.ttfts, tally.errors, elapsed)


def summarize(server, before, latencies, ttfts, errors, elapsed) -> dict[str, float]:
    after = server.health()
    steps = after["batches"] - before["batches"]
    occupancy = (after.get("row_steps", 0) - before.get("row_steps", 0)) / steps if steps else float("nan")
    if after.get("engine") == "static":
        occupancy = (after["rows"] - before["rows"]) / steps if steps else float("nan")
    return {
        "rps": len(latencies) / elapsed, "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99),
        "ttft50": pct(ttfts, 0.5) if ttfts else float("nan"), "occupancy": occupancy, "errors": errors,
        "rss_mb": server.rss() / 2**20, "n": len(latencies),
    }


def row(label: str, m: dict[str, float]) -> str:
    return (f"{label:<28} {m['rps']:7.1f} req/s  p50 {m['p50'] * 1000:7.0f} ms  p99 {m['p99'] * 1000:7.0f} ms  "
            f"ttft50 {m['ttft50'] * 1000:6.0f} ms  occupancy {m['occupancy']:5.1f}  RSS {m['rss_mb']:6.0f} MB  "
            f"n={m['n']} errors={m['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a version of at most ~3 minutes, same RESULT keys")
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--port", type=int, default=8931)
    args = parser.parse_args()
    quick = args.quick
    seconds = 6 if quick else 30
    torch.manual_seed(0)
    print(f"lexlora serve_load: {args.adapters} adapters, {NEW_TOKENS} forced new tokens, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters_dir = Path(tmp) / "adapters"
        adapters_dir.mkdir()
        make_adapters(adapters_dir, args.adapters, 8, ModelConfig(name_or_path=MODEL_ID, random_init=True))
        for d in adapters_dir.iterdir():  # 16 new tokens by default, like the requests
            meta = json.loads((d / "lexlora.json").read_text())
            meta.setdefault("generation", {})["max_new_tokens"] = NEW_TOKENS
            (d / "lexlora.json").write_text(json.dumps(meta))
        names = sorted(d.name for d in adapters_dir.iterdir())

        ref, measure_limit, measure_lone = in_process(adapters_dir, quick)
        print(f"in process: registry.generate 32-row mixed batches {ref['limit']:.1f} rows/s (the limit; "
              f"{ref['limits'][0]:.1f} before the engine, {ref['limits'][1]:.1f} after); "
              f"lone one-row generate {ref['lone_s'] * 1000:.0f} ms; HF generate on the base alone, batch 32 "
              f"{ref['hf']:.1f} rows/s ({ref['hfs'][0]:.1f}, {ref['hfs'][1]:.1f}); engine, saturated queue "
              f"{ref['engine']:.1f} rows/s "
              f"(occupancy {ref['engine_occupancy']:.1f}, {ref['step_ms']:.0f} ms per step incl. admissions; "
              f"FLOPs floor of a 32-row decode step {ref['floor_ms']:.1f} ms for {ref['step_gflop']:.2f} GFLOP)",
              flush=True)

        popularity, text = Popularity(names, 2), Filenames(2)
        results: dict[str, dict[str, float]] = {}
        limits = list(ref["limits"])
        # Both servers run side by side (an idle one costs no CPU) and are driven in turn, so each
        # comparison is made at the same moment of the machine's drifting speed.
        engine, static = Server(adapters_dir, args.port, "continuous"), Server(adapters_dir, args.port + 1, "static")
        try:
            for server in (engine, static):
                closed_loop(server, 4, 3, popularity, text)  # warm
            for clients in (1, 4, 16, 32, 64):
                results[f"c{clients}"] = m = closed_loop(engine, clients, seconds, popularity, text)
                print(row(f"engine, {clients} clients", m), flush=True)
                if clients in (1, 32) or not quick:
                    m = closed_loop(static, clients, seconds, popularity, text)
                    print(row(f"static batcher, {clients} clients", m), flush=True)
                if clients == 1:
                    lone = measure_lone()
                    print(f"  in process now: a lone one-row generate {lone * 1000:.0f} ms", flush=True)
                if clients == 32:
                    limits.append(measure_limit())
                    print(f"  in process now: registry.generate 32-row mixed batches {limits[-1]:.1f} rows/s", flush=True)
            capacity = results["c32"]["rps"]
            for share in (0.5, 0.8) if quick else (0.25, 0.5, 0.8):
                m = open_loop(engine, capacity * share, seconds, popularity, text)
                print(row(f"engine, Poisson {capacity * share:.1f}/s", m), flush=True)
            soak = 45 if quick else 300
            mark = 15 if quick else 60
            first = threading.Timer(mark, lambda: results.setdefault("rss_mark", {"rss": engine.rss()}))
            first.start()
            m = closed_loop(engine, 32, soak, popularity, text)
            first.join()
            drift = engine.rss() / results["rss_mark"]["rss"] - 1
            print(row(f"engine soak {soak}s, 32 clients", m) + f"  RSS drift {drift * 100:+.1f}% from {mark}s", flush=True)
        finally:
            engine.stop()
            static.stop()
        limits.append(measure_limit())
        print(f"in process, after the HTTP runs: registry.generate 32-row mixed batches {limits[-1]:.1f} rows/s; "
              f"the limit used below is the mean of {', '.join(f'{x:.1f}' for x in limits)}", flush=True)
    limit = statistics.mean(limits)
    served_ratio = results["c32"]["rps"] / limit
    p50_ratio = results["c1"]["p50"] / statistics.mean([ref["lone_s"], lone])
    p99_over_p50 = results["c32"]["p99"] / results["c32"]["p50"]
    print(f"RESULT served_ratio={served_ratio:.2f} p50_ratio_1={p50_ratio:.2f} p99_over_p50_32={p99_over_p50:.2f} "
          f"engine_vs_hf={ref['engine'] / ref['hf']:.2f} rss_drift={drift:+.3f}")


if __name__ == "__main__":
    main()
