"""Several classifier-head adapters on one encoder base (LexLoRA): each row gets its own LoRA, fusion
and head, so a mixed batch equals each adapter alone and the single-adapter model; the other kind
of adapter is refused with a clear message."""

import pytest
import torch

from lexlora.adapters.files import load_adapter, save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.config import ClassifierConfig, LoraSettings, ModelConfig
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError
from lexlora.model.factory import build_classifier
from lexlora.model.loading import load_base_model, load_tokenizer
from lexlora.serving.registry import LexLoRA
from tests.conftest import TINY_T5, tiny_model_config
from tests.helpers import MINILM, make_model, perturb_, save_tiny_bert

INPUTS = ["backup_config.sh", "a much longer file name for padding.py", "README.md", "notes.txt", "x.log"]


@pytest.fixture(scope="module")
def bert_config(tmp_path_factory):
    return ModelConfig(name_or_path=str(save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")), task="classification")


def save_classifier(path, config, labels, mode, pooling, seed):
    base = load_base_model(config)
    spec = AdapterSpec(input_template="file: {filename}" if seed % 2 else "{filename}", target_field="type",
                       lexical_field="filename", fusion_mode=mode, embedding_model=MINILM if mode else None,
                       embedding_dim=384 if mode else None)
    torch.manual_seed(seed)
    model = build_classifier(base, load_tokenizer(config), spec, LoraSettings(r=2 + seed, alpha=4), labels,
                             base_id=config.name_or_path, classifier=ClassifierConfig(pooling=pooling))
    perturb_(model, seed=seed + 1)
    return save_adapter(model, path, {"base": fingerprint(base, config)}, save_dtype="float32")


@pytest.fixture(scope="module")
def classifiers(bert_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "types": save_classifier(root / "types", bert_config, ["code", "doc", "log"], "add", "mean", 0),
        "binary": save_classifier(root / "binary", bert_config, ["no", "yes"], None, "first", 1),
        "prefixed": save_classifier(root / "prefixed", bert_config, ["a", "b", "c", "d"], "prefix", "mean", 2),
    }


def test_mixed_batches_of_heads_equal_each_adapter_alone(bert_config, classifiers):
    registry = LexLoRA.from_config(bert_config)
    for name, path in classifiers.items():
        registry.load_adapter(path, name=name)
    names = ["types", "binary", "prefixed", "binary", "types"]
    mixed = registry.generate_labels(INPUTS, adapter=names, batch_size=4)
    for row, (text, name) in enumerate(zip(INPUTS, names)):
        alone = registry.generate_labels([text], adapter=name)[0]
        single = load_adapter(classifiers[name]).classify_text([text])[0]
        assert mixed[row].label == alone.label == single.label
        assert list(mixed[row].scores) == list(single.scores)  # the adapter's own labels, in its order
        for label in single.scores:
            assert mixed[row].scores[label] == pytest.approx(single.scores[label], abs=1e-5)
            assert mixed[row].scores[label] == pytest.approx(alone.scores[label], abs=1e-5)
    assert registry.generate(INPUTS, adapter=names) == [p.label for p in mixed]


def test_registry_describes_classifiers(bert_config, classifiers):
    registry = LexLoRA.from_config(bert_config)
    loaded = registry.load_adapter(classifiers["binary"], name="binary")
    assert loaded.labels == ("no", "yes") and loaded.head is not None
    described = registry.list_adapters()[0]
    assert described["task"] == "classification" and described["labels"] == ["no", "yes"]
    registry.delete_adapter("binary")
    assert "binary" not in registry


def test_kinds_do_not_mix_on_one_base(bert_config, classifiers, tmp_path, tokenizer):
    seq2seq = LexLoRA.from_config(tiny_model_config())
    with pytest.raises(AdapterError, match="classifier-head adapter"):
        seq2seq.load_adapter(classifiers["types"], name="types")
    # a generation adapter onto a classifier base
    t5_classifier = ModelConfig(name_or_path="google/flan-t5-small", random_init=True,
                                config_overrides=dict(TINY_T5), task="classification")
    registry = LexLoRA.from_config(t5_classifier)
    base = load_base_model(tiny_model_config())
    model = make_model(base, tokenizer)
    path = save_adapter(model, tmp_path / "gen", {"base": fingerprint(base, tiny_model_config())})
    with pytest.raises(AdapterError, match="generation \\(seq2seq\\) adapter"):
        registry.load_adapter(path, name="gen")


@pytest.fixture(scope="module")
def classifier_server(bert_config, classifiers):
    from lexlora.serving import create_app
    from tests.serving.served import SETTINGS, running

    root = classifiers["types"].parent
    registry = LexLoRA.from_config(bert_config)
    app = create_app(registry, root, SETTINGS)
    with running(app) as url:
        yield url, registry


def test_server_answers_labels_with_scores(classifier_server):
    from tests.serving.served import call, generate

    url, registry = classifier_server
    assert call(f"{url}/health")[1]["engine"] == "static"  # no decoder: requests are scored whole
    status, body = generate(url, "types", INPUTS[:3])
    assert status == 200, body
    expected = registry.generate_labels(INPUTS[:3], adapter="types")  # loaded on first request
    assert body["outputs"] == [p.label for p in expected]
    for scores, prediction in zip(body["scores"], expected):
        assert scores == pytest.approx(prediction.scores, abs=1e-6) and set(scores) == {"code", "doc", "log"}
    status, body = generate(url, "binary", ["a.py"], constrain=False)
    assert status == 422 and body["detail"].startswith("adapter 'binary' is a classifier")
    status, body = call(f"{url}/v1/completions", "POST", {"model": "prefixed", "prompt": "setup.py"})
    assert status == 200
    assert body["choices"][0]["text"] == registry.generate_labels(["setup.py"], adapter="prefixed")[0].label
    status, body = call(f"{url}/v1/models")
    assert {m["id"] for m in body["data"]} >= {"types", "binary", "prefixed"}


def test_openai_usage_counts_a_classifier_prompt(classifier_server):
    from tests.serving.served import call

    url, registry = classifier_server
    status, body = call(f"{url}/v1/completions", "POST", {"model": "types", "prompt": "setup.py"})
    assert status == 200
    prompt_ids = registry.tokenizer("setup.py")["input_ids"]  # the adapter's template is "{filename}"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids) and body["usage"]["completion_tokens"] == 0
