"""`lexlora serve`: the HTTP API over a registry of tiny adapters, run in-process by uvicorn and
called with the stdlib."""

import contextlib
import json
import random
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from lexlora.adapters.files import save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.adapters.format import META_NAME
from lexlora.cli import build_parser, main
from lexlora.config import LoraSettings
from lexlora.data.spec import AdapterSpec
from lexlora.model.loading import load_base_model
from lexlora.model.lora_model import LexLoraModel, build_lora_config
from lexlora.serving.app import ServeSettings, create_app
from lexlora.serving.registry import LexLoRA
from tests.conftest import tiny_model_config
from tests.helpers import make_model, perturb_

uvicorn = pytest.importorskip("uvicorn")

SETTINGS = ServeSettings(max_inputs=4, max_input_chars=50, max_batch_rows=32, batch_wait_ms=5, max_body_bytes=2000,
                         body_timeout_s=20.0)
FILES_SPEC = AdapterSpec(
    input_template="File {file} in {directory}:", target_field="description", lexical_field="file",
    fusion_mode="prefix", embedding_model="sentence-transformers/all-MiniLM-L6-v2", embedding_dim=384,
)
DESC_INPUTS = ["backup_config.json", "setup.py"]
FILES_INPUTS = [{"file": "main.c", "directory": "src"}, {"file": "Makefile", "directory": "."}]


def save_tiny_adapter(path, tokenizer, mode="add", r=4, seed=1, spec=None, base_seed=0):
    """A tiny adapter whose weights are large enough that each adapter's outputs differ."""
    base = load_base_model(tiny_model_config(seed=base_seed))
    if spec is None:
        model = make_model(base, tokenizer, mode=mode, r=r)
    else:
        lora = build_lora_config(LoraSettings(r=r, alpha=2 * r, dropout=0.0), "t5", "google/flan-t5-small")
        model = LexLoraModel.create(base, tokenizer, lora, spec)
    perturb_(model, seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(20)
    meta = {"base": fingerprint(base, tiny_model_config(seed=base_seed)), "generation": {"max_new_tokens": 6}}
    return save_adapter(model, path, meta, save_dtype="float32")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer):
    """desc (add fusion), plain (no fusion), files (two-field template, prefix fusion) under root;
    extra, saved elsewhere, to be copied in at run time; a broken dir under root."""
    root = tmp_path_factory.mktemp("served")
    spare = tmp_path_factory.mktemp("spare")
    save_tiny_adapter(root / "desc", tokenizer, mode="add", seed=1)
    save_tiny_adapter(root / "plain", tokenizer, mode=None, r=8, seed=2)
    save_tiny_adapter(root / "files", tokenizer, spec=FILES_SPEC, seed=3)
    save_tiny_adapter(spare / "extra", tokenizer, mode=None, seed=4)
    save_tiny_adapter(spare / "otherbase", tokenizer, mode=None, seed=5, base_seed=7)
    (root / "broken").mkdir()
    (root / "broken" / META_NAME).write_text("{not json")
    registry = LexLoRA.from_config(tiny_model_config())
    for name in ("desc", "plain", "files"):
        registry.load_adapter(root / name)
    return root, spare, registry


@contextlib.contextmanager
def running(app):
    """The app served by uvicorn on a free port, in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(adapters):
    root, spare, registry = adapters
    app = create_app(registry, root, SETTINGS)
    with running(app) as url:
        assert_still_serving(url, registry)  # warm: the first call loads the embedding model
        yield url, app


def call(url, method="GET", body=None, raw=None, content_type="application/json"):
    """(status, JSON body) for a request; `raw` bytes are sent as they are."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def generate(url, adapter, inputs, **options):
    return call(f"{url}/generate", "POST", {"adapter": adapter, "inputs": inputs, **options})


def assert_still_serving(url, registry):
    status, body = generate(url, "desc", DESC_INPUTS[:1])
    assert status == 200 and body["outputs"] == registry.generate(DESC_INPUTS[:1], adapter="desc")


def test_health_and_list(server, adapters):
    url, _ = server
    status, health = call(f"{url}/health")
    assert status == 200 and health["status"] == "ok" and health["adapters"] == 3
    assert {"batches", "rows", "mixed_batches", "pending"} <= set(health)
    status, listing = call(f"{url}/adapters")
    assert status == 200
    assert {a["name"] for a in listing["adapters"]} == {"desc", "plain", "files"}
    assert listing["adapters"] == json.loads(json.dumps(adapters[2].list_adapters()))
    files = next(a for a in listing["adapters"] if a["name"] == "files")
    assert files["input_fields"] == ["file", "directory"]


def test_generate_matches_the_registry_alone(server, adapters):
    url, _ = server
    registry = adapters[2]
    status, body = generate(url, "desc", DESC_INPUTS)
    assert status == 200 and body["outputs"] == registry.generate(DESC_INPUTS, adapter="desc")
    status, body = generate(url, "files", FILES_INPUTS)
    assert status == 200 and body["outputs"] == registry.generate(FILES_INPUTS, adapter="files")
    status, body = generate(url, "plain", [{"filename": "a.py", "unused": "x"}], max_new_tokens=3, num_beams=2)
    assert status == 200
    assert body["outputs"] == registry.generate(["a.py"], adapter="plain", max_new_tokens=3, num_beams=2)


def test_openapi_schema_and_docs(server):
    url, _ = server
    status, schema = call(f"{url}/openapi.json")
    assert status == 200
    assert {"/health", "/adapters", "/adapters/{name}", "/generate"} <= set(schema["paths"])
    assert {"GenerateRequest", "GenerateResponse", "AdapterInfo"} <= set(schema["components"]["schemas"])
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}
    assert set(schema["components"]["schemas"]["GenerateRequest"]["properties"]) == {
        "adapter", "inputs", "max_new_tokens", "num_beams"}
    with urllib.request.urlopen(f"{url}/docs", timeout=10) as response:
        assert response.status == 200 and b"swagger" in response.read().lower()


def test_load_at_run_time_then_delete(server, adapters):
    url, _ = server
    root, spare, registry = adapters
    assert generate(url, "extra", ["a.py"])[0] == 404
    assert call(f"{url}/adapters", "POST", {"name": "extra"})[0] == 404  # not copied in yet
    shutil.copytree(spare / "extra", root / "extra")
    status, info = call(f"{url}/adapters", "POST", {"name": "extra"})
    assert status == 201 and info["name"] == "extra" and info["input_fields"] == ["filename"]
    assert call(f"{url}/adapters", "POST", {"name": "extra"})[0] == 409
    status, body = generate(url, "extra", ["a.py"])
    assert status == 200 and body["outputs"] == registry.generate(["a.py"], adapter="extra")
    assert call(f"{url}/health")[1]["adapters"] == 4

    status, body = call(f"{url}/adapters/extra", "DELETE")
    assert status == 200 and body == {"deleted": "extra", "adapters": 3}
    assert "extra" not in registry
    status, body = generate(url, "extra", ["a.py"])
    assert status == 404 and "extra" in body["detail"]
    assert call(f"{url}/adapters/extra", "DELETE")[0] == 404


def test_broken_adapter_dir_is_refused_with_its_error(server, adapters):
    url, _ = server
    status, body = call(f"{url}/adapters", "POST", {"name": "broken"})
    assert status == 422 and "not valid JSON" in body["detail"]
    assert "broken" not in adapters[2]
    assert_still_serving(url, adapters[2])


def test_adapter_of_another_base_is_refused(server, adapters):
    url, _ = server
    root, spare, registry = adapters
    shutil.copytree(spare / "otherbase", root / "otherbase")
    status, body = call(f"{url}/adapters", "POST", {"name": "otherbase"})
    assert status == 422 and "this adapter was trained on a different base (weights differ" in body["detail"]
    assert "otherbase" not in registry
    assert_still_serving(url, registry)


def test_no_client_chosen_paths(server, adapters, tmp_path):
    url, _ = server
    root, spare, registry = adapters
    (root / "outside").symlink_to(spare / "extra", target_is_directory=True)
    for name in ["../plain", "a/b", str(root / "desc"), ".", "..", "", ".hidden", "outside"]:
        status, body = call(f"{url}/adapters", "POST", {"name": name})
        assert status in (400, 422), name
        assert isinstance(body["detail"], str) and body["detail"], name
    assert "outside" not in registry and len(registry) == 3
    assert_still_serving(url, registry)


BAD_REQUESTS = [
    # (body or raw bytes, expected statuses, text expected in the detail)
    ({"adapter": "nope", "inputs": ["a"]}, {404}, "nope"),
    (b'{"adapter": "desc", "inputs": [', {422}, "JSON"),
    (b"", {422}, "body"),
    ({"adapter": "desc", "inputs": "a.py"}, {422}, "inputs"),
    ({"adapter": 3, "inputs": ["a.py"]}, {422}, "adapter"),
    ({"adapter": "desc", "inputs": [1]}, {422}, "inputs"),
    ({"adapter": "desc", "inputs": [{"filename": 1}]}, {422}, "inputs"),
    ({"adapter": "desc", "inputs": ["a"], "max_new_tokens": "many"}, {422}, "max_new_tokens"),
    ({"adapter": "desc", "inputs": ["a"], "max_new_tokens": 10**6}, {422}, "max_new_tokens"),
    ({"adapter": "desc", "inputs": ["a"], "typo": 1}, {422}, "typo"),
    ({"inputs": ["a"]}, {422}, "adapter"),
    ({"adapter": "desc", "inputs": []}, {422}, "inputs is empty"),
    ({"adapter": "desc", "inputs": ["a"] * 5}, {413}, "5 inputs; at most 4 per request"),
    ({"adapter": "desc", "inputs": ["a" * 51]}, {413}, "input 0: 51 characters; at most 50 per string"),
    ({"adapter": "files", "inputs": [{"file": "x" * 51, "directory": "d"}]}, {413}, "at most 50"),
    ({"adapter": "files", "inputs": [{"file": "main.c"}]}, {422}, "'directory'"),
    ({"adapter": "files", "inputs": ["main.c"]}, {422}, "record"),
    # Text a tokenizer cannot take (JSON allows a lone surrogate escape).
    (b'{"adapter": "desc", "inputs": ["a\\ud800b"]}', {422}, "input 0: not valid text"),
    # Names, never paths: refused before any lookup.
    ({"adapter": "../desc", "inputs": ["a"]}, {422}, "invalid adapter name '../desc'"),
    ({"adapter": "a/b", "inputs": ["a"]}, {422}, "invalid adapter name"),
    ({"adapter": "/etc/passwd", "inputs": ["a"]}, {422}, "invalid adapter name"),
    ({"adapter": "desc", "inputs": ["a"], "pad": "x" * 3000}, {413}, "at most 2000"),
    (b"[1, 2]", {422}, "must be a JSON object"),
    (b"null", {422}, "got null"),
    (b"[" * 3000 + b"]" * 3000, {413}, "at most 2000"),
    (b"[" * 1500, {422}, "nested too deeply"),
    (b'{"adapter": "desc", "inputs": ["\xff"]}', {422}, "not UTF-8"),
    (b"\x00\x01", {422}, "not valid JSON"),
]


@pytest.mark.parametrize("body, statuses, text", BAD_REQUESTS)
def test_bad_request_fails_alone_and_the_server_keeps_serving(server, adapters, body, statuses, text):
    url, _ = server
    if isinstance(body, bytes):
        status, reply = call(f"{url}/generate", "POST", raw=body)
    else:
        status, reply = call(f"{url}/generate", "POST", body)
    assert status in statuses
    assert isinstance(reply["detail"], str) and text in reply["detail"]
    assert_still_serving(url, adapters[2])


def test_form_encoded_body_gets_a_hint(server, adapters):
    url, _ = server
    raw = json.dumps({"adapter": "desc", "inputs": ["a"]}).encode()
    status, reply = call(f"{url}/generate", "POST", raw=raw, content_type="application/x-www-form-urlencoded")
    assert status == 422 and "Content-Type: application/json" in reply["detail"]


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


def fire(url, requests):
    """Send requests from threads at once; returns (threads, results by index)."""
    results = {}

    def send(index, adapter, inputs):
        results[index] = generate(url, adapter, inputs)

    threads = [threading.Thread(target=send, args=(i, *r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    return threads, results


def wait_pending(batcher, count):
    deadline = time.monotonic() + 10
    while batcher.pending < count:
        assert time.monotonic() < deadline, f"only {batcher.pending} of {count} requests queued"
        time.sleep(0.005)


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


def test_serve_cli_options_and_missing_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--adapters", "--host", "--port", "--base", "--device", "--max-inputs", "--max-input-chars",
                   "--max-batch-rows", "--batch-wait-ms", "--max-body-bytes", "--body-timeout-s"):
        assert option in help_text
    args = build_parser().parse_args(["serve", "--adapters", "x"])
    assert (args.host, args.port, args.max_inputs, args.max_input_chars, args.max_batch_rows, args.batch_wait_ms,
            args.max_body_bytes, args.body_timeout_s) == ("127.0.0.1", 8000, 64, 1000, 32, 5.0, 4 << 20, 30.0)
    assert main(["serve", "--adapters", str(tmp_path / "missing")]) == 2
    assert "adapters dir not found" in capsys.readouterr().err


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


def raw_connection(url):
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_response(sock):
    """(status, JSON body) of one HTTP/1.1 response read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


def post_head(length, extra=b""):
    return (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + (b"Content-Length: %d\r\n" % length if length is not None else b"") + b"\r\n")


def test_slow_clients_do_not_block_others(server, adapters):
    url, _ = server
    registry = adapters[2]
    body = json.dumps({"adapter": "desc", "inputs": DESC_INPUTS}).encode()
    slow, silent = raw_connection(url), raw_connection(url)  # silent: connects and sends nothing
    try:
        slow.sendall(post_head(len(body)) + body[:10])  # headers and a little of the body, then nothing
        started = time.monotonic()
        for _ in range(3):  # meanwhile other clients are answered
            assert_still_serving(url, registry)
        assert time.monotonic() - started < SETTINGS.body_timeout_s  # (else the slow one got a 408)
        slow.sendall(body[10:])  # the rest arrives in time: an ordinary answer
        assert read_response(slow) == (200, {"outputs": registry.generate(DESC_INPUTS, adapter="desc")})
    finally:
        slow.close()
        silent.close()


def test_a_body_that_never_completes_times_out_with_408(adapters):
    root, _, registry = adapters
    settings = ServeSettings(body_timeout_s=0.5)
    with running(create_app(registry, root, settings)) as url:
        stalled = raw_connection(url)
        try:
            stalled.sendall(post_head(500) + b'{"adapter": "desc", ')
            assert_still_serving(url, registry)
            status, reply = read_response(stalled)  # once body_timeout_s has passed
            assert status == 408 and reply["detail"] == "the request body did not arrive within 0.5 s"
        finally:
            stalled.close()
        assert_still_serving(url, registry)


def test_an_oversized_chunked_body_is_cut_off_with_413(server, adapters):
    url, _ = server
    sock = raw_connection(url)
    try:
        # 3 x 1000 bytes, no Content-Length to refuse up front; no end chunk: refused while it streams
        sock.sendall(post_head(None, b"Transfer-Encoding: chunked\r\n") + (b"3e8\r\n" + b" " * 1000 + b"\r\n") * 3)
        status, reply = read_response(sock)
        assert status == 413 and "over 2000 bytes" in reply["detail"]
    finally:
        sock.close()
    assert_still_serving(url, adapters[2])


def test_32_concurrent_clients_mixing_adapters(server, adapters):
    """A few hundred requests from 32 threads, mixing the three adapters (and some bad requests):
    no 5xx, every good answer equal to its adapter alone, every bad one its own 4xx."""
    url, app = server
    registry = adapters[2]
    pool = [("desc", [x]) for x in ("backup_config.json", "setup.py", "notes.txt")] + [
        ("desc", DESC_INPUTS), ("plain", ["a.py"]), ("plain", ["Makefile", "run.sh", "x"]),
        ("files", FILES_INPUTS[:1]), ("files", FILES_INPUTS), ("files", FILES_INPUTS[::-1]),
    ]
    expected = {(name, json.dumps(inputs)): registry.generate(inputs, adapter=name) for name, inputs in pool}
    bad = [({"adapter": "nope", "inputs": ["a"]}, 404), ({"adapter": "desc", "inputs": ["a"] * 9}, 413),
           ({"adapter": "files", "inputs": ["main.c"]}, 422)]
    rng = random.Random(0)
    plan = [rng.choice(pool) if rng.random() > 0.1 else rng.choice(bad) for _ in range(320)]
    before = call(f"{url}/health")[1]
    failures, lock = [], threading.Lock()

    def client(worker):
        for item in plan[worker::32]:
            if isinstance(item[1], int):  # a bad request and its status
                status, reply = call(f"{url}/generate", "POST", item[0])
                ok = status == item[1]
            else:
                status, reply = generate(url, *item)
                ok = status == 200 and reply["outputs"] == expected[(item[0], json.dumps(item[1]))]
            if not ok:
                with lock:
                    failures.append((item, status, reply))

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    elapsed = time.monotonic() - started
    after = call(f"{url}/health")[1]
    assert failures == []
    good = sum(not isinstance(item[1], int) for item in plan)
    assert after["rows"] - before["rows"] == sum(len(item[1]) for item in plan if not isinstance(item[1], int))
    assert after["mixed_batches"] > before["mixed_batches"]  # requests for different adapters really shared calls
    assert after["batches"] - before["batches"] < good  # and were batched
    print(f"{len(plan)} requests ({good} good) from 32 clients in {elapsed:.1f}s, "
          f"{after['batches'] - before['batches']} model calls")


@pytest.mark.parametrize("allow", [False, True])
def test_serve_loads_pickle_adapters_at_startup_only_with_allow_pickle(adapters, tmp_path, monkeypatch, caplog, allow):
    from safetensors.torch import load_file

    from lexlora.adapters.format import WEIGHTS_NAME

    root = tmp_path / "served"
    shutil.copytree(adapters[0] / "plain", root / "plain")
    shutil.copytree(adapters[0] / "desc", root / "old")
    torch.save(load_file(str(root / "old" / WEIGHTS_NAME)), root / "old" / "adapter_model.bin")
    (root / "old" / WEIGHTS_NAME).unlink()
    started = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.setdefault("app", app))
    assert main(["serve", "--adapters", str(root)] + (["--allow-pickle"] if allow else [])) == 0
    registry = started["app"].state.registry
    assert sorted(registry.adapters) == (["old", "plain"] if allow else ["plain"])
    if allow:
        assert registry.generate(DESC_INPUTS, adapter="old") == adapters[2].generate(DESC_INPUTS, adapter="desc")
    else:
        assert "skipping adapter old" in caplog.text and "only a pickle adapter_model.bin is present" in caplog.text
