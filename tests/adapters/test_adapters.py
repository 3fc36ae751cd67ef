import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lexlora.adapters.files import check_output_dir, load_adapter, save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.adapters.format import CONFIG_NAME, FORMAT_VERSION, META_NAME, WEIGHTS_NAME
from lexlora.errors import AdapterError
from lexlora.model.loading import load_base_model, load_tokenizer
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
    import lexlora.adapters.files as adapters

    model, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    before = (path / WEIGHTS_NAME).read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters, "save_file", disk_full)
    with pytest.raises(AdapterError, match=r"cannot write the adapter files into .*\.new\.tmp-.* \(No space left on "
                                           r"device\); nothing was published"):
        save_adapter(model, tmp_path / "new", {"base": {}})
    with pytest.raises(AdapterError, match="No space left on device"):
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


def test_a_failed_rename_puts_the_old_adapter_back(tmp_path, tiny_base, tokenizer, monkeypatch):
    import lexlora.adapters.files as adapters

    model, path = saved_adapter(tmp_path, tiny_base, tokenizer)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> backup worked; new -> final fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(adapters.os, "replace", second_rename_fails)
    with pytest.raises(AdapterError, match=r"cannot move the new adapter into .*adapter \(No space left on device\); "
                                           r"what was at .* is unchanged"):
        save_adapter(model, path, {"base": fingerprint(tiny_base, tiny_model_config())}, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or backup left


def test_unwritable_or_impossible_output_dirs_are_refused_before_any_work(tmp_path, tiny_base, tokenizer, monkeypatch):
    import lexlora.adapters.files as adapters

    model = make_model(tiny_base, tokenizer)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match=r"output dir .*file/sub/adapter: .*file is not a directory"):
        check_output_dir(tmp_path / "file" / "sub" / "adapter", overwrite=False)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(adapters.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(AdapterError, match=r"output dir .*locked/new/adapter: .*locked is not writable \(Permission denied\)"):
        save_adapter(model, locked / "new" / "adapter", {"base": {}})
    assert list(locked.iterdir()) == []
    with pytest.raises(AdapterError, match="already exists and holds something"):
        check_output_dir(tmp_path / "file", overwrite=False)


def break_dir(path, how):
    """Damage a saved adapter dir in one way."""
    if how.startswith("rm:"):
        (path / how[3:]).unlink()
    elif how == "truncated-unverified":  # no checksum recorded (e.g. written by other code)
        meta = json.loads((path / META_NAME).read_text())
        del meta["weights"]["sha256"]
        (path / META_NAME).write_text(json.dumps(meta))
        data = (path / WEIGHTS_NAME).read_bytes()
        (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 3])
    elif how == "garbage-unverified":
        meta = json.loads((path / META_NAME).read_text())
        meta["weights"]["sha256"] = None
        (path / META_NAME).write_text(json.dumps(meta))
        (path / WEIGHTS_NAME).write_bytes(b"\xff" * 64)
    elif how.startswith("meta:"):
        (path / META_NAME).write_text(how[5:])
    elif how.startswith("meta-"):
        meta = json.loads((path / META_NAME).read_text())
        change = how.split("-", 1)[1]
        if change == "no-base":
            del meta["base"]
        elif change == "no-version":
            del meta["format_version"]
        elif change == "newer":
            meta["format_version"] = FORMAT_VERSION + 1
        elif change == "bad-spec":
            meta["adapter"]["fusion_mode"] = "sideways"
        elif change == "no-template":
            meta["adapter"]["input_template"] = 7
        elif change == "unknown-spec-key":
            meta["adapter"]["colour"] = "blue"
        (path / META_NAME).write_text(json.dumps(meta))
    elif how.startswith("config-"):
        config = json.loads((path / CONFIG_NAME).read_text())
        change = how.split("-", 1)[1]
        if change == "rank":
            config["r"] = 8
        elif change == "fewer-targets":
            config["target_modules"] = ["q", "v"]
        elif change == "more-targets":
            config["target_modules"] = sorted(config["target_modules"]) + ["wi"]
        elif change == "not-json":
            (path / CONFIG_NAME).write_text("r: 4")
            return
        (path / CONFIG_NAME).write_text(json.dumps(config))


BROKEN_DIRS = [
    ("rm:" + META_NAME, r"lexlora\.json is missing; not a lexlora adapter dir \(adapter_config\.json is here: a plain PEFT adapter\?"),
    ("rm:" + CONFIG_NAME, r"adapter_config\.json is missing"),
    ("rm:" + WEIGHTS_NAME, r"adapter_model\.safetensors is missing"),
    ("truncated-unverified", r"adapter_model\.safetensors: not a readable safetensors file"),
    ("garbage-unverified", r"adapter_model\.safetensors: not a readable safetensors file"),
    ("meta:[1, 2]", r"lexlora\.json: expected a JSON object, got list"),
    ("meta:" + "[" * 5000, r"lexlora\.json: not valid JSON \(RecursionError\)"),
    ("meta-no-base", r"lexlora\.json: key 'base' is missing or not an object"),
    ("meta-no-version", r"lexlora\.json: format_version is missing or not an integer \(got None\)"),
    ("meta-newer", rf"adapter format version {FORMAT_VERSION + 1} is newer than this lexlora understands "
                   rf"\({FORMAT_VERSION}\); upgrade lexlora"),
    ("meta-bad-spec", r"'adapter' in lexlora\.json: fusion_mode must be one of add, first, prefix or null, got 'sideways'"),
    ("meta-no-template", r"'adapter' in lexlora\.json: input_template must be a non-empty string, got 7"),
    ("meta-unknown-spec-key", r"'adapter' in lexlora\.json is not valid \(.*colour"),
    ("config-rank", r"lora_A\.weight has shape \(4, 64\), i\.e\. rank 4, but r is 8; the config and the weights are from "
                    r"different adapters"),
    ("config-fewer-targets", r"the weights hold LoRA for .*SelfAttention\.k, which target_modules \['q', 'v'\] does not select"),
    ("config-more-targets", r"target_modules lists 'wi' but the weights hold no LoRA for them"),
    ("config-not-json", r"adapter_config\.json: not a valid PEFT LoRA config"),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer):
    base = load_base_model(tiny_model_config())
    model, path = saved_adapter(tmp_path_factory.mktemp("pristine"), base, tokenizer)
    return path


@pytest.mark.parametrize("how, message", BROKEN_DIRS, ids=[h for h, _ in BROKEN_DIRS])
def test_broken_adapter_dirs_are_refused_naming_file_and_fault(pristine, tmp_path, tiny_base, how, message):
    from lexlora import LexLoRA

    path = shutil.copytree(pristine, tmp_path / "adapter")
    break_dir(path, how)
    with pytest.raises(AdapterError, match=message):
        load_adapter(path, base=tiny_base)  # through PEFT
    registry = LexLoRA(tiny_base, load_tokenizer(tiny_model_config()), tiny_model_config())
    with pytest.raises(AdapterError, match=message):
        registry.load_adapter(path)  # the hot-swap registry: same check, same message
    assert len(registry) == 0


def test_pickle_adapter_is_refused_unless_the_user_opts_in(pristine, tmp_path, tiny_base, tokenizer):
    path = shutil.copytree(pristine, tmp_path / "adapter")
    reference = outputs(load_adapter(path, base=tiny_base), tokenizer)
    torch.save(load_file(str(path / WEIGHTS_NAME)), path / "adapter_model.bin")
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=r"only a pickle adapter_model\.bin is present; lexlora loads safetensors "
                                           r"only .* opt in with allow_pickle=True \(lexlora generate --allow-pickle\)"):
        load_adapter(path, base=tiny_base)
    loaded = load_adapter(path, base=load_base_model(tiny_model_config()), allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(outputs(loaded, tokenizer), reference))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_opting_in_to_pickle_still_never_runs_code(pristine, tmp_path, tiny_base):
    path = shutil.copytree(pristine, tmp_path / "adapter")
    (path / WEIGHTS_NAME).unlink()
    with open(path / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _Exploit()}, handle)
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: not a readable torch weights file \(UnpicklingError"):
        load_adapter(path, base=tiny_base, allow_pickle=True)
    (path / "adapter_model.bin").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: not a readable torch weights file"):
        load_adapter(path, base=tiny_base, allow_pickle=True)


def test_weights_that_overflow_the_save_dtype_are_refused_before_anything_is_written(tmp_path, tiny_base, tokenizer):
    model = make_model(tiny_base, tokenizer)
    with torch.no_grad():
        model.lexical_fusion.proj.weight[0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(AdapterError, match=r"weight lexical_fusion\.proj\.weight is not finite in float16; nothing "
                                           r"was saved \(save_dtype=float32 keeps a wider range\)"):
        save_adapter(model, tmp_path / "adapter", {"base": {}}, save_dtype="float16")
    assert list(tmp_path.iterdir()) == []
    save_adapter(model, tmp_path / "adapter", {"base": fingerprint(tiny_base, tiny_model_config())}, save_dtype="float32")
