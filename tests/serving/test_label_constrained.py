"""Label-constrained generation through the registry and the server: mixed batches of adapters with
different label sets (and free-text ones) equal each adapter alone, the label set read from
lexlora.json, and /generate with and without `constrain`, with `scores` in the response."""

import pytest

from lexlora.adapters.format import read_metadata, write_metadata
from lexlora.errors import AdapterError
from lexlora.serving import create_app
from lexlora.serving.registry import LexLoRA
from tests.conftest import tiny_model_config
from tests.serving.served import DESC_INPUTS, SETTINGS, call, generate, running, save_tiny_adapter

KINDS = ["config", "python source code", "image"]
TONES = ["good", "bad news", "neutral tone", "unknown"]
NAMES = ["backup_config.json", "setup.py", "notes.txt"]


def with_labels(path, labels):
    meta = read_metadata(path)
    meta.labels = labels
    write_metadata(path, meta)
    return path


@pytest.fixture(scope="module")
def label_adapters(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("labels")
    with_labels(save_tiny_adapter(root / "kind", tokenizer, mode="add", seed=11), KINDS)
    with_labels(save_tiny_adapter(root / "tone", tokenizer, mode=None, r=8, seed=12), TONES)
    save_tiny_adapter(root / "desc", tokenizer, mode="add", seed=13)
    registry = LexLoRA.from_config(tiny_model_config())
    for name in ("kind", "tone", "desc"):
        registry.load_adapter(root / name)
    return root, registry


def test_label_set_is_read_and_described(label_adapters):
    _, registry = label_adapters
    assert registry.adapters["kind"].labels == tuple(KINDS)
    assert registry.adapters["desc"].labels is None
    described = {a["name"]: a["labels"] for a in registry.list_adapters()}
    assert described == {"kind": KINDS, "tone": TONES, "desc": None}


def test_mixed_batches_equal_each_adapter_alone(label_adapters):
    _, registry = label_adapters
    names = ["kind", "tone", "kind", "tone", "tone"]
    inputs = NAMES + NAMES[:2]
    mixed = registry.generate_labels(inputs, adapter=names, batch_size=2)
    for row, (name, text) in enumerate(zip(names, inputs)):
        alone = registry.generate_labels([text], adapter=name)[0]
        assert mixed[row].label == alone.label and mixed[row].label in registry.adapters[name].labels
        assert mixed[row].scores == pytest.approx(alone.scores, abs=1e-5)
    # generate(): constrained rows give their label, the free adapter's rows their free text.
    names = ["desc", "kind", "tone", "desc"]
    inputs = NAMES + NAMES[:1]
    outputs = registry.generate(inputs, adapter=names)
    assert outputs[1] == registry.generate_labels([inputs[1]], adapter="kind")[0].label
    assert outputs[2] == registry.generate_labels([inputs[2]], adapter="tone")[0].label
    assert [outputs[0], outputs[3]] == registry.generate([inputs[0], inputs[3]], adapter="desc")


def test_constrain_switch(label_adapters):
    _, registry = label_adapters
    free = registry.generate(NAMES, adapter="kind", constrain=False)
    assert not set(free) <= set(KINDS)
    assert set(registry.generate(NAMES, adapter="kind")) <= set(KINDS)
    assert registry.generate(NAMES, adapter="desc") == registry.generate(NAMES, adapter="desc", constrain=False)
    with pytest.raises(AdapterError, match="constrain=True: adapter 'desc' has no label set"):
        registry.generate(NAMES, adapter="desc", constrain=True)
    with pytest.raises(AdapterError, match="input 0: the adapter 'desc' has no label set"):
        registry.generate_labels(NAMES[:1], adapter="desc")


@pytest.fixture(scope="module", params=["continuous", "static"])
def label_server(request, label_adapters):
    import dataclasses

    root, registry = label_adapters
    app = create_app(registry, root, dataclasses.replace(SETTINGS, engine=request.param))
    with running(app) as url:
        yield url, registry


def test_generate_route_constrained_by_default_with_scores(label_server):
    url, registry = label_server
    status, body = generate(url, "kind", NAMES)
    assert status == 200
    expected = registry.generate_labels(NAMES, adapter="kind")
    assert body["outputs"] == [p.label for p in expected]
    assert [set(s) for s in body["scores"]] == [set(KINDS)] * len(NAMES)
    for scores, prediction in zip(body["scores"], expected):
        assert sum(scores.values()) == pytest.approx(1.0) and scores == pytest.approx(prediction.scores, abs=1e-6)


def test_generate_route_without_constrain(label_server):
    url, registry = label_server
    status, body = generate(url, "kind", NAMES, constrain=False)
    assert status == 200 and "scores" not in body
    assert body["outputs"] == registry.generate(NAMES, adapter="kind", constrain=False)
    status, body = generate(url, "desc", DESC_INPUTS)  # no label set: free text, no scores
    assert status == 200 and "scores" not in body
    assert body["outputs"] == registry.generate(DESC_INPUTS, adapter="desc")


def test_generate_route_refusals(label_server):
    url, _ = label_server
    status, body = generate(url, "desc", NAMES, constrain=True)
    assert status == 422 and "'desc' has no label set" in body["detail"]
    status, body = generate(url, "kind", NAMES, stream=True)
    if call(f"{url}/health")[1]["engine"] == "continuous":
        assert status == 422 and "scored whole, not streamed: send stream=false" in body["detail"]
    else:  # the static batcher streams nothing at all
        assert status == 400 and "streaming needs the continuous engine" in body["detail"]
    status, body = generate(url, "kind", NAMES, num_beams=2)  # not a decoding option scoring refuses
    assert status == 200 and set(body["outputs"]) <= set(KINDS)


def test_concurrent_mixed_requests(label_server):
    """Constrained and free requests at once: scoring runs beside the worker without clashing."""
    import threading

    url, registry = label_server
    results = {}
    jobs = [("kind", NAMES), ("desc", DESC_INPUTS), ("tone", NAMES), ("kind", NAMES[:1]), ("desc", DESC_INPUTS[:1])]

    def send(index, name, inputs):
        results[index] = generate(url, name, inputs)

    threads = [threading.Thread(target=send, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index, (name, inputs) in enumerate(jobs):
        status, body = results[index]
        assert status == 200 and body["outputs"] == registry.generate(inputs, adapter=name)


def test_openai_completion_of_a_label_adapter_is_the_label(label_server):
    url, registry = label_server
    status, body = call(f"{url}/v1/completions", "POST", {"model": "tone", "prompt": "setup.py"})
    assert status == 200
    assert body["choices"][0]["text"] == registry.generate_labels(["setup.py"], adapter="tone")[0].label


def test_openai_usage_of_a_label_adapter(label_server):
    url, registry = label_server
    status, body = call(f"{url}/v1/completions", "POST", {"model": "tone", "prompt": "setup.py"})
    assert status == 200
    label = body["choices"][0]["text"]
    plan = registry.adapters["tone"].plan()
    prompt = registry.pipeline.token_ids([plan], registry.pipeline.records([plan], ["setup.py"]))[0]
    assert body["usage"]["prompt_tokens"] == len(prompt) > 0
    assert body["usage"]["completion_tokens"] == len(registry.tokenizer(text_target=[label])["input_ids"][0])
