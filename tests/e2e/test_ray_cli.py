"""`lexlora serve --ray` as a user runs it: a process that starts its own Ray cluster, serves until
SIGTERM, then deletes the app and stops the cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("ray")

from tests.serving import served  # noqa: E402
from tests.serving.served import DESC_INPUTS  # noqa: E402

adapters = served.adapters


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def test_serve_ray_serves_until_sigterm_then_stops_its_cluster(adapters, tmp_path):
    root, _, registry = adapters
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lexlora.cli", "serve", "--ray", "--adapters", str(root),
                             "--port", str(port), "--replicas", "1", "--max-inputs", "4"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if get(url + "/health")[0] == 200:
                    break
            except (OSError, urllib.error.HTTPError, ValueError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "serve.log").read()[-3000:]
            time.sleep(0.5)
        status, headers, body = get(url + "/generate", {"adapter": "desc", "inputs": DESC_INPUTS})
        assert status == 200 and body["outputs"] == registry.generate(DESC_INPUTS, adapter="desc")
        assert "x-lexlora-replica" in {k.lower() for k in headers}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        log.seek(0)
        assert "serving the adapters" in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(OSError):  # the proxy went with the cluster
        get(url + "/health")
