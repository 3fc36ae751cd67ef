"""`lexlora eval`: rows from the adapter's own split, base vs adapter on the same prompts, scores
that match the predictions written, the report files, and the label (classification) path."""

import dataclasses
import json
import random

import pytest

from lexlora.cli import main
from lexlora.errors import ConfigError, DataError
from lexlora.evaluation.metrics import classification_metrics, text_metrics
from lexlora.evaluation.runner import eval_rows, run_evaluation
from lexlora.fileio import file_sha256
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


def test_without_a_split_test_is_scored_else_validation(text_adapter, label_adapter):
    assert eval_rows(text_adapter).split == "test"
    assert eval_rows(label_adapter).split == "validation"  # trained on train/validation only (as smoke.yaml)


def test_eval_command_says_which_split_it_defaulted_to(text_adapter, label_adapter, capsys):
    common = ["--max-rows", "2", "--max-new-tokens", "2", "--no-base"]
    assert main(["eval", "--adapter", str(label_adapter), *common]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("lexlora: scoring the validation split (this adapter has no test split; "
                                   "--split NAME for another)")
    assert json.loads((label_adapter / "eval" / "validation" / "eval.json").read_text())["split"] == "validation"
    assert main(["eval", "--adapter", str(text_adapter), *common, "--out", str(text_adapter / "eval" / "d")]) == 0
    assert "lexlora: scoring the test split (the default; --split NAME for another)" in capsys.readouterr().out
    assert main(["eval", "--adapter", str(text_adapter), "--split", "validation", *common,
                 "--out", str(text_adapter / "eval" / "v")]) == 0
    assert "lexlora: scoring" not in capsys.readouterr().out  # a named split needs no note


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


# ---- the data file against the one the adapter was trained on (lexlora.json dataset.sha256) ---------

@pytest.fixture()
def own_data_adapter(text_adapter, tmp_path):
    """A copy of text_adapter recording a copy of its training file, which a test may then change."""
    import shutil

    from tests.conftest import ROOT

    adapter = shutil.copytree(text_adapter, tmp_path / "adapter", ignore=shutil.ignore_patterns("eval"))
    data = tmp_path / "data.jsonl"
    shutil.copyfile(ROOT / "examples" / "python_stdlib.jsonl", data)
    meta = json.loads((adapter / "lexlora.json").read_text())
    assert meta["dataset"]["sha256"] == file_sha256(data)  # recorded at training: same bytes
    meta["dataset"]["path"] = str(data)
    (adapter / "lexlora.json").write_text(json.dumps(meta))
    return adapter, data


def change_one_description(data):
    lines = data.read_text().splitlines(keepends=True)
    row = json.loads(lines[44])  # the first row of the test split
    row["description"] = "Something else entirely."
    lines[44] = json.dumps(row) + "\n"
    data.write_text("".join(lines))


QUICK = {"split": "test", "max_rows": 2, "with_base": False, "max_new_tokens": 2}


@pytest.fixture()
def no_model_loads(monkeypatch):
    from lexlora.serving.registry import LexLoRA

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LexLoRA, "for_adapter", classmethod(refuse))
    monkeypatch.setattr(LexLoRA, "from_pretrained", classmethod(refuse))


def test_the_unchanged_training_file_is_checked_and_recorded(own_data_adapter, tmp_path):
    adapter, data = own_data_adapter
    result, out = run_evaluation(adapter, out_dir=tmp_path / "r", **QUICK)
    check = json.loads((out / "eval.json").read_text())["data_check"]
    assert check == dataclasses.asdict(result.data_check) == {"status": "same", "sha256": file_sha256(data), "trained_path": str(data),
                     "trained_sha256": file_sha256(data)}
    assert "**Data**" not in (out / "report.md").read_text()


def test_a_changed_training_file_stops_eval_before_any_model_loads(own_data_adapter, no_model_loads, capsys):
    adapter, data = own_data_adapter
    trained = file_sha256(data)
    change_one_description(data)
    now = file_sha256(data)
    for given in (None, str(data)):  # the recorded file, by default or named with --data
        with pytest.raises(DataError) as info:
            run_evaluation(adapter, data_path=given, **QUICK)
        message = str(info.value)
        assert f"{data} has changed since {adapter} was trained on it" in message
        assert f"sha256 {now[:12]} now, {trained[:12]} recorded in {adapter}/lexlora.json" in message
        assert "--allow-data-change" in message
    assert main(["eval", "--adapter", str(adapter), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert f"lexlora: error: {data} has changed since {adapter} was trained on it" in err and "Traceback" not in err


def test_allow_data_change_scores_it_and_the_report_says_so(own_data_adapter, tmp_path, capsys):
    adapter, data = own_data_adapter
    trained = file_sha256(data)
    change_one_description(data)
    out = tmp_path / "r"
    assert main(["eval", "--adapter", str(adapter), "--split", "test", "--max-rows", "2", "--no-base",
                 "--max-new-tokens", "2", "--out", str(out), "--allow-data-change"]) == 0
    assert f"data: {data} changed since the adapter was trained on it" in capsys.readouterr().out
    figures = json.loads((out / "eval.json").read_text())
    assert figures["data_check"] == {"status": "changed", "sha256": file_sha256(data), "trained_path": str(data),
                                     "trained_sha256": trained}
    assert figures["rows"][0]["reference"] == "Something else entirely."  # the file as it is now
    report = (out / "report.md").read_text()
    assert (f"- **Data**: {data} changed since the adapter was trained on it (sha256 {file_sha256(data)[:12]} now, "
            f"{trained[:12]} then); scored anyway (--allow-data-change)") in report


def test_another_data_file_is_scored_and_the_report_says_it_is_not_the_training_data(own_data_adapter, tmp_path):
    adapter, data = own_data_adapter
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    change_one_description(other)
    result, out = run_evaluation(adapter, data_path=str(other), out_dir=tmp_path / "r", **QUICK)
    assert (result.data_check.status, result.data_check.sha256) == ("other", file_sha256(other))
    assert json.loads((out / "eval.json").read_text())["data_check"]["status"] == "other"
    assert (f"- **Data**: {other} is not the training data ({data}, sha256 {file_sha256(data)[:12]}; "
            f"this file: {file_sha256(other)[:12]})") in (out / "report.md").read_text()
    # A copy with the training file's bytes is the training data.
    same = tmp_path / "same.jsonl"
    same.write_text(data.read_text())
    assert eval_rows(adapter, "test", data_path=str(same)).data_check.status == "same"


def test_without_a_recorded_hash_nothing_is_checked(own_data_adapter, tmp_path):
    adapter, data = own_data_adapter
    meta = json.loads((adapter / "lexlora.json").read_text())
    meta["dataset"]["sha256"] = None  # an HF dataset dir at training, or an adapter from before the hash
    (adapter / "lexlora.json").write_text(json.dumps(meta))
    change_one_description(data)
    rows = eval_rows(adapter, "test")
    assert rows.data_check.status == "unchecked" and rows.references[0] == "Something else entirely."
