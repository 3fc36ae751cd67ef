"""`lexlora serve` with many adapters on disk and a bounded resident set, against all of them resident.

    HF_HUB_CACHE=$(realpath ../shared/hf/hub) HF_HUB_OFFLINE=1 python benchmarks/serve_store.py [--quick]

flan-t5-small shape with random weights; 1000 r=8 adapters with an `add` fusion projection, made as
the hotswap benchmark makes them (--quick: 200), plus a few corrupt adapter dirs beside them. Measured,
in order:

  leak         in process: an adapter loaded and unloaded 1000 times (--quick: 200), RSS after vs
               before (both after gc)
  startup      process start to a healthy /health, a dir with 1 adapter vs the 1000-adapter dir,
               alternated, 3 runs each (--quick: 2), medians; the RSS base is the 1-adapter server's
               RSS after 4 warm-up requests (the base model, the embedding model it loads on the
               first request, and its first forward passes: what any server holds before adapters)
  load         the real server, 32 concurrent keep-alive clients sending one-row /generate requests
               with 16 new tokens forced (min_new_tokens = max_new_tokens = 16), each for an adapter
               drawn with weight 1/rank (which names are popular: a fixed-seed shuffle) and a
               filename never seen before; 10% are bad requests of several kinds, each with its
               expected status. Two arms: CAP (--max-resident-adapters 32; --quick: 16) and ALL
               (every adapter resident: --preload-all, a cap above the count), 10 minutes of load
               each (--quick: 1), run in halves CAP, ALL, ALL, CAP so the machine's drifting speed
               hits both alike. Only one server runs at a time: the other is paused (SIGSTOP) between its
               halves, so each arm is one process with its whole history (cold loads, RSS drift).

Per arm: good requests/s, p50/p99, 5xx answers (and requests with no answer), bad requests answered
with another status than expected, cold loads (lexlora_adapter_loads_total from /metrics, and the
answers whose Server-Timing `load;dur` is above 0: a resident adapter reports 0)
and the median wait of those, RSS every second.

The last line is `RESULT startup_ratio=… rss_budget_ok=… rss_drift=… cold_ms=… cap_ratio=… errors_5xx=…`:
startup with the 1000-adapter dir over startup with one adapter (medians); whether CAP's max RSS stays
≤ base + cap × adapter file size + 300 MB; CAP's mean RSS over its last minute of load vs its first
minute, a signed fraction (--quick: last vs first 15 s); the median `load;dur` of CAP's answers that
waited for a load (ms); CAP good requests/s over ALL's; 5xx answers plus requests left unanswered,
both arms.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hotswap import MODEL_ID, make_adapters, rss_bytes
from serve_load import NEW_TOKENS, Client, Filenames, Popularity, Server, Tally, pct

from lexlora.config import ModelConfig
from lexlora.serving.settings import ServeSettings

CLIENTS = 32
BAD_SHARE = 0.1
FORCED = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
CORRUPT = ("corrupt-truncated", "corrupt-json", "corrupt-no-weights", "corrupt-foreign-base")
EXPECTED = {"unknown adapter": 404, "malformed JSON": 422, "too many inputs": 413, "bad option": 422,
            "corrupt adapter": 422}
# An answer waited for a load when its load;dur is at least this (ms): a warm acquire still reports
# the few microseconds between the request's start and holding the adapter (0.01-0.05 ms), not 0.
BAD_OPTIONS = ({"temperature": 0}, {"max_new_tokens": 0}, {"top_p": 2}, {"beams": 2}, {"min_new_tokens": "many"})


# ---- adapters on disk ----------------------------------------------------------------------------
def make_corrupt(root: Path, good: Path) -> None:
    """Copies of a good adapter broken in one way each (all of them 422 on a request)."""
    for name in CORRUPT:
        shutil.copytree(good, root / name)
    weights = root / "corrupt-truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "corrupt-json" / "lexlora.json").write_text('{"base": {"model_id": ')
    (root / "corrupt-no-weights" / "adapter_model.safetensors").unlink()
    meta_path = root / "corrupt-foreign-base" / "lexlora.json"
    meta = json.loads(meta_path.read_text())
    meta["base"].update(weights_sha256="0" * 64, init_seed=1)
    meta_path.write_text(json.dumps(meta))


# ---- the server and its clients ------------------------------------------------------------------
class StoreServer(Server):
    """`lexlora serve` with extra flags, timed from process start to a healthy /health."""

    def __init__(self, adapters_dir: Path, port: int, flags: list[str]):
        # Polled every 20 ms (serve_load's 0.5 s is too coarse to time a start); up to 5 minutes for
        # --preload-all of 1000 adapters.
        self.paused = False
        super().__init__(adapters_dir, port, "continuous", tuple(flags), poll_s=0.02, timeout_s=300)
        self.startup_rss = self.rss()

    def log_tail(self, chars: int = 3000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    def pause(self, paused: bool) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)
        self.paused = paused

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
        super().stop()

    def metrics(self) -> dict[str, float]:
        """/metrics' lexlora_adapter_*_total counters, summed over their labels ({} if there is none)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            text = response.read().decode()
        except (OSError, http.client.HTTPException):  # the server died: its requests count as unanswered
            return {}
        if response.status != 200:
            return {}
        totals: Counter = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("lexlora_adapter") and sample.name.endswith(("_total", "_seconds_sum",
                                                                                       "_seconds_count")):
                    totals[sample.name] += sample.value
        return dict(totals)


class StoreClient(Client):
    """One keep-alive connection posting any body to /generate."""

    def __init__(self, port: int):
        super().__init__(port, None, None)

    def post(self, body: str) -> tuple[float, int, dict[str, float], str]:
        """(latency s, status, Server-Timing durations in ms, body); status 0: no answer."""
        start = time.perf_counter()
        self.last_response = None  # the answer's headers, for subclasses (serve_ray reads the replica's)
        try:
            self.conn.request("POST", "/generate", body.encode(), {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            text = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            return time.perf_counter() - start, 0, {}, repr(exc)
        self.last_response = response
        return time.perf_counter() - start, response.status, server_timing(response.getheader("Server-Timing")), text


def server_timing(header: str | None) -> dict[str, float]:
    """`load;dur=1.5, queue;dur=0.2, …` -> {"load": 1.5, "queue": 0.2, …} (ms)."""
    timings = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            timings[name] = float(dur)
    return timings


class Workload:
    """The requests: good ones (a Zipf-drawn adapter, a fresh filename) and, a BAD_SHARE of the
    time, one of the bad kinds with the status it must get."""

    def __init__(self, names: list[str], seed: int):
        self.popular, self.text = Popularity(names, seed), Filenames(seed)
        self.top = names[0]
        self.max_inputs = ServeSettings().max_inputs
        self._count = 0
        self._lock = threading.Lock()

    def next(self, rng: random.Random) -> tuple[str | None, str]:
        """(bad kind or None, body)."""
        if rng.random() >= BAD_SHARE:
            return None, json.dumps({"adapter": self.popular(1)[0], "inputs": [self.text()], **FORCED})
        with self._lock:
            self._count += 1
            count = self._count
        kind = rng.choice(list(EXPECTED))
        if kind == "unknown adapter":
            return kind, json.dumps({"adapter": f"missing-{count}", "inputs": [self.text()], **FORCED})
        if kind == "malformed JSON":
            return kind, json.dumps({"adapter": self.top, "inputs": [self.text()]})[:-3]  # cut off mid-list
        if kind == "too many inputs":
            return kind, json.dumps({"adapter": self.top, "inputs": [self.text() for _ in range(self.max_inputs + 1)],
                                     **FORCED})
        if kind == "bad option":
            return kind, json.dumps({"adapter": self.top, "inputs": [self.text()], **FORCED,
                                     **BAD_OPTIONS[count % len(BAD_OPTIONS)]})
        return kind, json.dumps({"adapter": CORRUPT[count % len(CORRUPT)], "inputs": [self.text()], **FORCED})


class StoreTally(Tally):
    """serve_load's Tally for the good requests, plus each answer's load wait, the 5xx and the bad
    requests' statuses."""

    def __init__(self):
        super().__init__()
        self.loads_ms: list[float] = []  # load;dur of every good answer
        self.errors_5xx = self.unanswered = self.bad = 0
        self.statuses: Counter = Counter()  # (kind, status)
        self.wrong: list[str] = []  # examples: good requests not answered 200, bad ones with another status
        self.wrong_count = 0
        self.examples: dict[str, str] = {}  # the first answer to each bad kind

    def add(self, kind: str | None, latency: float, status: int, timing: dict[str, float], text: str) -> None:
        expected = 200 if kind is None else EXPECTED[kind]
        with self._lock:
            self.statuses[kind or "good", status] += 1
            self.errors_5xx += status >= 500
            self.unanswered += status == 0
            self.bad += kind is not None
            if kind is not None:
                self.examples.setdefault(kind, f"{status} {text[:160]}")
            if status != expected:
                self.wrong_count += kind is not None
                if len(self.wrong) < 8:
                    self.wrong.append(f"{kind or 'good request'}: {status} (expected {expected}): {text[:200]}")
            if kind is None and status == 200:
                self.loads_ms.append(timing.get("load", float("nan")))
        if kind is None:
            self.record(latency, timing["ttft"] / 1000 if "ttft" in timing else None, status)


class Arm:
    """One server driven in halves; its tallies, RSS samples (load seconds, bytes) and metric deltas
    accumulate over them."""

    def __init__(self, label: str, server: StoreServer, workload: Workload):
        self.label, self.server, self.workload = label, server, workload
        self.tally = StoreTally()
        self.rss: list[tuple[float, int]] = []
        self.metrics: Counter = Counter()
        self.elapsed = 0.0
        self._seed = 0

    def drive(self, seconds: float) -> None:
        self.server.pause(False)
        before = self.server.metrics()
        offset, stop_at = self.elapsed, time.perf_counter() + seconds
        start = time.perf_counter()
        done = threading.Event()

        def sample():
            while not done.wait(1.0):
                self.rss.append((offset + time.perf_counter() - start, self.server.rss()))

        def run(seed: int):
            client, rng = StoreClient(self.server.port), random.Random(seed)
            while time.perf_counter() < stop_at:
                kind, body = self.workload.next(rng)
                self.tally.add(kind, *client.post(body))
            client.conn.close()

        self._seed += 1
        threads = [threading.Thread(target=run, args=(self._seed * 1000 + i,)) for i in range(CLIENTS)]
        sampler = threading.Thread(target=sample)
        sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.elapsed += time.perf_counter() - start
        done.set()
        sampler.join()
        after = self.server.metrics()
        self.metrics.update({k: after[k] - before.get(k, 0) for k in after})
        self.server.pause(True)

    def summary(self, window: float) -> dict[str, float]:
        t = self.tally
        cold = [ms for ms in t.loads_ms if ms > 0]
        first = [r for s, r in self.rss if s < window]
        last = [r for s, r in self.rss if s >= self.elapsed - window]
        return {
            "rps": len(t.latencies) / self.elapsed, "p50": pct(t.latencies, 0.5), "p99": pct(t.latencies, 0.99),
            "good": len(t.latencies), "bad": t.bad, "errors_5xx": t.errors_5xx, "unanswered": t.unanswered,
            "wrong": t.wrong_count, "cold_timing": len(cold), "cold_p99": pct(cold, 0.99),
            "cold_ms": statistics.median(cold) if cold else float("nan"),
            "load_above_0": sum(ms > 0 for ms in t.loads_ms),
            "no_load_timing": sum(math.isnan(ms) for ms in t.loads_ms),
            "loads": self.metrics.get("lexlora_adapter_loads_total", float("nan")),
            "evictions": self.metrics.get("lexlora_adapter_evictions_total", float("nan")),
            "load_mean_ms": 1000 * self.metrics.get("lexlora_adapter_load_seconds_sum", float("nan"))
            / max(self.metrics.get("lexlora_adapter_load_seconds_count", 0), 1),
            "rss_max": max(r for _, r in self.rss), "rss_first": statistics.mean(first),
            "rss_last": statistics.mean(last), "seconds": self.elapsed,
        }


def warm(server: StoreServer, name: str) -> None:
    """A few requests first (the embedding model, allocator), not counted."""
    client = StoreClient(server.port)
    for i in range(4):
        _, status, _, text = client.post(json.dumps({"adapter": name, "inputs": [f"warm_{i}.py"], **FORCED}))
        if status != 200:
            raise RuntimeError(f"warm-up request answered {status}: {text[:300]}")
    client.conn.close()


# ---- in process ----------------------------------------------------------------------------------
def leak_check(root: Path, names: list[str], count: int) -> tuple[int, int]:
    """RSS before and after `count` loads and unloads through an AdapterStore holding one adapter
    (each acquire of the next name loads it and evicts the last), gc'd both times."""
    from lexlora.serving.registry import LexLoRA
    from lexlora.serving.store import AdapterStore

    registry = LexLoRA.from_config(ModelConfig(name_or_path=MODEL_ID, random_init=True))
    store = AdapterStore(registry, root, max_resident=1, max_resident_bytes=None, failure_ttl_s=0)

    def cycle(name: str) -> None:
        store.release(store.acquire_sync(name, timeout=60))

    for name in names[-5:]:  # the allocator's first pools
        cycle(name)
    gc.collect()
    before = rss_bytes()
    for i in range(count):
        cycle(names[i % len(names)])
    cycle(names[-1])  # the same one resident as before
    gc.collect()
    after = rss_bytes()
    store.close()
    if store.stats["loads"] < count + 5:
        raise RuntimeError(f"the leak check's store loaded fewer than {count + 5} times: {store.stats}")
    return before, after


# ---- the run -------------------------------------------------------------------------------------
def startup_runs(root: Path, one: Path, port: int, flags: list[str], runs: int) -> tuple[dict[str, list], StoreServer]:
    """Alternating starts on `one` (a dir with 1 adapter) and on `root`: seconds, and the 1-adapter
    server's RSS after warm-up requests. The last server on `root` is left running (the CAP server)."""
    one_name = next(one.iterdir()).name
    found: dict[str, list] = {"one": [], "all": [], "rss_one": []}
    for run in range(runs):
        for key, where in (("one", one), ("all", root)):
            server = StoreServer(where, port, flags)
            found[key].append(server.startup_s)
            if key == "one":
                warm(server, one_name)
                found["rss_one"].append(server.rss())
            if key == "one" or run < runs - 1:
                server.stop()
    return found, server


def report(arms: dict[str, Arm], window: float, cap: int, count: int, logs: dict[str, str]) -> dict[str, dict]:
    """The table, the status counts and the wrong answers; returns each arm's summary."""
    summaries = {label: arm.summary(window) for label, arm in arms.items()}
    for s in summaries.values():
        s.update(p50_ms=s["p50"] * 1000, p99_ms=s["p99"] * 1000, rss_max_mb=s["rss_max"] / 2**20,
                 rss_first_mb=s["rss_first"] / 2**20, rss_last_mb=s["rss_last"] / 2**20)
    rows = [
        ("good requests/s", "{rps:.1f}"), ("p50 / p99 latency (ms)", "{p50_ms:.0f} / {p99_ms:.0f}"),
        ("good / bad requests", "{good} / {bad}"), ("5xx answers / no answer", "{errors_5xx} / {unanswered}"),
        ("bad requests with the wrong status", "{wrong}"),
        ("loads (/metrics) / answers that waited for one (load;dur > 0)", "{loads:.0f} / {cold_timing}"),
        ("evictions (/metrics)", "{evictions:.0f}"),
        ("load wait of those, median / p99 (ms)", "{cold_ms:.1f} / {cold_p99:.1f}"),
        ("a load itself on the loader thread, mean (ms; /metrics)", "{load_mean_ms:.1f}"),
        ("good answers without load;dur", "{no_load_timing}"), ("RSS max (MB)", "{rss_max_mb:.0f}"),
        (f"RSS mean, first / last {window:g} s of load (MB)", "{rss_first_mb:.0f} / {rss_last_mb:.0f}"),
        ("seconds of load", "{seconds:.0f}"),
    ]
    print()
    print(f"| measure | CAP (cap {cap}) | ALL ({count} resident) |")
    print("|---|---|---|")
    for label, fmt in rows:
        print(f"| {label} | {fmt.format(**summaries['CAP'])} | {fmt.format(**summaries['ALL'])} |")
    print()
    for label, arm in arms.items():
        statuses = ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(arm.tally.statuses.items()))
        print(f"{label} statuses: {statuses}")
        if label == "CAP":
            for kind, example in sorted(arm.tally.examples.items()):
                print(f"  first answer to {kind}: {example}")
        for example in arm.tally.wrong:
            print(f"  {label} wrong: {example}")
        if arm.tally.wrong or arm.tally.errors_5xx:
            print(f"  {label} server log tail:\n{logs[label]}")
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a version of ~3 minutes plus making the adapters")
    parser.add_argument("--port", type=int, default=8941, help="the servers listen on it and the next one")
    parser.add_argument("--adapters", type=int, help="adapters on disk (default: 1000; --quick: 200)")
    parser.add_argument("--seconds", type=float, help="seconds of load per arm (default: 600; --quick: 60)")
    args = parser.parse_args()
    quick = args.quick
    count, cap = (200, 16) if quick else (1000, 32)
    arm_seconds, window, runs = (60, 15, 2) if quick else (600, 60, 3)
    count, arm_seconds = args.adapters or count, args.seconds or arm_seconds
    window = min(window, arm_seconds / 4)
    began = time.perf_counter()
    print(f"lexlora serve_store: {count} adapters, cap {cap}, {CLIENTS} clients, {arm_seconds} s of load per arm, "
          f"{NEW_TOKENS} forced new tokens, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LEXLORA_CACHE", str(Path(tmp) / "cache"))
        root, one = Path(tmp) / "adapters", Path(tmp) / "one"
        root.mkdir()
        one.mkdir()
        t0 = time.perf_counter()
        dirs = make_adapters(root, count, 8, ModelConfig(name_or_path=MODEL_ID, random_init=True))
        phases["making adapters"] = made_s = time.perf_counter() - t0
        make_corrupt(root, dirs[0])
        shutil.copytree(dirs[0], one / dirs[0].name)
        file_bytes = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
        print(f"made {count} adapters with save_adapter in {made_s:.1f} s ({made_s / count * 1000:.0f} ms each, "
              f"{file_bytes / 1e6:.2f} MB of weights each) and {len(CORRUPT)} corrupt dirs", flush=True)

        t0 = time.perf_counter()
        before, after = leak_check(root, [d.name for d in dirs], count)
        leak_ratio = after / before
        phases["leak check"] = time.perf_counter() - t0
        print(f"leak check (an AdapterStore holding 1): {count} loads and unloads, RSS {before / 2**20:.0f} -> "
              f"{after / 2**20:.0f} MB ({(after - before) / 2**20:+.1f} MB), leak_ratio={leak_ratio:.3f}", flush=True)
        gc.collect()

        t0 = time.perf_counter()
        cap_flags = ["--max-resident-adapters", str(cap)]
        all_flags = ["--max-resident-adapters", str(count + 10), "--max-resident-mb", "100000", "--preload-all",
                     "--skip-invalid"]  # the corrupt dirs fail to preload
        startup, cap_server = startup_runs(root, one, args.port, cap_flags, runs)
        start_one, start_all = statistics.median(startup["one"]), statistics.median(startup["all"])
        base_rss = statistics.median(startup["rss_one"])
        print(f"startup: 1 adapter {', '.join(f'{s:.2f}' for s in startup['one'])} s; {count} adapters on disk "
              f"{', '.join(f'{s:.2f}' for s in startup['all'])} s; RSS after warm-up with 1 adapter "
              f"{base_rss / 2**20:.0f} MB", flush=True)

        names = sorted(d.name for d in dirs)
        random.Random(17).shuffle(names)  # which adapters are popular
        arms: dict[str, Arm] = {}
        try:
            for label, flags in (("CAP", cap_flags), ("ALL", all_flags)):
                server = cap_server if label == "CAP" else StoreServer(root, args.port + 1, flags)
                warm(server, names[0])
                warm_rss = server.rss()
                server.pause(True)
                arms[label] = Arm(label, server, Workload(names, 3))
                print(f"{label} server up in {server.startup_s:.1f} s, RSS {server.startup_rss / 2**20:.0f} MB, "
                      f"{warm_rss / 2**20:.0f} MB after 4 warm-up requests", flush=True)
            phases["startups"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for half, order in ((1, ("CAP", "ALL")), (2, ("ALL", "CAP"))):
                for arm in (arms[label] for label in order):
                    arm.drive(arm_seconds / 2)
                    s = arm.summary(window)
                    print(f"  {arm.label} half {half}: {s['rps']:.1f} good req/s so far, RSS now "
                          f"{arm.rss[-1][1] / 2**20:.0f} MB, loads {s['loads']:.0f}", flush=True)
            phases["load"] = time.perf_counter() - t0
        finally:
            for arm in arms.values():
                arm.server.stop()
            cap_server.stop()
        logs = {label: arm.server.log_tail(1500) for label, arm in arms.items()}

    summaries = report(arms, window, cap, count, logs)
    capped, full = summaries["CAP"], summaries["ALL"]
    budget = base_rss + cap * file_bytes + 300 * 2**20
    rss_budget_ok = capped["rss_max"] <= budget
    rss_drift = capped["rss_last"] / capped["rss_first"] - 1
    cap_ratio = capped["rps"] / full["rps"]
    errors_5xx = sum(s["errors_5xx"] + s["unanswered"] for s in summaries.values())
    print(f"startup medians: {start_one:.2f} s with 1 adapter, {start_all:.2f} s with {count} on disk")
    print(f"RSS budget: base {base_rss / 2**20:.0f} MB + {cap} x {file_bytes / 1e6:.2f} MB + 300 MB = "
          f"{budget / 2**20:.0f} MB; CAP max {capped['rss_max'] / 2**20:.0f} MB")
    print(f"leak_ratio={leak_ratio:.3f} (AdapterStore, {count} loads and unloads)")
    phases["total"] = time.perf_counter() - began
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()), flush=True)
    print(f"RESULT startup_ratio={start_all / start_one:.2f} rss_budget_ok={rss_budget_ok} rss_drift={rss_drift:+.3f} "
          f"cold_ms={capped['cold_ms']:.1f} cap_ratio={cap_ratio:.2f} errors_5xx={errors_5xx}")


if __name__ == "__main__":
    main()
