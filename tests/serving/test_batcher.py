"""The static `Batcher` behind POST /generate (lexlora serve --engine static), driven through the app (which maps its errors to statuses):
queued requests for different adapters run as one mixed batch, and a request whose adapter went
away or whose rows break the batch fails alone. Holding `batcher.lock` makes requests queue up."""

from tests.serving import served
from tests.serving.served import (
    DESC_INPUTS,
    FILES_INPUTS,
    assert_still_serving,
    call,
    fire,
    generate,
    wait_pending,
)

adapters, server = served.adapters, served.static_server  # `server` here is the static one


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(server, adapters, monkeypatch):
    url, _ = server
    registry = adapters[2]

    def broken_generate(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(registry, "generate", broken_generate)
    status, reply = generate(url, "desc", ["a.py"])
    assert status == 500 and "RuntimeError" in reply["detail"]
    monkeypatch.undo()
    assert_still_serving(url, registry)

def test_concurrent_requests_for_different_adapters_run_as_one_mixed_batch(server, adapters):
    url, app = server
    registry, batcher = adapters[2], app.state.batcher
    requests = [("desc", DESC_INPUTS), ("plain", ["a.py"]), ("files", FILES_INPUTS)]
    expected = [registry.generate(inputs, adapter=name) for name, inputs in requests]
    # The adapters really differ, so a row routed through the wrong one would show.
    assert len({registry.generate(["a.py"], adapter=n)[0] for n in ("desc", "plain")}) == 2
    before = call(f"{url}/health")[1]
    with batcher.lock:  # the worker cannot start a batch: the requests pile up in its queue
        threads, results = fire(url, requests)
        wait_pending(batcher, 3)
    for thread in threads:
        thread.join(30)
    after = call(f"{url}/health")[1]
    assert [results[i] for i in range(3)] == [(200, {"outputs": e}) for e in expected]
    assert after["batches"] - before["batches"] == 1
    assert after["mixed_batches"] - before["mixed_batches"] == 1
    assert after["rows"] - before["rows"] == 5

def test_adapter_unloaded_while_queued_fails_only_its_request(server, adapters):
    url, app = server
    root, _, registry = adapters
    batcher = app.state.batcher
    with batcher.lock:
        registry.load_adapter(root / "plain", name="doomed")
    expected = registry.generate(DESC_INPUTS, adapter="desc")
    with batcher.lock:
        threads, results = fire(url, [("doomed", ["a.py"]), ("desc", DESC_INPUTS)])
        wait_pending(batcher, 2)
        registry.delete_adapter("doomed")
    for thread in threads:
        thread.join(30)
    assert results[0][0] == 404 and "doomed" in results[0][1]["detail"]
    assert results[1] == (200, {"outputs": expected})

def test_a_request_that_breaks_its_batch_fails_alone(server, adapters, monkeypatch):
    """If a mixed batch fails, each request in it is retried alone: only the culprit gets the 500."""
    url, app = server
    registry, batcher = adapters[2], app.state.batcher
    expected = registry.generate(DESC_INPUTS, adapter="desc")
    real_generate = registry.generate

    def fails_on_poison(inputs, *args, **kwargs):
        if any(record.get("filename") == "poison.py" for record in inputs):
            raise RuntimeError("simulated failure on one row")
        return real_generate(inputs, *args, **kwargs)

    monkeypatch.setattr(registry, "generate", fails_on_poison)
    with batcher.lock:
        threads, results = fire(url, [("desc", DESC_INPUTS), ("plain", ["poison.py"]), ("desc", DESC_INPUTS)])
        wait_pending(batcher, 3)
    for thread in threads:
        thread.join(30)
    assert results[0] == results[2] == (200, {"outputs": expected})
    assert results[1][0] == 500 and "RuntimeError" in results[1][1]["detail"]
