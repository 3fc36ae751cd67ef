import json

import pytest
import torch
from safetensors.torch import load_file

from lexlora.adapters import CONFIG_NAME, META_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from lexlora.base import fingerprint, load_base_model
from lexlora.errors import AdapterError
from tests.conftest import tiny_model_config
from tests.helpers import batch, make_model, perturb_


def saved_adapter(tmp_path, tiny_base, tokenizer, save_dtype="float32", mode="add"):
    model = make_model(tiny_base, tokenizer, mode).eval()
    perturb_(model)
    meta = {"base": fingerprint(tiny_base, tiny_model_config())}
    path = save_adapter(model, tmp_path / "adapter", meta, save_dtype=save_dtype)
    return model, path


def outputs(model, tokenizer):
    ids, mask, lexical, labels = batch(tokenizer)
    with torch.no_grad():
        logits = model(ids, mask, labels=labels, lexical_embeds=lexical).logits
    gen = model.generate(ids, mask, lexical, max_new_tokens=6, num_beams=2)
    return logits, gen


@pytest.mark.parametrize("mode", ["add", "prefix"])
def test_save_then_load_restores_identical_logits_and_generations(tmp_path, tiny_base, tokenizer, mode):
    model, path = saved_adapter(tmp_path, tiny_base, tokenizer, mode=mode)
    logits, gen = outputs(model, tokenizer)
    loaded = load_adapter(path)  # onto a fresh base built from the adapter's metadata
    loaded_logits, loaded_gen = outputs(loaded, tokenizer)
    assert torch.equal(loaded_logits, logits)
    assert torch.equal(loaded_gen, gen)
    assert loaded.spec == model.spec


def test_half_precision_save_is_exact_after_rounding(tmp_path, tiny_base, tokenizer):
    model = make_model(tiny_base, tokenizer).eval()
    perturb_(model)
    model.round_trainables_(torch.float16)  # what training does before saving in float16
    meta = {"base": fingerprint(tiny_base, tiny_model_config())}
    path = save_adapter(model, tmp_path / "a16", meta, save_dtype="float16")
    assert all(v.dtype == torch.float16 for v in load_file(str(path / WEIGHTS_NAME)).values())
    assert torch.equal(outputs(load_adapter(path), tokenizer)[0], outputs(model, tokenizer)[0])


def test_saved_files_hold_only_adapter_weights(tmp_path, tiny_base, tokenizer):
    model, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    tensors = load_file(str(path / WEIGHTS_NAME))
    base_keys = {k for k, _ in tiny_base.named_parameters()}
    assert not any(k.replace("base_model.model.", "") in base_keys for k in tensors)
    assert all("lora_" in k or "fusion" in k for k in tensors)
    assert {"lexical_fusion.proj.weight", "lexical_fusion.proj.bias"} <= set(tensors)
    config = json.loads((path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    meta = json.loads((path / META_NAME).read_text())
    assert meta["adapter"]["fusion_mode"] == "add" and meta["weights"]["bytes"] == (path / WEIGHTS_NAME).stat().st_size
    assert sorted(p.name for p in path.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME, META_NAME]


def test_plain_peft_loads_the_lora_part(tmp_path, tiny_base, tokenizer):
    from peft import PeftModel

    model, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    plain = PeftModel.from_pretrained(load_base_model(tiny_model_config()), str(path))
    ours = dict(model.peft_model.named_parameters())
    for name, param in plain.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, ours[name])


@pytest.mark.parametrize(
    "other, fragment",
    [(tiny_model_config(seed=1), "weights differ"), (tiny_model_config(d_ff=96), "architecture")],
)
def test_fingerprint_mismatch_is_refused(tmp_path, tiny_base, tokenizer, other, fragment):
    _, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    with pytest.raises(AdapterError, match=f"trained on a different base \\({fragment}"):
        load_adapter(path, base=load_base_model(other), base_config=other)


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_base, tokenizer):
    model, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(model, path, {"base": {}})
    save_adapter(model, path, {"base": fingerprint(tiny_base, tiny_model_config())}, overwrite=True)
    assert (path / WEIGHTS_NAME).is_file()


def test_failed_save_leaves_no_half_adapter_and_keeps_the_old_one(tmp_path, tiny_base, tokenizer, monkeypatch):
    import lexlora.adapters as adapters

    model, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    before = (path / WEIGHTS_NAME).read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters, "save_file", disk_full)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "new", {"base": {}})
    with pytest.raises(OSError):
        save_adapter(model, path, {"base": {}}, overwrite=True)
    assert not (tmp_path / "new").exists()
    assert (path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_incomplete_or_corrupted_dirs_are_refused(tmp_path, tiny_base, tokenizer):
    _, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    weights = path / WEIGHTS_NAME
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterError, match="checksum differs"):
        load_adapter(path, base=tiny_base)
    weights.unlink()
    (path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="safetensors only"):
        load_adapter(path, base=tiny_base)
    (path / META_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(path, base=tiny_base)
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tmp_path / "nowhere")
