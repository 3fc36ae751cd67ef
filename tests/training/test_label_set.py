"""A seq2seq run on a label task records its label set (sorted distinct stripped train targets) in
lexlora.json, and the reloaded adapter generates only those labels by default; a text task records
none."""

import json

from lexlora.adapters.files import load_adapter
from lexlora.adapters.format import read_metadata
from lexlora.training.recipe import train
from tests.conftest import tiny_train_config

KINDS = {".py": "python source", ".json": "config file ", ".txt": " plain text", ".sh": "shell script"}


def label_data(path):
    rows = []
    for i in range(80):
        ext = list(KINDS)[i % len(KINDS)]
        rows.append({"filename": f"file_{i}{ext}", "description": KINDS[ext]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_label_task_records_its_label_set(tmp_path):
    config = tiny_train_config(tmp_path, label_data(tmp_path / "kinds.jsonl"), max_steps=2)
    train(config)
    labels = ["config file", "plain text", "python source", "shell script"]
    assert read_metadata(config.output_dir).labels == labels  # stripped, sorted, detected (data.task=auto)
    model = load_adapter(config.output_dir)
    assert model.labels == tuple(labels)
    outputs = model.generate_text(["backup.json", "x.py", "notes.txt"])
    assert set(outputs) <= set(labels)
    predictions = model.generate_labels(["backup.json"])
    assert sorted(predictions[0].scores) == labels


def test_a_text_task_records_no_label_set(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=1)
    train(config)
    meta = read_metadata(config.output_dir)
    assert meta.labels is None
    assert "labels" not in json.loads((tmp_path / "adapter" / "lexlora.json").read_text())


def test_a_label_task_is_evaluated_constrained_as_it_will_be_used(tmp_path):
    config = tiny_train_config(tmp_path, label_data(tmp_path / "kinds.jsonl"), max_steps=2)
    config.train.eval_metric = "accuracy"
    meta_metrics = train(config).metrics
    model = load_adapter(config.output_dir)
    rows = [json.loads(line) for line in (tmp_path / "kinds.jsonl").read_text().splitlines()][64:80]
    predicted = model.generate_text([{"filename": r["filename"]} for r in rows])  # constrained by default
    accuracy = sum(p == r["description"].strip() for p, r in zip(predicted, rows)) / len(rows)
    assert meta_metrics["final_accuracy"] == accuracy
    samples = read_metadata(config.output_dir).samples
    assert samples and all(s["output"] in KINDS.values() or s["output"] in {v.strip() for v in KINDS.values()}
                           for s in samples)
