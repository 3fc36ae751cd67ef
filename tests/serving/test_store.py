"""The adapter store: adapters resolved by name on first use, one load per cold adapter, a resident
set bounded by count and bytes with LRU eviction that never takes an adapter in use or pinned,
failures remembered briefly and kept to their adapter, atomic replacement, Hub repos from a local
HF cache, and nothing left behind by load/unload cycles."""

import gc
import shutil
import threading
import time
import weakref

import pytest

from lexlora.adapters.format import WEIGHTS_NAME
from lexlora.errors import AdapterError
from lexlora.serving.registry import LexLoRA
from lexlora.serving.store import AdapterNotFound, AdapterStore
from tests.conftest import tiny_model_config
from tests.helpers import wait_until
from tests.serving import served
from tests.serving.served import DESC_INPUTS

adapters = served.adapters


@pytest.fixture()
def root(adapters, tmp_path):
    """desc, plain, files, extra (four good adapters), broken (lexlora.json not JSON), xbase (another base)."""
    src_root, spare, _ = adapters
    root = tmp_path / "root"
    for name in ("desc", "plain", "files", "broken"):
        shutil.copytree(src_root / name, root / name)
    shutil.copytree(spare / "extra", root / "extra")
    shutil.copytree(spare / "otherbase", root / "xbase")
    return root


@pytest.fixture()
def registry():
    return LexLoRA.from_config(tiny_model_config())


def make_store(registry, root, **options):
    store = AdapterStore(registry, root, **options)
    return store




def test_an_adapter_loads_on_first_use_and_then_is_a_hit(registry, root, adapters):
    store = make_store(registry, root)
    assert len(registry) == 0 and store.known() == ["broken", "desc", "extra", "files", "plain", "xbase"]
    loaded = store.acquire_sync("desc")
    assert "desc" in registry and registry.adapters["desc"] is loaded
    assert registry.generate(DESC_INPUTS, adapter="desc") == adapters[2].generate(DESC_INPUTS, adapter="desc")
    store.release(loaded)
    assert store.acquire_sync("desc") is loaded
    assert store.stats["loads"] == 1 and store.stats["hits"] == 1 and store.stats["misses"] == 1


def test_concurrent_requests_for_one_cold_adapter_load_it_once(registry, root, monkeypatch):
    store = make_store(registry, root)
    gate, calls = threading.Event(), []
    real = registry.build_adapter

    def slow_build(path, name, **kwargs):
        calls.append(name)
        gate.wait(10)
        return real(path, name, **kwargs)

    monkeypatch.setattr(registry, "build_adapter", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(store.acquire_sync("plain", 20))) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: calls, "the load to start")
    time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(20)
    assert calls == ["plain"] and len(got) == 8 and all(g is got[0] for g in got)
    assert store._resident["plain"].users == 8 and store.stats["loads"] == 1
    # Each request counts once, a miss if it waited for the load (a hit ratio per request, not per load).
    assert store.stats["hits"] + store.stats["misses"] == 8 and store.stats["misses"] >= 1


def test_least_recently_used_idle_adapter_is_evicted_by_count(registry, root):
    store = make_store(registry, root, max_resident=2)
    for name in ("desc", "plain", "desc", "files"):  # desc used again: plain is the oldest
        store.release(store.acquire_sync(name))
    assert sorted(registry.adapters) == ["desc", "files"] and store.stats["evictions"] == 1
    assert store.resident_count == 2


def test_the_byte_cap_holds_and_an_adapter_in_use_is_never_evicted(registry, root):
    sizes = {n: registry.build_adapter(root / n, n).memory_bytes for n in ("desc", "extra")}
    cap = sum(sizes.values()) - 1  # either fits, not both
    store = make_store(registry, root, max_resident=100, max_resident_bytes=cap)
    held = store.acquire_sync("desc")
    other = store.acquire_sync("extra")  # over the byte cap, but desc is in use: both stay
    assert sorted(registry.adapters) == ["desc", "extra"]
    store.release(held)  # now desc can go, as soon as it is released
    wait_until(lambda: "desc" not in registry, "desc to be evicted")
    assert sorted(registry.adapters) == ["extra"] and store.resident_bytes <= cap
    store.release(other)


def test_pinned_adapters_are_never_evicted(registry, root):
    registry.load_adapter(root / "desc")  # what lexlora serve --pin desc does before the store exists
    store = make_store(registry, root, max_resident=1, pins=("desc",))
    for name in ("plain", "files"):
        store.release(store.acquire_sync(name))
    assert "desc" in registry and store._resident["desc"].pinned
    # The pin fills the cap of 1: each other adapter leaves as soon as its request is done.
    assert sorted(registry.adapters) == ["desc"] and store.stats["evictions"] == 2


def test_failures_are_remembered_briefly_and_touch_no_other_adapter(registry, root):
    store = make_store(registry, root, failure_ttl_s=0.3)
    store.release(store.acquire_sync("desc"))
    (root / "plain" / WEIGHTS_NAME).write_bytes(b"truncated")
    for name, error, text in [("broken", AdapterError, "not valid JSON"), ("xbase", AdapterError, "different base"),
                              ("plain", AdapterError, "plain"), ("nope", AdapterNotFound, "no adapter named 'nope'")]:
        with pytest.raises(error, match=text):
            store.acquire_sync(name)
    assert store.stats["load_failures"] == 4 and set(store.failures()) == {"broken", "xbase", "plain", "nope"}
    with pytest.raises(AdapterError):  # answered from the negative cache: no new attempt
        store.acquire_sync("broken")
    assert store.stats["load_failures"] == 4
    time.sleep(0.35)
    with pytest.raises(AdapterError):  # the memory has expired: tried again
        store.acquire_sync("broken")
    assert store.stats["load_failures"] == 5
    assert sorted(registry.adapters) == ["desc"] and store._resident["desc"].users == 0
    with pytest.raises(AdapterError, match="invalid adapter name"):
        store.acquire_sync("../desc")


def test_a_link_out_of_the_root_is_refused(registry, root, tmp_path):
    shutil.copytree(root / "desc", tmp_path / "elsewhere")
    (root / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(AdapterError, match="not a dir directly under"):
        make_store(registry, root).acquire_sync("outside")


def test_replace_keeps_the_old_weights_for_who_holds_them(registry, root, adapters):
    store = make_store(registry, root)
    old = store.acquire_sync("desc")
    users_before = dict(registry.router._users)
    shutil.rmtree(root / "desc")
    shutil.copytree(root / "plain", root / "desc")  # new weights on disk under the same name
    new = store.replace("desc")
    assert new is not old and registry.adapters["desc"] is new and not old.unloaded
    assert store.acquire_sync("desc") is new
    # The old weights stay attached to the router until their holder lets go.
    assert all(registry.router._users[p] >= users_before[p] for p in old.lora.paths)
    store.release(old)
    store.release(new)
    assert store._retired == {} and dict(registry.router._users) == users_before
    expected = adapters[2].generate(DESC_INPUTS, adapter="plain")
    assert registry.generate(DESC_INPUTS, adapter="desc") == expected


def test_a_failed_replace_leaves_the_old_adapter_serving(registry, root):
    store = make_store(registry, root)
    store.release(old := store.acquire_sync("desc"))
    (root / "desc" / WEIGHTS_NAME).write_bytes(b"truncated")
    with pytest.raises(AdapterError):
        store.replace("desc")
    assert registry.adapters["desc"] is old and store.acquire_sync("desc") is old


def test_load_unload_cycles_leave_nothing_behind(registry, root):
    store = make_store(registry, root, max_resident=1)
    store.release(store.acquire_sync("desc"))
    hooks, users = len(registry.router._hooks), dict(registry.router._users)
    gone = []
    for cycle in range(60):
        name = ("plain", "extra", "files")[cycle % 3]
        loaded = store.acquire_sync(name)
        gone.append(weakref.ref(loaded))
        store.release(loaded)
        if cycle % 7 == 0:
            store.unload(name)
    store.unload(next(iter(registry.adapters)))
    del loaded
    gc.collect()
    assert len(registry) == 0 and store.resident_count == 0 and store._retired == {}
    assert all(ref() is None for ref in gone), "an evicted adapter is still referenced"
    assert len(registry.router._hooks) == hooks  # kept (keep_hooks): no hook churn while serving
    assert all(registry.router._users[p] == 0 for p in users)
    assert store.stats["loads"] == 61


def _hub_cache(cache, repo_id, adapter_dir, revision="main"):
    """An HF cache holding `adapter_dir` as `repo_id` at `revision`, laid out as huggingface_hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = f"{abs(hash((repo_id, revision))):040x}"[:40]
    shutil.copytree(adapter_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


def test_hub_repos_load_from_the_local_hf_cache_offline(registry, root, tmp_path, monkeypatch, adapters):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    _hub_cache(cache, "someorg/desc-adapter", root / "desc")
    _hub_cache(cache, "someorg/desc-adapter", root / "plain", revision="v2")
    store = make_store(registry, root, allow_hub=True, hub_cache_dir=cache)
    first = store.acquire_sync("someorg/desc-adapter")
    v2 = store.acquire_sync("someorg/desc-adapter@v2")
    assert registry.generate(DESC_INPUTS, adapter="someorg/desc-adapter") == adapters[2].generate(
        DESC_INPUTS, adapter="desc")
    assert registry.generate(DESC_INPUTS, adapter="someorg/desc-adapter@v2") == adapters[2].generate(
        DESC_INPUTS, adapter="plain")
    assert {"someorg/desc-adapter", "someorg/desc-adapter@v2"} <= set(store.known())
    store.release(first)
    store.release(v2)
    with pytest.raises(AdapterNotFound, match="not in the local HF cache"):
        store.acquire_sync("someorg/missing")
    closed = make_store(LexLoRA.from_config(tiny_model_config()), root, hub_cache_dir=cache)
    with pytest.raises(AdapterError, match="invalid adapter name"):  # Hub ids need --allow-hub
        closed.acquire_sync("someorg/desc-adapter")


def test_a_fresh_load_cannot_be_evicted_before_its_waiters_hold_it(registry, root, monkeypatch):
    """Over the cap (everything else in use), another request's release trims the set; the adapter
    that just landed is already held for the request that waited for it, so it stays."""
    store = make_store(registry, root, max_resident=1)
    held = store.acquire_sync("desc")
    real_install = store._install

    def install_then_trim(loaded, future):
        real_install(loaded, future)
        store._trim()  # what a release() on another thread may do right now

    monkeypatch.setattr(store, "_install", install_then_trim)
    loaded = store.acquire_sync("plain")
    assert registry.adapters.get("plain") is loaded and store._resident["plain"].users == 1
    store.release(loaded)  # idle and over the cap now: evicted
    assert "plain" not in registry and "desc" in registry
    store.release(held)


def test_a_waiter_that_gives_up_returns_its_use(registry, root, monkeypatch):
    import asyncio

    store = make_store(registry, root)
    gate = threading.Event()
    real = registry.build_adapter
    monkeypatch.setattr(registry, "build_adapter", lambda *a, **k: (gate.wait(10), real(*a, **k))[1])

    async def give_up():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.acquire("plain"), 0.05)

    asyncio.run(give_up())
    gate.set()
    wait_until(lambda: "plain" in registry and store._resident["plain"].users == 0, "the load to land, unheld")
