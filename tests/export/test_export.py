"""lexlora export: merged dirs that plain transformers loads, fusion through load_export, the
verification that refuses a wrong merge, the refusals, and the CLI."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

import lexlora.export.writer as writer
from lexlora.adapters.files import load_adapter, save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.adapters.format import META_NAME
from lexlora.cli import main
from lexlora.config import ModelConfig
from lexlora.errors import AdapterError
from lexlora.export import (
    EXPORT_META_NAME,
    FUSION_KEY_PREFIX,
    export_adapter,
    load_export,
)
from lexlora.model.loading import load_base_model, load_tokenizer
from tests.conftest import ROOT, tiny_model_config
from tests.helpers import make_model, make_model_for, perturb_, save_tiny_bert

INPUTS = ["backup_config.json", "a much longer file name for padding.py", "x"]


def saved_adapter(tmp_path, tiny_base, tokenizer, mode="add", name="adapter", **meta):
    model = make_model(tiny_base, tokenizer, mode).eval()
    perturb_(model)
    record = {"base": fingerprint(tiny_base, tiny_model_config()), "generation": {"max_new_tokens": 6}, **meta}
    return save_adapter(model, tmp_path / name, record, save_dtype="float32")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def greedy_ids(model, tokenizer, texts):
    enc = tokenizer([f"Describe {t}:" for t in texts], return_tensors="pt", padding=True)
    return model.generate(**enc, max_new_tokens=6, num_beams=1, do_sample=False)


def test_fusion_off_export_is_a_plain_transformers_model_equal_to_the_adapter(tmp_path, tiny_base, tokenizer):
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode=None)
    report = export_adapter(path, tmp_path / "out")
    out = report.path
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            EXPORT_META_NAME} <= {p.name for p in out.iterdir()}
    assert report.verification.differing_outputs == 0 and report.verification.max_abs_logit_diff <= 1e-4
    assert report.verification.source.startswith("lexlora's default inputs")  # no data recorded
    plain = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    assert not any("lora" in k for k in plain.state_dict())
    adapter = load_adapter(path)
    enc = tokenizer([f"Describe {t}:" for t in INPUTS], return_tensors="pt", padding=True)
    labels = tokenizer(text_target=["a config", "a python file", "x"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        expected = adapter.peft_model(**enc, labels=labels).logits
        got = plain(**enc, labels=labels).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert torch.equal(greedy_ids(plain, tokenizer, INPUTS), greedy_ids(adapter.peft_model, tokenizer, INPUTS))
    assert plain.generation_config.max_new_tokens == 6  # the adapter's recorded default
    assert load_export(out).generate_text(INPUTS) == adapter.generate_text(INPUTS)
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}["model.safetensors"] == 0o666 & ~umask


@pytest.fixture()
def transformers_log():
    """What transformers logs (its loggers do not propagate to the root, so caplog misses them)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)


@pytest.mark.parametrize("mode", ["add", "first", "prefix"])
def test_fusion_export_loads_with_load_export_and_plain_transformers_warns(tmp_path, tiny_base, tokenizer, mode,
                                                                          transformers_log):
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode=mode)
    out = export_adapter(path, tmp_path / "out").path
    meta = json.loads((out / EXPORT_META_NAME).read_text())
    assert meta["adapter"]["fusion_mode"] == mode and meta["adapter"]["lexical_field"] == "filename"
    assert meta["fusion_keys"] == [FUSION_KEY_PREFIX + "proj.bias", FUSION_KEY_PREFIX + "proj.weight"]
    exported = load_export(out)
    expected = load_adapter(path).generate_text(INPUTS)
    assert all(expected) and exported.generate_text(INPUTS) == expected  # non-empty: the check means something

    transformers_log.clear()
    AutoModelForSeq2SeqLM.from_pretrained(str(out))
    report = "\n".join(transformers_log)
    assert "UNEXPECTED" in report and FUSION_KEY_PREFIX + "proj.weight" in report
    assert "load_export" in report  # the key names say what to do
    card = (out / "README.md").read_text()
    assert "Plain transformers ignores it" in card and "load_export" in card


def test_a_warm_start_export_holds_the_trained_cross_attention(tmp_path):
    name = f"encoder-decoder:{save_tiny_bert(tmp_path / 'bert')}"
    config = ModelConfig(name_or_path=name)
    base, tokenizer = load_base_model(config), load_tokenizer(config)
    original = base.decoder.bert.encoder.layer[0].crossattention.self.query.weight.clone()
    model = make_model_for(base, tokenizer, name, None).eval()
    assert model.peft_model.peft_config["default"].modules_to_save  # the cross-attention is trained in full
    perturb_(model)
    trained = {k: v.clone() for k, v in model.trainable_state_dict().items()
               if k.endswith("decoder.bert.encoder.layer.0.crossattention.self.query.weight")}
    path = save_adapter(model, tmp_path / "ws", {"base": fingerprint(base, config), "generation": {"max_new_tokens": 5}},
                        save_dtype="float32")
    out = export_adapter(path, tmp_path / "out").path
    plain = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    exported = plain.decoder.bert.encoder.layer[0].crossattention.self.query.weight
    (trained_weight,) = trained.values()
    assert torch.equal(exported, trained_weight) and not torch.equal(exported, original)
    assert load_export(out).generate_text(INPUTS) == load_adapter(path).generate_text(INPUTS)


def test_validation_rows_from_the_recorded_data_are_checked(tmp_path, tiny_base, tokenizer):
    data = {"splits": {"train": "[:8]", "validation": "[8:13]"}}
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode=None, data=data,
                         dataset={"path": str(ROOT / "examples" / "python_stdlib.jsonl")})
    check = export_adapter(path, tmp_path / "out").verification
    assert check.rows == 5 and check.source.startswith("validation split of")
    check = export_adapter(path, tmp_path / "out2", inputs=["a.py", {"filename": "b.py"}]).verification
    assert check.rows == 2 and check.source == "2 given inputs"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_saved_after_a_float32_check(tmp_path, tiny_base, tokenizer, dtype):
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode="add")
    out = export_adapter(path, tmp_path / "out", dtype=dtype).path
    weights = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {getattr(torch, dtype)}
    meta = json.loads((out / EXPORT_META_NAME).read_text())
    assert meta["dtype"] == dtype and meta["verification"]["max_abs_logit_diff"] <= 1e-4
    assert f"Weights saved in **{dtype}**" in (out / "README.md").read_text()
    assert load_export(out).seq2seq.dtype == getattr(torch, dtype)


def test_a_merge_that_returns_the_base_is_refused_with_the_figures(tmp_path, tiny_base, tokenizer, monkeypatch):
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode="add")
    monkeypatch.setattr(writer, "merge_adapter", lambda model: model.peft_model.unload())  # LoRA dropped
    with pytest.raises(AdapterError, match=r"does not reproduce the adapter.*greedy outputs differ, max abs logit "
                                           r"difference [0-9.e+-]+ \(limit 0.0001"):
        export_adapter(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_existing_output_dir_is_refused_unless_overwrite(tmp_path, tiny_base, tokenizer):
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode=None)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match="already exists.*--overwrite"):
        export_adapter(path, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    export_adapter(path, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "keep.txt").exists()


def edit_metadata(path: Path, edit) -> None:
    meta = json.loads((path / META_NAME).read_text())
    edit(meta)
    (path / META_NAME).write_text(json.dumps(meta))


def test_quantized_bases_and_unloadable_bases_are_refused(tmp_path, tiny_base, tokenizer, monkeypatch):
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode=None)
    with monkeypatch.context() as patch:
        patch.setattr(writer, "is_quantized", lambda base: True)
        with pytest.raises(AdapterError, match="quantized.*as loaded"):
            export_adapter(path, tmp_path / "out")
    edit_metadata(path, lambda m: m.setdefault("metrics", {}).update(quantization="4bit"))
    with pytest.raises(AdapterError, match=r"its base is quantized \(4bit\)"):
        export_adapter(path, tmp_path / "out")
    edit_metadata(path, lambda m: (m["metrics"].update(quantization="none"),
                                   m["base"].update(model_id=str(tmp_path / "gone"), random_init=False)))
    with pytest.raises(AdapterError, match="gone.*cannot be loaded"):
        export_adapter(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_exports_and_refuses_with_exit_2(tmp_path, tiny_base, tokenizer, capsys):
    path = saved_adapter(tmp_path, tiny_base, tokenizer, mode=None)
    out = tmp_path / "out"
    assert main(["export", "--adapter", str(path), "--out", str(out), "--inputs", "a.py", '{"filename": "b.py"}']) == 0
    printed = capsys.readouterr().out
    assert "verified on 2 rows" in printed and "0 greedy outputs differ" in printed and "from_pretrained" in printed
    assert main(["export", "--adapter", str(path), "--out", str(out)]) == 2
    assert "lexlora: error: output dir" in capsys.readouterr().err
    assert main(["export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "adapter dir not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--adapter", str(path), "--out", str(tmp_path / "o3"), "--dtype", "int8"])


def test_every_exported_name_resolves():
    import lexlora.export as package

    assert package.__all__ and all(getattr(package, name) is not None for name in package.__all__)
