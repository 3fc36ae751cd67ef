"""`lexlora serve` in one process against `lexlora serve --ray`: 1 replica, 2 replicas routed by
adapter (multiplexing), 2 replicas routed without it. One run, the arms one after another.

    HF_HUB_CACHE=$(realpath ../shared/hf/hub) HF_HUB_OFFLINE=1 python benchmarks/serve_ray.py [--quick]

The store benchmark's load (serve_store.py) over 200 adapters: flan-t5-small shape with random
weights, r=8 adapters with an `add` fusion projection, plus its corrupt dirs; 32 closed-loop
keep-alive clients sending one-row /generate requests with 16 new tokens forced, each for an adapter
drawn with weight 1/rank (a fixed-seed shuffle says which are popular) and a filename never seen
before; 10% are bad requests, each with the status it must get. Every server caps its resident
adapters at 16 (`--max-resident-adapters 16`: per replica under Ray). The arms:

  a  one process     lexlora serve                                   (torch on both cores)
  b  ray 1 replica   lexlora serve --ray --replicas 1 --replica-cpus 2
  c  ray 2, mux      lexlora serve --ray --replicas 2 --replica-cpus 1 (routed to a replica holding the adapter)
  d  ray 2, plain    the same with --no-multiplex (Ray's default: the less busy of two replicas)
  e  one process     with a cap of 32: one LRU as large as (c)'s two, a reference (not in RESULT)

Each arm: a fresh server (and Ray cluster), 16 warm-up requests, then `--seconds` of load (default
120; --quick 30). Per arm: good requests/s, p50/p99, wrong statuses and 5xx, the cores each
process kept busy (Ray's and the clients' too), and the adapter cache hit ratio: the good answers whose Server-Timing `load;dur` is 0 (their adapter was resident), per
replica (from each answer's x-lexlora-replica header) and in all; and each replica's store counters
(lexlora_adapter_cache_hits/misses_total in /metrics) as a cross-check. For reference, the best any
cache of K adapters could do under this load: the share of requests for the K most popular.

The last line is `RESULT ray_overhead=… hit_ratio_mux=… hit_ratio_rr=…`: (b)'s good requests/s over
(a)'s, and the hit ratios of (c) and (d).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hotswap import MODEL_ID, make_adapters
from serve_store import FORCED, Arm, StoreClient, StoreServer, StoreTally, Workload, make_corrupt

from lexlora.config import ModelConfig

CAP = 16
ADAPTERS = 200
ONE_PROCESS = "(one process)"
ARMS = {  # label -> (flags, replicas)
    "a": ([], 0),
    "b": (["--ray", "--replicas", "1", "--replica-cpus", "2"], 1),
    "c": (["--ray", "--replicas", "2", "--replica-cpus", "1"], 2),
    "d": (["--ray", "--replicas", "2", "--replica-cpus", "1", "--no-multiplex"], 2),
    # A reference, not in RESULT: one store of both replicas' slots, what partitioning them could reach.
    "e": (["--max-resident-adapters", str(2 * CAP)], 0),
}
TITLES = {"a": "one process", "b": "Ray, 1 replica", "c": "Ray, 2 replicas, multiplexed", "d": "Ray, 2 replicas, plain",
          "e": f"one process, cap {2 * CAP}"}


class RayServer(StoreServer):
    """`lexlora serve --ray`: up once /health lists every replica. Never paused (a stopped driver
    would not stop its replicas); RSS is the driver's whole process tree (Ray's processes too)."""

    def __init__(self, adapters_dir: Path, port: int, flags: list[str], replicas: int):
        self.replicas = replicas
        super().__init__(adapters_dir, port, flags)

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", "/health")
        response = conn.getresponse()
        text = response.read()
        body = json.loads(text) if response.status == 200 else {}
        if len(body.get("replicas", [])) < self.replicas:
            raise ConnectionError(f"not up yet: {response.status}")  # an OSError: Server keeps polling
        return body

    def pause(self, paused: bool) -> None:
        self.paused = paused

    def rss(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def stop(self) -> None:
        super().stop()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True,
                       timeout=120)  # whatever of the cluster outlived its driver

    def replica_counters(self) -> dict[str, Counter]:
        """Per replica: the store's hit and miss counters from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        found: dict[str, Counter] = {}
        for family in text_string_to_metric_families(conn.getresponse().read().decode()):
            for sample in family.samples:
                if sample.name in ("lexlora_adapter_cache_hits_total", "lexlora_adapter_cache_misses_total"):
                    replica = sample.labels.get("replica", ONE_PROCESS)
                    found.setdefault(replica, Counter())[sample.name.split("_")[3]] += sample.value
        return found


class ReplicaClient(StoreClient):
    """StoreClient that also reads which replica answered."""

    def post(self, body: str):
        answer = super().post(body)
        replica = self.last_response.getheader("x-lexlora-replica") if self.last_response is not None else None
        return (*answer, replica or ONE_PROCESS)


class RayTally(StoreTally):
    def __init__(self):
        super().__init__()
        self.by_replica: dict[str, Counter] = {}

    def add(self, kind, latency, status, timing, text, replica=None) -> None:
        super().add(kind, latency, status, timing, text)
        if kind is None and status == 200:
            with self._lock:
                counts = self.by_replica.setdefault(replica, Counter())
                counts["answers"] += 1
                counts["hits"] += timing.get("load", -1.0) == 0.0


class RayArm(Arm):
    """serve_store's Arm with ReplicaClient and RayTally: one drive, no halves."""

    def __init__(self, label: str, server: StoreServer, workload: Workload):
        super().__init__(label, server, workload)
        self.tally = RayTally()

    def drive(self, seconds: float) -> None:
        import serve_store

        real = serve_store.StoreClient
        serve_store.StoreClient = ReplicaClient  # Arm.drive builds its clients by this name
        try:
            super().drive(seconds)
        finally:
            serve_store.StoreClient = real


def warm(server: StoreServer, names: list[str]) -> None:
    """One request for each of the 16 most popular adapters (every replica loads its embedding model)."""
    client = ReplicaClient(server.port)
    for name in names[:16]:
        _, status, _, text, _ = client.post(json.dumps({"adapter": name, "inputs": ["warm_up.py"], **FORCED}))
        if status != 200:
            raise RuntimeError(f"warm-up request answered {status}: {text[:300]}")
    client.conn.close()


def tree_cpu(server: StoreServer) -> dict[str, float]:
    """CPU seconds so far of the server's processes (Ray's included), by process name."""
    import psutil

    found: Counter = Counter()
    try:
        root = psutil.Process(server.proc.pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    for process in processes:
        try:
            times = process.cpu_times()
            name = process.name() if process is not root else "lexlora serve (driver)"
            found[name.replace("ServeReplica:lexlora:", "")[:40]] += times.user + times.system
        except psutil.Error:
            pass
    return dict(found)


def best_share(weights: list[float], slots: int) -> float:
    return sum(sorted(weights, reverse=True)[:slots]) / sum(weights)


def run_arm(label: str, root: Path, port: int, names: list[str], seconds: float) -> dict:
    import psutil

    flags, replicas = ARMS[label]
    flags = ["--max-resident-adapters", str(CAP), *flags]  # a later flag wins (arm e's cap)
    started = time.perf_counter()
    server = RayServer(root, port, flags, replicas) if replicas else StoreServer(root, port, flags)
    try:
        up_s = time.perf_counter() - started
        warm(server, names)
        before = server.replica_counters() if replicas else {}
        arm = RayArm(label, server, Workload(names, 3))
        clients = psutil.Process()
        cpu_before = {**tree_cpu(server), "the 32 clients": sum(clients.cpu_times()[:2])}
        arm.drive(seconds)
        cpu_after = {**tree_cpu(server), "the 32 clients": sum(clients.cpu_times()[:2])}
        cpu = {k: (v - cpu_before.get(k, 0.0)) / arm.elapsed for k, v in cpu_after.items()}
        after = server.replica_counters() if replicas else {}
        summary = arm.summary(min(15.0, seconds / 4))
        summary.update(up_s=up_s, cpu=cpu, by_replica=arm.tally.by_replica, wrong_examples=arm.tally.wrong,
                       store={r: {k: after[r][k] - before.get(r, Counter())[k] for k in after[r]} for r in after},
                       log=server.log_tail(1500) if arm.tally.wrong or arm.tally.errors_5xx else "")
        answers = sum(c["answers"] for c in arm.tally.by_replica.values())
        summary["hit_ratio"] = sum(c["hits"] for c in arm.tally.by_replica.values()) / max(answers, 1)
        return summary
    finally:
        server.stop()


def report(results: dict[str, dict], weights: list[float]) -> None:
    print()
    print("| measure | " + " | ".join(f"({k}) {TITLES[k]}" for k in results) + " |")
    print("|---|" + "---|" * len(results))
    rows = [("good requests/s", lambda s: f"{s['rps']:.1f}"),
            ("p50 / p99 latency (ms)", lambda s: f"{s['p50'] * 1000:.0f} / {s['p99'] * 1000:.0f}"),
            ("hit ratio (good answers with load;dur 0)", lambda s: f"{s['hit_ratio']:.3f}"),
            ("good / bad requests", lambda s: f"{s['good']} / {s['bad']}"),
            ("5xx / no answer / bad with the wrong status", lambda s: f"{s['errors_5xx']} / {s['unanswered']} / {s['wrong']}"),
            ("RSS max, all processes (MB)", lambda s: f"{s['rss_max'] / 2**20:.0f}"),
            ("up in (s)", lambda s: f"{s['up_s']:.1f}")]
    for title, fmt in rows:
        print(f"| {title} | " + " | ".join(fmt(s) for s in results.values()) + " |")
    print()
    for label, s in results.items():
        for replica, counts in sorted(s["by_replica"].items()):
            store = s["store"].get(replica, {})
            cross = (f"; its store: {store.get('hits', 0):.0f} hits, {store.get('misses', 0):.0f} misses "
                     f"({store.get('hits', 0) / max(store.get('hits', 0) + store.get('misses', 0), 1):.3f})"
                     if store else "")
            print(f"({label}) replica {replica}: {counts['answers']} good answers, hit ratio "
                  f"{counts['hits'] / max(counts['answers'], 1):.3f}{cross}")
        busy = sorted(s["cpu"].items(), key=lambda kv: -kv[1])
        print(f"({label}) cores busy during the load: {sum(s['cpu'].values()):.2f} in all; "
              + ", ".join(f"{name} {cores:.3f}" for name, cores in busy if cores >= 0.005))
        for example in s["wrong_examples"]:
            print(f"  ({label}) wrong: {example}")
        if s["log"]:
            print(f"  ({label}) server log tail:\n{s['log']}")
    print(f"the best any cache could do under this load (the share of requests for the most popular K): "
          f"K={CAP} {best_share(weights, CAP):.3f}, K={2 * CAP} {best_share(weights, 2 * CAP):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 s of load per arm")
    parser.add_argument("--seconds", type=float, help="seconds of load per arm (default 120; --quick 30)")
    parser.add_argument("--port", type=int, default=8961)
    parser.add_argument("--arms", default="abcde", help="which arms, in order (default abcde)")
    args = parser.parse_args()
    seconds = args.seconds or (30 if args.quick else 120)
    began = time.perf_counter()
    print(f"lexlora serve_ray: {ADAPTERS} adapters, cap {CAP} per server/replica, 32 clients, {seconds:g} s of load "
          f"per arm, 16 forced new tokens, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LEXLORA_CACHE", str(Path(tmp) / "cache"))
        root = Path(tmp) / "adapters"
        root.mkdir()
        dirs = make_adapters(root, ADAPTERS, 8, ModelConfig(name_or_path=MODEL_ID, random_init=True))
        make_corrupt(root, dirs[0])
        names = sorted(d.name for d in dirs)
        random.Random(17).shuffle(names)  # which adapters are popular
        print(f"made {ADAPTERS} adapters in {time.perf_counter() - began:.0f} s", flush=True)
        for label in args.arms:
            results[label] = run_arm(label, root, args.port, names, seconds)
            s = results[label]
            print(f"  ({label}) {TITLES[label]}: {s['rps']:.1f} good req/s, hit ratio {s['hit_ratio']:.3f}, "
                  f"up in {s['up_s']:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
            shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)
    report(results, Workload(names, 3).popular.weights)
    print(f"total {time.perf_counter() - began:.0f} s")
    if set("abcd") <= set(results):
        print(f"RESULT ray_overhead={results['b']['rps'] / results['a']['rps']:.2f} "
              f"hit_ratio_mux={results['c']['hit_ratio']:.3f} hit_ratio_rr={results['d']['hit_ratio']:.3f}")


if __name__ == "__main__":
    main()
