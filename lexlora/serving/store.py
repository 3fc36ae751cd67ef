"""`AdapterStore`: the adapters a server can serve, resolved by name on first request and kept in a
bounded resident set, as vLLM's filesystem resolver + `max_cpu_loras` and LoRAX's JIT loading do.

    name            a dir directly under the adapters root, or (with allow_hub) a Hub repo id
                    `org/name[@revision]` fetched through huggingface_hub (its cache, HF_HUB_OFFLINE)
    acquire(name)   the resident adapter, loading it first if it is cold: on a loader thread, off the
                    decode loop; concurrent requests for one cold adapter share one load
    release(a)      the request is done with it; an adapter with requests in flight is never evicted
    caps            at most `max_resident` adapters and `max_resident_bytes` of their tensors; the
                    least recently used one without requests in flight (and not pinned) is evicted to
                    make room. Only adapters with requests in flight can hold the set above its caps,
                    and the excess is evicted as they finish.
    failures        a load that fails (missing, corrupt, foreign base) fails its requests with the
                    error, is remembered for `failure_ttl_s` (a negative cache) and touches nothing else
    replace(name)   reload from the source: requests in flight finish on the old weights (kept until
                    the last one releases them), new ones get the new

Registry changes (install, evict) happen on the loader thread while the engine may be decoding: the
registry's dict is replaced atomically and the router keeps its hooks (`keep_hooks`), so only an
adapter hooking a layer no adapter hooked before needs the engine paused for a moment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from lexlora.adapters.catalog import find_adapters
from lexlora.errors import AdapterError, LexloraError
from lexlora.serving.registry import (
    ADAPTER_NAME,
    HUB_NAME,
    LexLoRA,
    LoadedAdapter,
    check_adapter_name,
)

logger = logging.getLogger(__name__)

HUB_FILES = ["*.json", "*.safetensors", "*.yaml", "*.md"]  # what an adapter dir holds; never pickles


class AdapterNotFound(AdapterError):
    """No adapter of that name exists where the store looks (HTTP 404)."""


@dataclass(eq=False)
class _Resident:
    loaded: LoadedAdapter
    users: int = 0  # requests holding it
    pinned: bool = False


class AdapterStore:
    def __init__(
        self, registry: LexLoRA, root: str | Path | None, *, max_resident: int = 128,
        max_resident_bytes: int | None = 512 << 20, pins: tuple[str, ...] = (), allow_hub: bool = False,
        failure_ttl_s: float = 10.0, pause: Callable[[], ContextManager] | None = None, loader_threads: int = 2,
        hub_cache_dir: str | Path | None = None,
    ):
        if max_resident < 1:
            raise AdapterError(f"max_resident must be at least 1, got {max_resident}")
        self.registry = registry
        self.root = Path(root) if root is not None else None
        self.max_resident = max_resident
        self.max_resident_bytes = max_resident_bytes
        self.pins = tuple(pins)
        self.allow_hub = allow_hub
        self.hub_cache_dir = hub_cache_dir  # None: huggingface_hub's (HF_HUB_CACHE)
        self.failure_ttl_s = failure_ttl_s
        self.base_id = registry.base_config.name_or_path
        self.pause = pause or nullcontext  # the worker's paused(), for changes that add hooks
        self.on_load: list[Callable[[float], None]] = []  # metrics: each load's seconds
        self.stats = {"loads": 0, "evictions": 0, "load_failures": 0, "hits": 0, "misses": 0}
        registry.router.keep_hooks = True
        self._lock = threading.Lock()
        self._commit = threading.Lock()  # one registry change at a time
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._retired: dict[int, _Resident] = {}  # replaced while in use: id(loaded) -> holder
        self._loading: dict[str, concurrent.futures.Future] = {}
        self._failed: dict[str, tuple[float, LexloraError]] = {}  # name -> (until, error)
        self._pool = concurrent.futures.ThreadPoolExecutor(loader_threads, thread_name_prefix="lexlora-loader")
        for name, loaded in registry.adapters.items():  # loaded before the store existed
            self._resident[name] = _Resident(loaded, pinned=name in self.pins)

    # ---- what requests use ---------------------------------------------------------------------------
    async def acquire(self, name: str) -> LoadedAdapter:
        """The adapter, resident and held for this request until `release`; loads it if cold.
        AdapterNotFound, or the load's AdapterError."""
        return (await self.acquire_timed(name))[0]

    async def acquire_timed(self, name: str) -> tuple[LoadedAdapter, float]:
        """`acquire`, and the seconds it waited for a load (0.0 when the adapter was resident)."""
        loaded = self._hold(name)
        if loaded is not None:
            return loaded, 0.0
        started = time.perf_counter()
        future = self._load_future(name)
        try:
            # Shielded: one waiter giving up must not cancel the load the others wait for.
            loaded = await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(self._release_unclaimed)
            raise
        return loaded, time.perf_counter() - started

    def acquire_sync(self, name: str, timeout: float | None = None) -> LoadedAdapter:
        loaded = self._hold(name)
        if loaded is not None:
            return loaded
        future = self._load_future(name)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(self._release_unclaimed)
            raise

    def _release_unclaimed(self, future: concurrent.futures.Future) -> None:
        """A waiter left before its load landed: give back the use the load counted for it."""
        if not future.cancelled() and future.exception() is None:
            self.release(future.result())

    def release(self, loaded: LoadedAdapter) -> None:
        """A request holding `loaded` is done with it."""
        with self._lock:
            holder = self._resident.get(loaded.name)
            if holder is not None and holder.loaded is loaded:
                holder.users -= 1
                if not self._over_caps():
                    return
            else:
                holder = self._retired.get(id(loaded))
                if holder is not None:
                    holder.users -= 1
                    if holder.users <= 0:  # the last request on replaced weights: let them go
                        del self._retired[id(loaded)]
                        self.registry.router.detach(loaded.lora)
                return
        self._trim()  # over the caps while it was in use: evict now (cheap: no file is read)

    def _hold(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            holder = self._resident.get(name)
            if holder is not None and holder.loaded.unloaded:  # deleted from the registry directly
                del self._resident[name]
                holder = None
            if holder is None:  # loaded into the registry directly (in-process use): adopt it
                loaded = self.registry.adapters.get(name)
                if loaded is not None:
                    holder = self._resident[name] = _Resident(loaded, pinned=name in self.pins)
            if holder is not None:
                holder.users += 1
                self._resident.move_to_end(name)
                self.stats["hits"] += 1
                return holder.loaded
        return None

    def _load_future(self, name: str, retry: bool = False) -> concurrent.futures.Future:
        """The running load of `name`, or a new one (one load however many requests wait for it),
        with one more waiter: the load lands holding the adapter once for each, so nothing can evict
        it before they run. A recent failure is raised again, unless `retry`."""
        with self._lock:
            if retry:
                self._failed.pop(name, None)
            failed = self._failed.get(name)
            if failed is not None:
                if failed[0] > time.monotonic():
                    raise failed[1]
                del self._failed[name]
            future = self._loading.get(name)
            if future is None:
                self.check_name(name)
                future = self._loading[name] = concurrent.futures.Future()
                future.waiters = 0
                self._pool.submit(self._load, name, future)
            future.waiters += 1
            self.stats["misses"] += 1  # per request that waits for a load, as hits are per request served resident
            return future

    # ---- loading (loader threads) --------------------------------------------------------------------
    def _load(self, name: str, future: concurrent.futures.Future, replace: bool = False) -> None:
        started = time.perf_counter()
        try:
            loaded = self.registry.build_adapter(self.locate(name), name)
            self._install(loaded, future)
        except Exception as exc:
            error = exc if isinstance(exc, LexloraError) else AdapterError(f"adapter {name!r}: {type(exc).__name__}: {exc}")
            if not isinstance(exc, LexloraError):
                logger.exception("loading adapter %s failed", name)
            with self._lock:
                self.stats["load_failures"] += 1
                if self.failure_ttl_s > 0 and not replace:
                    self._failed[name] = (time.monotonic() + self.failure_ttl_s, error)
                if self._loading.get(name) is future:
                    del self._loading[name]
            future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        for observe in list(self.on_load):
            observe(seconds)
        future.set_result(loaded)

    def _install(self, loaded: LoadedAdapter, future: concurrent.futures.Future) -> None:
        """Make room, then put `loaded` in (in place of the resident one of its name, if any), held
        once for each waiter of `future`."""
        name = loaded.name
        with self._commit, (self.pause() if self.registry.router.adds_hooks(loaded.lora) else nullcontext()):
            with self._lock:
                victims = self._victims(loaded.memory_bytes, keep=name)
                old = self._resident.pop(name, None)
                if old is not None and old.users > 0:  # replaced in use: kept until its requests end
                    self.registry.router.attach(old.loaded.lora)
                    self._retired[id(old.loaded)] = old
                for victim in victims:
                    self.registry.delete_adapter(victim)
                self.registry.install(loaded, replace=old is not None)
                if self._loading.get(name) is future:  # no one joins it from here on
                    del self._loading[name]
                self._resident[name] = _Resident(loaded, users=getattr(future, "waiters", 0), pinned=name in self.pins)
                self._failed.pop(name, None)
                self.stats["loads"] += 1
                self.stats["evictions"] += len(victims)
        if victims:
            logger.info("evicted %s (least recently used) to load %s", ", ".join(victims), name)

    def _victims(self, extra_bytes: int = 0, keep: str | None = None) -> list[str]:
        """Least recently used first: who leaves so that one more adapter (of `extra_bytes`) fits.
        Called under the lock; removes them from the resident set."""
        count = len(self._resident) + (1 if keep is not None and keep not in self._resident else 0)
        total = self.resident_bytes + extra_bytes
        victims = []
        for name, holder in list(self._resident.items()):
            if count <= self.max_resident and (self.max_resident_bytes is None or total <= self.max_resident_bytes):
                break
            if holder.users > 0 or holder.pinned or name == keep:
                continue
            del self._resident[name]
            victims.append(name)
            count -= 1
            total -= holder.loaded.memory_bytes
        return victims

    def _over_caps(self) -> bool:
        return len(self._resident) > self.max_resident or (
            self.max_resident_bytes is not None and self.resident_bytes > self.max_resident_bytes)

    def _trim(self) -> None:
        with self._commit, self._lock:
            victims = self._victims()
            for victim in victims:
                self.registry.delete_adapter(victim)
            self.stats["evictions"] += len(victims)

    # ---- explicit changes (HTTP POST / PUT / DELETE, startup) ----------------------------------------
    def load(self, name: str) -> LoadedAdapter:
        """Make `name` resident now (a no-op when it is), retrying a recent failure; its errors are raised."""
        loaded = self._hold(name) or self._load_future(name, retry=True).result()
        self.release(loaded)
        return loaded

    def replace(self, name: str) -> LoadedAdapter:
        """Reload `name` from its source: requests in flight keep the old weights, new ones get these."""
        self.check_name(name)
        with self._lock:
            self._failed.pop(name, None)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._load(name, future, replace=True)
        return future.result()

    def unload(self, name: str) -> None:
        """Evict `name` now, even if requests are running on it (they fail, as registry.delete_adapter)."""
        with self._commit, self._lock:
            if self._resident.pop(name, None) is None:
                raise AdapterNotFound(f"no adapter named {name!r} is resident")
            self.registry.delete_adapter(name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- where adapters come from ----------------------------------------------------------------------
    def check_name(self, name: str) -> None:
        """AdapterError for a name that can never be an adapter here (HTTP 400 / 422)."""
        check_adapter_name(name, hub=self.allow_hub)

    def locate(self, name: str) -> Path:
        """The adapter dir for `name`: under the root, or the Hub snapshot (downloaded or cached)."""
        if HUB_NAME.match(name) and not ADAPTER_NAME.match(name):
            return self._from_hub(name)
        if self.root is not None:
            path = self.root / name
            if path.is_dir():
                if path.resolve().parent != self.root.resolve():  # a link out of the root
                    raise AdapterError(f"adapter {name!r} is not a dir directly under the adapters dir")
                return path
        where = f"in {self.root}" if self.root is not None else "(no adapters dir)"
        raise AdapterNotFound(f"no adapter named {name!r} {where}")

    def _from_hub(self, name: str) -> Path:
        if not self.allow_hub:
            raise AdapterNotFound(f"adapter {name!r} names a Hub repo, and this server does not load from the Hub "
                                  "(lexlora serve --allow-hub)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, _, revision = name.partition("@")
        try:
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES,
                                          cache_dir=self.hub_cache_dir))
        except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
            raise AdapterNotFound(f"adapter {name!r}: not in the local HF cache, and the Hub cannot be reached "
                                  f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})") from None
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
            raise AdapterNotFound(f"adapter {name!r}: not on the Hub ({type(exc).__name__})") from None
        except (OSError, ValueError) as exc:
            raise AdapterError(f"adapter {name!r}: fetching it from the Hub failed ({type(exc).__name__}: {exc})") from None

    def known(self) -> list[str]:
        """What the store can serve: adapter dirs under the root (by their lexlora.json), then the
        resident adapters that came from elsewhere (the Hub)."""
        names = []
        if self.root is not None and self.root.is_dir():
            names = [p.name for p in find_adapters(self.root) if p != self.root and ADAPTER_NAME.match(p.name)]
        with self._lock:
            extra = [n for n in self._resident if n not in set(names)]
        return names + sorted(extra)

    # ---- figures -------------------------------------------------------------------------------------
    @property
    def resident_count(self) -> int:
        return len(self._resident)

    @property
    def resident_bytes(self) -> int:
        # Summed when asked (a few microseconds for a thousand adapters: memory_bytes is cached).
        return sum(h.loaded.memory_bytes for h in list(self._resident.values()))

    def resident(self) -> list[LoadedAdapter]:
        with self._lock:
            return [h.loaded for h in self._resident.values()]

    def failures(self) -> dict[str, str]:
        """Loads that failed recently (still in the negative cache): name -> why."""
        now = time.monotonic()
        with self._lock:
            return {name: str(err) for name, (until, err) in self._failed.items() if until > now}
