"""`LexloraReplica`: one Ray Serve replica of `lexlora serve`. Each holds what one `lexlora serve`
process holds (the frozen base, the engine, the adapter store with its resident cap) and answers
through the same app (app.py), called in-process (asgi_call.py): every route, error and metric is
the single-process server's.

Multiplexing (Ray Serve's `@serve.multiplexed`): the ingress sends each request with its adapter as
the multiplexed model id, and a replica reports to Ray the adapters it holds, so Ray routes the next
requests for one to a replica that holds it. The report is an LRU of `max_resident_adapters` names,
touched by every answered request whose adapter is resident (never by a failed load), the same
sequence the store's own LRU sees: the two evict alike, and the store, whose cap is the same number,
stays the authority on memory.

Every second a replica pushes a snapshot (its /health, /adapters and /metrics answers) to the app's
`SnapshotBoard` actor: a Ray handle reaches some replica, never a chosen one, so the ingress answers
those routes for the whole deployment from the board.

Python apps that compose their own Serve graph bind it and call `generate`:

    replica = LexloraReplica.options(num_replicas=2).bind(ServeSettings(adapters_dir=Path("/shared/adapters")))
    ...  # in a deployment holding its handle:
    out = await handle.options(multiplexed_model_id="file-type").generate.remote("file-type", ["setup.py"])
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from lexlora.errors import LexloraError
from lexlora.serving.app import create_app
from lexlora.serving.asgi_call import ForwardedRequest, ResponseStart, call_app
from lexlora.serving.auth import api_key_from
from lexlora.serving.server import prepare_registry
from lexlora.serving.settings import ServeSettings

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-lexlora-replica"  # on every answer: which replica gave it
PUSH_S = 1.0  # how often a replica pushes its snapshot
BOARD_NAMESPACE = "lexlora"


class ReplicaRequestError(LexloraError):
    """`generate` answered with an error status: `status` and the app's `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail

    def __reduce__(self):  # Ray pickles it back to the caller
        return type(self), (self.status, self.detail)


@ray.remote(num_cpus=0)
class SnapshotBoard:
    """The latest snapshot of each replica of one app, by replica id."""

    def __init__(self):
        self._snapshots: dict[str, dict[str, Any]] = {}

    def put(self, replica: str, snapshot: dict[str, Any]) -> None:
        self._snapshots[replica] = snapshot

    def fresh(self, max_age_s: float) -> dict[str, dict[str, Any]]:
        """Snapshots pushed within `max_age_s`; older ones (a replica that died or was removed) are dropped."""
        now = time.time()
        self._snapshots = {r: s for r, s in self._snapshots.items() if now - s["at"] <= max_age_s}
        return dict(self._snapshots)


def board_for(app_name: str):
    """The app's board, created by whoever asks first. It lives with its creator (no detached actor
    outlives the app); when that replica goes, the next ask makes a new one."""
    return SnapshotBoard.options(name=f"board:{app_name}", namespace=BOARD_NAMESPACE, get_if_exists=True).remote()


@serve.deployment(name="LexloraReplica")
class LexloraReplica:
    async def __init__(self, settings: ServeSettings):
        self.settings, registry, failed = prepare_registry(settings)
        self.app = create_app(registry, self.settings.adapters_dir, self.settings, skipped=failed)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.actor_name = ray.get_runtime_context().get_actor_name()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._tag = [(REPLICA_HEADER, self.replica_id)]
        key = api_key_from(self.settings.api_key)
        self._auth = [("authorization", f"Bearer {key}")] if key else []
        self._held = None
        if self.settings.multiplex:
            async def lexlora_adapter_held(name: str) -> str:  # what Ray's LRU keeps: the name only
                return name

            self._held = serve.multiplexed(max_num_models_per_replica=self.settings.max_resident_adapters)(
                lexlora_adapter_held)
        self._board = None
        self._pusher = asyncio.get_running_loop().create_task(self._push_forever())
        logger.info("lexlora replica %s serving %s on %s", self.replica_id, self.settings.adapters_dir, registry.device)

    # ---- what the ingress calls ------------------------------------------------------------------------
    async def forward(self, request: ForwardedRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        """The app's whole answer: (status, headers, body)."""
        start, chunks = None, []
        async for part in self._answer(request):
            if isinstance(part, ResponseStart):
                start = part
            else:
                chunks.append(part)
        return start.status, start.headers, b"".join(chunks)

    async def forward_stream(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The app's answer as it comes (server-sent events): its ResponseStart, then body chunks."""
        async for part in self._answer(request):
            yield part

    async def generate(self, adapter: str, inputs: list[Any], **options: Any) -> dict[str, Any]:
        """POST /generate's answer ({"outputs": [...], ...}) for Python callers; ReplicaRequestError
        with the app's status and detail when it refuses."""
        body = json.dumps({"adapter": adapter, "inputs": inputs, **options}).encode()
        status, _, content = await self.forward(ForwardedRequest(
            "POST", "/generate", headers=[("content-type", "application/json"), *self._auth], body=body))
        payload = json.loads(content)
        if status != 200:
            raise ReplicaRequestError(status, payload.get("detail", content.decode(errors="replace")))
        return payload

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose engine thread died is replaced."""
        worker = self.app.state.worker
        loop = getattr(worker, "_loop", None)
        if loop is not None and not loop.is_alive() and not getattr(worker, "_closed", False):
            raise RuntimeError("the engine's decode thread is not running")

    async def _answer(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        name = serve.get_multiplexed_model_id() if self._held is not None else ""
        async for part in call_app(self.app, request, self._tag):
            if isinstance(part, ResponseStart) and name and part.status < 400 and name in self.app.state.registry:
                await self._held(name)  # Ray now routes `name` here; an LRU victim is only forgotten by Ray
            yield part

    # ---- the snapshot --------------------------------------------------------------------------------
    async def _snapshot(self) -> dict[str, Any]:
        answers = {}
        for route in ("/health", "/adapters", "/metrics"):
            parts = [p async for p in call_app(self.app, ForwardedRequest("GET", route, headers=self._auth))]
            answers[route] = b"".join(p for p in parts if isinstance(p, bytes)).decode()
        return {"at": time.time(), "replica": self.replica_id, "actor": self.actor_name,
                "node": self.node_id, "health": json.loads(answers["/health"]),
                "adapters": json.loads(answers["/adapters"]).get("adapters", []), "metrics": answers["/metrics"]}

    async def _push_forever(self) -> None:
        while True:
            try:
                if self._board is None:
                    self._board = board_for(self.app_name)
                await self._board.put.remote(self.replica_id, await self._snapshot())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the board went with its creator: make a new one next time
                logger.warning("replica %s: pushing its snapshot failed (%s); retrying", self.replica_id, exc)
                self._board = None
            await asyncio.sleep(PUSH_S)

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.cancel()
        app = getattr(self, "app", None)
        if app is not None:
            with contextlib.suppress(Exception):
                app.state.worker.close()
                app.state.store.close()
