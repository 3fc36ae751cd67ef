"""`lexlora serve --ray`: the same app as `lexlora serve` (OpenAI routes, /generate, /metrics, /health)
as a Ray Serve application of two deployments, `LexloraIngress` (ray_ingress.py) in front of
`LexloraReplica`s (ray_replica.py), with requests routed to replicas that hold their adapter
(Ray Serve's model multiplexing; each replica's store caps what it holds).

    lexlora serve --ray --adapters adapters/ --replicas 2               # a Ray cluster on this machine
    ray start --head                                                     # or a cluster of several:
    ray start --address=HEAD_IP:6379                                     #   on each other node
    lexlora serve --ray --address auto --adapters /shared/adapters      #   adapters on shared storage

    from lexlora.serving.ray_app import build_app                       # in your own Ray Serve setup
    serve.run(build_app(ServeSettings(adapters_dir=Path("/shared/adapters"), replicas=4)))

Ray Serve is an optional extra (`pip install "lexlora[ray]"`); without it `--ray` stops with a
ConfigError saying what to install, before anything loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import signal
import threading
from pathlib import Path
from typing import Any

from lexlora.errors import ConfigError
from lexlora.serving.server import check_settings
from lexlora.serving.settings import ServeSettings

APP_NAME = "lexlora"
INSTALL = "pip install \"lexlora[ray]\" (Ray Serve: ray[serve])"
# Both deployments run their (non-blocking) code on the replica's own event loop, not on a second
# loop in another thread: one thread hop less per call. On 2 cores this took Ray with 1 replica
# from 9.8 to 11.1 requests/s (benchmarks/results/serve_ray.md). Set per actor, so it holds on a
# cluster this process did not start.
RUNTIME_ENV = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}


def require_ray() -> None:
    """ConfigError unless Ray Serve can be imported."""
    missing = [m for m in ("ray", "ray.serve") if _find(m) is None]
    if missing:
        raise ConfigError(f"lexlora serve --ray needs Ray Serve, which is not installed here: {INSTALL}")


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent missing, or a module set to None in sys.modules
        return None


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def replica_options(settings: ServeSettings, gpus_in_cluster: float = 0.0) -> dict[str, Any]:
    """`LexloraReplica.options(...)` for these settings: its count (or autoscaling), its resources,
    and the requests it takes at once (what its engine decodes together; the rest wait in Ray's
    router, where they can still go to another replica)."""
    gpus = settings.replica_gpus if settings.replica_gpus is not None else (1.0 if gpus_in_cluster else 0.0)
    cpus = settings.replica_cpus if settings.replica_cpus is not None else 1.0
    if settings.replicas is not None and settings.autoscale is not None:
        raise ConfigError("--replicas and --autoscale: give one (a fixed count, or MIN:MAX)")
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": RUNTIME_ENV},
        "max_ongoing_requests": settings.max_batch_rows,
    }
    if settings.autoscale is not None:
        low, high = settings.autoscale
        if not 0 <= low <= high or high < 1:
            raise ConfigError(f"--autoscale {low}:{high}: want MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max(1, settings.max_batch_rows // 2)}
    else:
        count = settings.replicas
        if count is None:  # one replica per GPU on a GPU cluster (each holds a base of its own), else one
            count = max(1, int(gpus_in_cluster // gpus)) if gpus else 1
        if count < 1:
            raise ConfigError(f"--replicas {count}: want at least 1")
        options["num_replicas"] = count
    return options


def ingress_options(settings: ServeSettings) -> dict[str, Any]:
    """`LexloraIngress.options(...)`: no CPU reserved (it only forwards), `settings.ingress_replicas`
    of it, and no limit of its own on requests in flight (the replicas and their queues have theirs)."""
    if settings.ingress_replicas < 1:
        raise ConfigError(f"--ingress-replicas {settings.ingress_replicas}: want at least 1")
    return {"num_replicas": settings.ingress_replicas, "max_ongoing_requests": 10_000,
            "ray_actor_options": {"num_cpus": 0, "runtime_env": RUNTIME_ENV}}


def build_app(settings: ServeSettings, gpus_in_cluster: float | None = None):
    """The Ray Serve application (`serve.run(build_app(settings))`). Call with Ray initialized:
    the GPU count is read from the cluster unless given."""
    require_ray()
    from lexlora.serving.ray_ingress import LexloraIngress
    from lexlora.serving.ray_replica import LexloraReplica

    if gpus_in_cluster is None:
        gpus_in_cluster = cluster_gpus()
    # Replicas may run on other nodes: the adapters dir is passed as an absolute path.
    settings = dataclasses.replace(settings, adapters_dir=Path(settings.adapters_dir).resolve(), ray=False)
    replica = LexloraReplica.options(**replica_options(settings, gpus_in_cluster)).bind(settings)
    return LexloraIngress.options(**ingress_options(settings)).bind(replica, settings)


def run_ray_server(settings: ServeSettings) -> int:
    """Deploy the app on Ray (`settings.ray_address`, else a cluster started here) and serve on
    `settings.host:settings.port` until interrupted; then the app is deleted (and a cluster started
    here stopped)."""
    require_ray()
    check_settings(settings)
    replica_options(settings)  # bad counts are refused before Ray starts
    ingress_options(settings)
    import ray
    from ray import serve

    ray.init(address=settings.ray_address, include_dashboard=False, logging_level="WARNING")
    try:
        # No access log line per request in the proxy and each deployment, as the app's own metrics
        # count every request (turning it off measured no difference on 2 cores: serve_ray.md).
        quiet = {"enable_access_log": False}
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=quiet)
        gpus = cluster_gpus()
        serve.run(build_app(settings, gpus), name=APP_NAME, route_prefix="/", logging_config=quiet)
        url = f"http://{settings.host}:{settings.port}"
        options = replica_options(settings, gpus)
        resources = {k: options["ray_actor_options"][k] for k in ("num_cpus", "num_gpus")}
        count = options.get("num_replicas") or f"{settings.autoscale[0]}-{settings.autoscale[1]}"
        print(f"lexlora: serving the adapters in {settings.adapters_dir} on {url} with Ray Serve: {count} "
              f"replica(s) of {resources}, each holding at most {settings.max_resident_adapters} "
              f"adapters, requests routed to a replica holding theirs"
              f"{'' if settings.multiplex else ' (multiplexing off)'} (OpenAI API: {url}/v1)", flush=True)
        _wait_for_signal()
    finally:
        try:
            serve.delete(APP_NAME)
        finally:
            if settings.ray_address is None:
                serve.shutdown()
            ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
