"""`lexlora eval`: rows from the adapter's own split, base vs adapter on the same prompts, scores
that match the predictions written, the report files, and the label (classification) path."""

import json
import random

import pytest

from lexlora.cli import main
from lexlora.errors import ConfigError, DataError
from lexlora.evaluation.metrics import classification_metrics, text_metrics
from lexlora.evaluation.runner import eval_rows, run_evaluation
from lexlora.training.recipe import train
from tests.conftest import tiny_train_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def text_adapter(tmp_path_factory):
    from tests.conftest import ROOT

    tmp = tmp_path_factory.mktemp("eval-text")
    config = tiny_train_config(tmp, ROOT / "examples" / "python_stdlib.jsonl", max_steps=2)
    config.data.splits = {"train": "[:32]", "validation": "[32:44]", "test": "[44:52]"}
    return train(config).output_dir


@pytest.fixture(scope="module")
def label_adapter(tmp_path_factory):
    """file -> type, 3 labels: the classification path."""
    tmp = tmp_path_factory.mktemp("eval-labels")
    kinds = {".sh": "Shell script", ".md": "Markdown document", ".py": "Python 3 script"}
    rng = random.Random(0)
    with open(tmp / "types.jsonl", "w") as handle:
        for i in range(60):
            ext = rng.choice(sorted(kinds))
            handle.write(json.dumps({"file": f"file_{i}{ext}", "type": kinds[ext]}) + "\n")
    config = tiny_train_config(tmp, tmp / "types.jsonl", max_steps=2)
    config.data.input_template = "What type of file is {file}?"
    config.data.target_field = "type"
    config.data.splits = {"train": "[:40]", "validation": "[40:60]"}
    config.generation.max_new_tokens = 4
    return train(config).output_dir


def test_rows_come_from_the_adapters_own_split(text_adapter):
    rows = eval_rows(text_adapter, "test")
    assert len(rows.records) == 8 and rows.split == "test"
    assert rows.lines == list(range(45, 53))  # file lines, 1-based
    assert rows.references == [json.loads(line)["description"] for line in
                               open(rows.data_path).read().splitlines()[44:52]]
    assert len(eval_rows(text_adapter, "validation", max_rows=3).records) == 3
    assert len(eval_rows(text_adapter, "all").records) == 442


def test_bad_split_and_missing_data_are_clear(text_adapter, tmp_path):
    with pytest.raises(ConfigError, match=r"split 'dev' is not one of this adapter's splits \['test', 'train', 'validation'\]"):
        eval_rows(text_adapter, "dev")
    with pytest.raises(DataError, match="not found .*pass --data FILE"):
        eval_rows(text_adapter, "test", data_path=str(tmp_path / "missing.jsonl"))


def test_text_report_holds_the_figures_of_its_predictions(text_adapter, tmp_path):
    result, out = run_evaluation(text_adapter, split="validation", out_dir=tmp_path / "report", max_new_tokens=4)
    assert result.task == "text" and result.count == 12
    figures = json.loads((out / "eval.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 12
    refs = [p["reference"] for p in predictions]
    # The recorded scores are those of the written predictions, for the adapter and for the base.
    assert figures["adapter_scores"]["rouge1"] == pytest.approx(text_metrics([p["adapter"] for p in predictions], refs)["rouge1"])
    assert figures["base_scores"]["rougeL"] == pytest.approx(text_metrics([p["base"] for p in predictions], refs)["rougeL"])
    table = {row["metric"]: row for row in figures["table"]}
    assert set(table) >= {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert table["rouge1"]["gain"] == pytest.approx(table["rouge1"]["adapter"] - table["rouge1"]["base"])
    report = (out / "report.md").read_text()
    assert f"| rouge1 | {table['rouge1']['base']:.4f} | {table['rouge1']['adapter']:.4f} | {table['rouge1']['gain']:+.4f} |" in report
    assert "## Sample rows" in report and predictions[0]["reference"] in report
    assert (out / "metrics.png").read_bytes().startswith(PNG_MAGIC)


def test_label_targets_are_scored_as_a_classification(label_adapter, tmp_path):
    result, out = run_evaluation(label_adapter, split="validation", out_dir=tmp_path / "report")
    assert result.task == "labels"
    figures = json.loads((out / "eval.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    expected = classification_metrics([p["adapter"] for p in predictions], [p["reference"] for p in predictions])
    assert figures["adapter_scores"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert figures["adapter_scores"]["confusion"] == expected["confusion"]
    report = (out / "report.md").read_text()
    assert "| accuracy |" in report and "| macro_f1 |" in report and "## Per class (adapter)" in report
    assert (out / "confusion.png").read_bytes().startswith(PNG_MAGIC)


def test_eval_command_writes_into_the_adapter_dir(text_adapter, capsys):
    code = main(["eval", "--adapter", str(text_adapter), "--split", "test", "--max-rows", "4",
                 "--max-new-tokens", "3", "--no-base"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"report: {text_adapter / 'eval' / 'test' / 'report.md'}" in out
    figures = json.loads((text_adapter / "eval" / "test" / "eval.json").read_text())
    assert figures["count"] == 4 and figures["base_scores"] is None


def test_eval_command_bad_input_exits_2(text_adapter, tmp_path, capsys):
    assert main(["eval", "--adapter", str(text_adapter), "--split", "nope"]) == 2
    assert "split 'nope'" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path / "none")]) == 2
    assert "adapter dir not found" in capsys.readouterr().err


def test_evaluate_script_entry_point(text_adapter, tmp_path, capsys):
    from lexlora.cli import eval_main

    assert eval_main(["--adapter", str(text_adapter), "--split", "test", "--max-rows", "2",
                      "--max-new-tokens", "2", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["count"] == 2
