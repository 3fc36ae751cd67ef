"""What the serving tests share: tiny adapters on disk and in a registry, the app run in-process by
uvicorn, and stdlib calls to it. A test module takes the fixtures by assigning them to module names
(`adapters = served.adapters`), which pytest collects like fixtures defined there."""

import contextlib
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
import uvicorn

from lexlora.adapters.files import save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.adapters.format import META_NAME
from lexlora.config import LoraSettings
from lexlora.data.spec import AdapterSpec
from lexlora.model.loading import load_base_model
from lexlora.model.lora_model import LexLoraModel, build_lora_config
from lexlora.serving import ServeSettings, create_app
from lexlora.serving.registry import LexLoRA
from tests.conftest import tiny_model_config
from tests.helpers import make_model, perturb_

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
    root, _, registry = adapters
    app = create_app(registry, root, SETTINGS)
    with running(app) as url:
        assert_still_serving(url, registry)  # warm: the first call loads the embedding model
        yield url, app


@pytest.fixture(scope="module")
def static_server(adapters):
    """The same app with `--engine static` (the batcher)."""
    root, _, registry = adapters
    app = create_app(registry, root, dataclasses.replace(SETTINGS, engine="static"))
    with running(app) as url:
        assert_still_serving(url, registry)
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
