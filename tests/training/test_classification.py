"""Whole classification runs on a tiny BERT: model.task=classification trains LoRA + fusion + a new
head, keeps the best epoch by a validation metric, saves the labels with the adapter, and refuses bad
label data before any model work."""

import json

import pytest
import torch

from lexlora.adapters.files import load_adapter
from lexlora.adapters.format import META_NAME
from lexlora.config import Config, ModelConfig
from lexlora.errors import DataError
from lexlora.model.classifier import LexClassifierModel
from lexlora.training.recipe import train
from tests.helpers import save_tiny_bert

TYPES = {"py": "Python script", "sh": "Shell script", "md": "Markdown", "log": "Log file"}
STEMS = ["backup", "deploy", "monitor", "notes", "setup", "report", "parse", "window", "sync", "build"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_type_rows(count=80):
    exts = list(TYPES)
    return [{"id": str(i), "file": f"{STEMS[i % len(STEMS)]}_{i}.{exts[i % len(exts)]}", "type": TYPES[exts[i % len(exts)]]}
            for i in range(count)]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert"))


def classifier_config(tmp_path, bert_path, data, **overrides) -> Config:
    config = Config()
    config.model = ModelConfig(name_or_path=bert_path, task="classification")
    config.data.path = str(data)
    config.data.input_template = "{file}"
    config.data.target_field = "type"
    config.data.splits = {"train": "[:64]", "validation": "[64:]"}
    config.train.max_steps = 16
    config.train.batch_size = 8
    config.train.learning_rate = 5e-3
    config.train.eval_metric = "macro_f1"
    config.output_dir = str(tmp_path / "adapter")
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def test_classifier_run_saves_labels_head_and_validation_metric(tmp_path, bert_path):
    data = write_rows(tmp_path / "types.jsonl", file_type_rows())
    result = train(classifier_config(tmp_path, bert_path, data))
    meta = json.loads((result.output_dir / META_NAME).read_text())
    assert meta["classifier"]["labels"] == sorted(TYPES.values())
    assert meta["base"]["task"] == "classification"
    assert meta["metrics"]["eval_metric"] == "macro_f1"
    assert 0.0 <= meta["metrics"]["best_macro_f1"] <= 1.0
    assert "final_accuracy" in meta["metrics"]
    model = load_adapter(result.output_dir)
    assert isinstance(model, LexClassifierModel)
    predictions = model.classify_text(["deploy_3.sh", "notes_9.md"])
    assert all(p.label in TYPES.values() and set(p.scores) == set(TYPES.values()) for p in predictions)
    # the recorded final metric is that of the saved weights
    rows = file_type_rows()[64:]
    predicted = model.generate_text([{"file": r["file"]} for r in rows])
    accuracy = sum(p == r["type"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(meta["metrics"]["final_accuracy"])


def test_balanced_class_weights_reach_the_loss(tmp_path, bert_path):
    rows = file_type_rows()
    rows = [r for r in rows if r["type"] == "Log file"][:4] + [r for r in rows if r["type"] != "Log file"]
    data = write_rows(tmp_path / "imbalanced.jsonl", rows)
    config = classifier_config(tmp_path, bert_path, data, **{"classifier.class_weights": "balanced", "train.max_steps": 2})
    config.data.splits = {"train": "[:44]", "validation": "[44:]"}
    from lexlora.data.prepare import prepare_data
    from lexlora.model.loading import load_tokenizer

    prepared = prepare_data(config, load_tokenizer(config.model), torch.device("cpu"))
    weights = prepared.class_weights
    train_labels = [r.fields["type"] for r in prepared.splits["train"].records]
    counts = torch.tensor([train_labels.count(label) for label in prepared.labels.labels], dtype=torch.float32)
    torch.testing.assert_close(weights, len(train_labels) / (len(counts) * counts))
    result = train(config)
    assert result.output_dir.is_dir()


def test_a_label_seen_only_in_validation_is_refused_before_training(tmp_path, bert_path):
    rows = file_type_rows(72) + [{"id": "x", "file": "image.png", "type": "Image"}]
    data = write_rows(tmp_path / "unseen.jsonl", rows)
    with pytest.raises(DataError, match="Image"):
        train(classifier_config(tmp_path, bert_path, data))
    assert not (tmp_path / "adapter").exists()


def test_one_class_only_is_refused(tmp_path, bert_path):
    rows = [{"id": str(i), "file": f"f{i}.py", "type": "Python script"} for i in range(80)]
    data = write_rows(tmp_path / "one.jsonl", rows)
    with pytest.raises(DataError, match="Python script"):
        train(classifier_config(tmp_path, bert_path, data))


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_classifier_runs_on_t5_and_bart_encoders(tmp_path, kind):
    from tests.conftest import TINY_T5
    from tests.helpers import save_tiny_bart

    data = write_rows(tmp_path / "types.jsonl", file_type_rows())
    config = classifier_config(tmp_path, "unused", data, **{"train.max_steps": 6})
    if kind == "t5":
        config.model = ModelConfig(name_or_path="google/flan-t5-small", random_init=True,
                                   config_overrides=dict(TINY_T5), task="classification")
    else:
        config.model = ModelConfig(name_or_path=str(save_tiny_bart(tmp_path / "bart")), task="classification")
    result = train(config)
    model = load_adapter(result.output_dir)
    assert type(model.base_model).__name__ == {"t5": "T5EncoderModel", "bart": "BartEncoder"}[kind]
    again = load_adapter(result.output_dir)
    enc = model.tokenizer(["deploy_3.sh", "notes_9.md"], return_tensors="pt", padding=True)
    lexical = torch.randn(2, 384)  # fusion is on (the default)
    with torch.no_grad():
        torch.testing.assert_close(model(enc.input_ids, enc.attention_mask, lexical_embeds=lexical).logits,
                                   again(enc.input_ids, enc.attention_mask, lexical_embeds=lexical).logits,
                                   rtol=0, atol=0)
    assert [p.scores for p in model.classify_text(["a.py"])] == [p.scores for p in again.classify_text(["a.py"])]


def test_generate_and_eval_commands_on_a_classifier(tmp_path, bert_path, capsys):
    from lexlora.cli import main

    data = write_rows(tmp_path / "types.jsonl", file_type_rows())
    config = classifier_config(tmp_path, bert_path, data, **{"train.max_steps": 4})
    config.data.splits = {"train": "[:56]", "validation": "[56:68]", "test": "[68:]"}
    result = train(config)
    capsys.readouterr()
    assert main(["generate", "--adapter", str(result.output_dir), "--json", "deploy_3.sh"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["output"] in TYPES.values() and set(line["scores"]) == set(TYPES.values())
    assert main(["generate", "--adapter", str(result.output_dir), "deploy_3.sh"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("deploy_3.sh → ") and "+1 more" in text  # the 3 likeliest of 4 labels shown
    assert main(["eval", "--adapter", str(result.output_dir), "--split", "test", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["task"] == "labels" and report["base_scores"] is None
    assert set(report["adapter_scores"]) >= {"accuracy", "macro_f1"}
    assert (tmp_path / "eval" / "confusion.png").is_file()
