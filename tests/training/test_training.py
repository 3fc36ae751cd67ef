import json

import pytest
import torch
from torch.utils.data import DataLoader

from lexlora.adapters.files import load_adapter
from lexlora.data.tokenization import LexicalCollator
from lexlora.errors import ConfigError, DataError, ModelLoadError
from lexlora.training.recipe import train
from tests.conftest import FILE_DESCRIPTIONS, requires_shared_data, tiny_train_config
from tests.training.runs import read_log


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
    from lexlora.data.embeddings import LexicalEncoder
    from lexlora.data.splits import load_splits
    from lexlora.data.tokenization import encode_split

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
    import lexlora.training.recipe as training

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was validated")

    monkeypatch.setattr(training, "load_base_model", no_model)
    data = tmp_path / "d.jsonl"
    data.write_text('{"filename": "a", "description": "b"}\n{"filename": "a"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2: field 'description' is missing"):
        train(tiny_train_config(tmp_path, data))
    assert not (tmp_path / "adapter").exists()


def test_a_refused_long_target_stops_the_run_before_the_embedding_model_loads(tmp_path, monkeypatch):
    import lexlora.data.prepare as prepare
    import lexlora.training.recipe as training

    def no_embedding(*args, **kwargs):
        raise AssertionError("the embedding model was loaded before the targets were checked")

    monkeypatch.setattr(prepare, "LexicalEncoder", no_embedding)
    monkeypatch.setattr(training, "load_base_model", no_embedding)
    data = tmp_path / "l.jsonl"
    data.write_text('{"filename": "a", "description": "b"}\n' + '{"filename": "c", "description": "%s"}\n' % ("word " * 60))
    config = tiny_train_config(tmp_path, data)
    config.data.splits = {"train": "[:2]"}
    config.data.on_long_target = "refuse"
    with pytest.raises(DataError, match=r"l\.jsonl: 1 of 2 targets .*line 2"):
        train(config)
    assert not (tmp_path / "adapter").exists()


def test_fp16_is_refused_for_t5(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data)
    config.train.mixed_precision = "fp16"
    with pytest.raises(ConfigError, match="overflow"):
        train(config)


MINILM_WARM_START = "encoder-decoder:sentence-transformers/all-MiniLM-L6-v2"


def test_fp16_with_a_warm_start_is_judged_by_its_halves_not_a_crash_in_transformers(tmp_path, stdlib_data):
    from lexlora.config import ModelConfig
    from lexlora.model.families import refuse_fp16

    config = tiny_train_config(tmp_path, stdlib_data)
    config.train.mixed_precision = "fp16"
    config.model = ModelConfig(name_or_path="encoder-decoder:google/flan-t5-small", random_init=True)
    with pytest.raises(ConfigError, match="refused for t5: T5-family models overflow"):
        train(config)
    config.model = ModelConfig(name_or_path=f"encoder-decoder:{tmp_path / 'missing'}", random_init=True)
    with pytest.raises(ModelLoadError, match=r"could not load the config of 'encoder-decoder:.*missing'"):
        train(config)
    assert not (tmp_path / "adapter").exists()
    refuse_fp16(MINILM_WARM_START)  # BERT halves are fine in fp16: not refused


def test_existing_output_dir_is_refused(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(Exception, match="already exists"):
        train(config)


def test_cpu_threads_default_to_the_usable_cores():
    from lexlora.training.launch import set_cpu_threads

    import os

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1, 1) == 1 and torch.get_num_threads() == 1
        assert set_cpu_threads(None, 1) == cores == torch.get_num_threads()
        assert set_cpu_threads(None, 2) == max(1, cores // 2) == torch.get_num_threads()
        assert set_cpu_threads(None, 4 * cores) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=3, gradient_accumulation_steps=2)
    config.fusion.enabled = False
    result = train(config)
    assert result.metrics["steps"] == 3
    assert [r["step"] for r in read_log(result.output_dir / "metrics.jsonl") if "loss" in r] == [2, 3]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def generating_config(tmp_path, data, epochs=3, **train):
    """Whole epochs on 16 rows, generating for the first 4 validation rows after each."""
    config = tiny_train_config(tmp_path, data, max_steps=None, epochs=epochs, eval_max_rows=4, **train)
    config.data.splits = {"train": "[:16]", "validation": "[16:24]"}
    config.generation.max_new_tokens = 4
    return config


def test_best_epoch_by_a_generated_metric_is_kept_and_its_score_is_the_saved_adapters(tmp_path, stdlib_data):
    config = generating_config(tmp_path, stdlib_data, eval_metric="rouge1")
    result = train(config)
    out = result.output_dir
    epochs = [r for r in read_log(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert all({"rouge1", "rouge2", "rougeL", "rougeLsum"} <= r.keys() for r in epochs)
    # The kept epoch is the last one flagged best: highest rouge1, ties to the lowest val_loss
    # (a random tiny base often scores 0 every epoch, so the tie rule is what usually decides).
    kept = [r for r in epochs if r["best"]][-1]
    top = max(r["rouge1"] for r in epochs)
    assert kept["rouge1"] == top
    assert kept["val_loss"] == min(r["val_loss"] for r in epochs if r["rouge1"] == top)
    metrics = result.metrics
    assert (metrics["best_epoch"], metrics["best_rouge1"], metrics["best_val_loss"]) == (
        kept["epoch"], kept["rouge1"], kept["val_loss"])
    assert (metrics["eval_metric"], metrics["eval_task"], metrics["eval_rows"]) == ("rouge1", "text", 4)
    assert (out / "loss_curve.png").read_bytes()[:8] == PNG_SIGNATURE

    # final_* are the scores of the saved (float16-rounded) adapter: reloading it and generating
    # for the same rows gives exactly final_rouge1.
    from lexlora.data.splits import load_splits
    from lexlora.evaluation.metrics import score

    model = load_adapter(out)  # embeds its fusion inputs itself
    rows = [r.fields for r in load_splits(config.data, True)[0]["validation"][:4]]
    outputs = model.generate_text(rows, max_source_length=config.data.max_source_length, max_new_tokens=4)
    assert score("text", outputs, [r["description"] for r in rows])["rouge1"] == metrics["final_rouge1"]


def test_the_kept_epoch_follows_the_metric_not_the_loss(tmp_path, stdlib_data, monkeypatch):
    import lexlora.training.evaluator as validation

    # Scores made up so the first epoch is best by the metric, while training lowers the loss.
    made_up = iter([0.9, 0.1, 0.2, 0.5])

    def fake_score(task, predictions, references, bleu=False):
        value = 1.0 if len(references) == 1 else next(made_up)  # one pair: the names check
        return {"task": task, "count": len(references), "rouge1": value}

    monkeypatch.setattr(validation, "score", fake_score)
    config = generating_config(tmp_path, stdlib_data, eval_metric="rouge1")
    config.fusion.enabled = False
    result = train(config)
    epochs = [r for r in read_log(result.output_dir / "metrics.jsonl") if "val_loss" in r]
    assert [r["best"] for r in epochs] == [True, False, False]
    assert [r["rouge1"] for r in epochs] == [0.9, 0.1, 0.2]
    losses = [r["val_loss"] for r in epochs]
    assert losses[0] > min(losses)  # by loss another epoch would have been kept
    metrics = result.metrics
    assert (metrics["best_epoch"], metrics["best_rouge1"], metrics["final_rouge1"]) == (1, 0.9, 0.5)
    # The saved weights are epoch 1's (up to float16 rounding), not the last epoch's.
    assert metrics["final_val_loss"] == pytest.approx(losses[0], rel=1e-3)
    assert metrics["final_val_loss"] != pytest.approx(losses[-1], rel=1e-3)


def test_unknown_or_unproduced_eval_metric_fails_before_any_model_work(tmp_path, stdlib_data, monkeypatch):
    import lexlora.training.recipe as training

    monkeypatch.setattr(training, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    config = generating_config(tmp_path, stdlib_data, eval_metric="accuracy")
    with pytest.raises(ConfigError, match=r"accuracy is not a metric of the 'text' task.*rouge1, rouge2, rougeL, rougeLsum"):
        train(config)
    config.data.task = "labels"
    config.train.eval_metric = "rougeL"
    with pytest.raises(ConfigError, match=r"rougeL is not a metric of the 'labels' task \(data\.task\).*accuracy, macro_f1"):
        train(config)
    config.data.task = "auto"
    config.train.eval_metric = "bogus"
    with pytest.raises(ConfigError, match="bogus"):
        train(config)
    assert not (tmp_path / "adapter").exists()


def test_eval_metric_without_a_validation_split_is_refused(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data, eval_metric="rouge1")
    config.data.splits = {"train": "[:16]"}
    with pytest.raises(ConfigError, match="validation split"):
        train(config)


def test_tensorboard_tracker_logs_under_logging_dir(tmp_path, stdlib_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs" / "smoke"
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=2, report_to="tensorboard", logging_dir=str(runs))
    config.fusion.enabled = False
    result = train(config)
    events = EventAccumulator(str(runs))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/loss", "final/val_loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2]
    assert not any(p.name.startswith("events.") for p in result.output_dir.rglob("*"))


def test_a_missing_tracker_package_is_a_config_error(tmp_path, stdlib_data, monkeypatch):
    import lexlora.training.tracking as tracking

    monkeypatch.setitem(tracking.TRACKER_AVAILABLE, "wandb", lambda: False)
    config = tiny_train_config(tmp_path, stdlib_data, report_to="wandb")
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(config)
    assert not (tmp_path / "adapter").exists()


def test_a_failing_plot_does_not_lose_the_adapter(tmp_path, stdlib_data, monkeypatch, caplog):
    import lexlora.evaluation.plots

    def broken(*args, **kwargs):
        raise RuntimeError("no display for you")

    monkeypatch.setattr(lexlora.evaluation.plots, "loss_curve_png", broken)
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=1)
    config.fusion.enabled = False
    result = train(config)
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert not (result.output_dir / "loss_curve.png").exists()
    assert "no display for you" in caplog.text


def peak_rss_now():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def test_memory_report_and_switches_are_recorded(tmp_path, stdlib_data):
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=2, gradient_checkpointing=True)
    before = peak_rss_now()
    result = train(config)
    after = peak_rss_now()
    meta = json.loads((result.output_dir / "lexlora.json").read_text())
    memory = meta["metrics"]["memory"]
    # The process's high-water mark, read by the run between these two readings of the kernel's.
    assert memory["device"] == "cpu" and before <= memory["peak_rss_bytes"] <= after
    assert meta["metrics"]["gradient_checkpointing"] is True and meta["metrics"]["quantization"] == "none"
    assert any("memory" in r for r in read_log(result.output_dir / "metrics.jsonl"))


def test_a_run_without_memory_figures_is_published_with_its_memory_unknown(tmp_path, stdlib_data, monkeypatch, capsys):
    import sys

    import lexlora.training.memory as memory

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setitem(sys.modules, "resource", None)  # neither getrusage nor /proc: no RSS figure
    monkeypatch.setattr(memory, "resource", None, raising=False)
    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=1)
    config.fusion.enabled = False
    result = train(config)
    assert result.metrics["memory"] == {"device": "cpu", "peak_rss_bytes": None}
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert "peak memory on cpu: unknown" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_base_is_refused_early_without_cuda(tmp_path, stdlib_data, bits):
    config = tiny_train_config(tmp_path, stdlib_data, max_steps=2)
    config.model.quantization = bits
    with pytest.raises(ConfigError, match=f"model.quantization={bits} .* needs a CUDA GPU"):
        train(config)
    assert not (tmp_path / "adapter").exists()


def _indexed_split(n=96, seed=0):
    """A split of random input/label lengths whose items are their own indices."""
    from lexlora.data.tokenization import EncodedSplit

    class Indexed(EncodedSplit):
        def __getitem__(self, index):
            return index

    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(5, 60, (n,), generator=gen).tolist()
    tgt = torch.randint(2, 30, (n,), generator=gen).tolist()
    return Indexed([None] * n, [[1] * s for s in src], [[1] * t for t in tgt], None)


@pytest.mark.parametrize("grouped", [True, False])
def test_train_loader_visits_every_example_once_per_epoch_in_an_order_fixed_by_the_seed(tmp_path, grouped):
    from lexlora.training.loaders import train_data_loader

    config = tiny_train_config(tmp_path, tmp_path / "unused.jsonl")
    config.train.group_by_length, config.train.batch_size = grouped, 8
    split = _indexed_split()
    orders = []
    for seed in (3, 3, 4):
        loader = train_data_loader(split, config, list, torch.Generator().manual_seed(seed))
        orders.append([i for batch in loader for i in batch])
    assert sorted(orders[0]) == list(range(len(split.input_ids)))
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_length_grouped_batches_pad_fewer_tokens_than_random_ones(tmp_path):
    from lexlora.training.loaders import train_data_loader

    config = tiny_train_config(tmp_path, tmp_path / "unused.jsonl")
    config.train.batch_size = 8
    split = _indexed_split(n=400)
    lengths = split.token_lengths()

    def padded_tokens(grouped):
        config.train.group_by_length = grouped
        loader = train_data_loader(split, config, list, torch.Generator().manual_seed(0))
        return sum(max(lengths[i] for i in batch) * len(batch) for batch in loader)

    useful = sum(lengths)
    assert padded_tokens(True) < 0.8 * padded_tokens(False)
    assert padded_tokens(True) >= useful


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_is_fused_when_asked_and_steps_the_same_as_the_loop(fused):
    from lexlora.config import TrainConfig
    from lexlora.training.optimizer import make_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = make_optimizer(params, TrainConfig(fused_optimizer=fused, weight_decay=0.01))
    loop = torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.01, foreach=False)
    assert bool(optimizer.defaults["fused"]) is fused
    for _ in range(3):
        for group in (params, reference):
            for p in group:
                p.grad = torch.ones_like(p) * p.detach()
        optimizer.step()
        loop.step()
    for a, b in zip(params, reference):
        assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a, torch.zeros_like(a))
