import json

import pytest
import torch
from torch.utils.data import DataLoader

from lexlora.adapters import load_adapter
from lexlora.data import LexicalCollator
from lexlora.errors import ConfigError, DataError
from lexlora.training import train
from tests.conftest import FILE_DESCRIPTIONS, requires_shared_data, tiny_train_config


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@requires_shared_data()
def test_a_few_dozen_steps_on_file_descriptions_lower_the_loss(tmp_path):
    config = tiny_train_config(tmp_path, FILE_DESCRIPTIONS / "file_description.jsonl", max_steps=40, log_every=5)
    config.data.input_template = "Filename: {filename} Description:"
    config.data.target_field = "file_desc"
    config.data.splits = {"train": "[:200]", "validation": "[200:240]"}
    result = train(config)
    losses = [r["loss"] for r in read_log(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.metrics["final_val_loss"] < result.metrics["train_loss"] * 2


def test_trained_adapter_reloads_with_exactly_its_recorded_validation_loss(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=6)
    config.train.epochs = 1
    result = train(config)
    out = result.output_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "lexlora.json", "config.yaml",
            "metrics.jsonl", "README.md"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "lexlora.json").read_text())
    assert meta["dataset"]["splits"] == {"train": 64, "validation": 16}
    assert meta["weights"]["dtype"] == "float16" and len(meta["samples"]) == 3

    model = load_adapter(out)
    from lexlora.embeddings import LexicalEncoder
    from lexlora.data import encode_split, load_splits

    splits, template, lexical = load_splits(config.data, True)
    vectors = LexicalEncoder(config.fusion.embedding_model).encode([r.fields[lexical] for r in splits["validation"]])
    val = encode_split(splits["validation"], template, "description", model.tokenizer, config.data, vectors)
    total = tokens = 0.0
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=config.train.eval_batch_size, collate_fn=LexicalCollator(model.tokenizer)):
            n = (batch["labels"] != -100).sum().item()
            total += model(**batch).loss.item() * n
            tokens += n
    assert total / tokens == pytest.approx(result.metrics["final_val_loss"], rel=1e-5)


def test_best_epoch_is_kept_and_logged(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data)
    config.train.max_steps = None
    config.train.epochs = 2
    config.data.splits = {"train": "[:16]", "validation": "[16:24]"}
    result = train(config)
    evals = [r for r in read_log(result.output_dir / "metrics.jsonl") if "val_loss" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert result.metrics["best_val_loss"] == min(r["val_loss"] for r in evals)


def test_bad_data_fails_before_any_model_work(tmp_path, monkeypatch):
    import lexlora.training as training

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was validated")

    monkeypatch.setattr(training, "load_base_model", no_model)
    data = tmp_path / "d.jsonl"
    data.write_text('{"filename": "a", "description": "b"}\n{"filename": "a"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: field 'description' is missing"):
        train(tiny_train_config(tmp_path, data))
    assert not (tmp_path / "adapter").exists()


def test_fp16_is_refused_for_t5(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data)
    config.train.mixed_precision = "fp16"
    with pytest.raises(ConfigError, match="overflow"):
        train(config)


def test_existing_output_dir_is_refused(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(Exception, match="already exists"):
        train(config)


def test_cpu_threads_default_to_the_usable_cores():
    from lexlora.training import set_cpu_threads

    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1, 1) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads(None, 1) >= 1
    finally:
        torch.set_num_threads(before)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=3, gradient_accumulation_steps=2)
    config.fusion.enabled = False
    result = train(config)
    assert result.metrics["steps"] == 3
    assert [r["step"] for r in read_log(result.output_dir / "metrics.jsonl") if "loss" in r] == [2, 3]
