"""Many adapters on one frozen base: same outputs as each adapter loaded alone through PEFT, hot swap
round trips, mixed-adapter batches, refused loads that leave the registry as it was, and the three
dataset configs trained tiny and swapped."""

import json
import shutil

import pytest
import torch

from lexlora import LexLoRA
from lexlora.adapters.files import load_adapter, save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from lexlora.config import LoraSettings, load_config
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError, DataError
from lexlora.model.loading import load_base_model, load_tokenizer
from lexlora.model.lora_model import LexLoraModel, build_lora_config
from tests.conftest import (
    EMBEDDING_MODEL,
    ROOT,
    TINY_T5,
    requires_shared_data,
    tiny_model_config,
)

INPUTS = ["backup_config.json", "a_much_longer_file_name_for_padding.py", "notes.txt"]
RECORDS = [{"file": f, "directory": d} for f, d in [("run.sh", "scripts"), ("README.md", "docs"), ("x.log", "var")]]


def build_adapter(path, *, template, lexical_field, mode, r, seed, max_new_tokens=6, base_seed=0):
    config = tiny_model_config(seed=base_seed)
    base = load_base_model(config)
    spec = AdapterSpec(
        input_template=template, target_field="description", lexical_field=lexical_field,
        fusion_mode=mode, embedding_model=EMBEDDING_MODEL if mode else None, embedding_dim=384 if mode else None,
    )
    lora = build_lora_config(LoraSettings(r=r, alpha=2 * r, dropout=0.0), "t5", "google/flan-t5-small")
    model = LexLoraModel.create(base, load_tokenizer(config), lora, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as training would leave them, strong enough that adapters disagree
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    meta = {"base": fingerprint(base, config), "generation": {"max_new_tokens": max_new_tokens}}
    return save_adapter(model, path, meta)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "desc": build_adapter(root / "desc", template="Describe {filename}:", lexical_field="filename",
                              mode="add", r=4, seed=1),
        "ctx": build_adapter(root / "ctx", template="File {file} in {directory}:", lexical_field="file",
                             mode="prefix", r=6, seed=2, max_new_tokens=8),
        "plain": build_adapter(root / "plain", template="Type of {filename}?", lexical_field=None,
                               mode=None, r=4, seed=3),
    }


@pytest.fixture()
def registry(adapter_dirs):
    model = LexLoRA.from_config(tiny_model_config())
    for name, path in adapter_dirs.items():
        model.load_adapter(path, name=name)
    return model


def inputs_for(name):
    return RECORDS if name == "ctx" else INPUTS


def alone_through_peft(path, inputs, max_new_tokens):
    model = load_adapter(path)  # generate_text embeds fusion inputs itself: nothing else to set
    return model.generate_text(inputs, max_new_tokens=max_new_tokens)


def test_each_adapter_gives_what_it_gives_alone(registry, adapter_dirs):
    outputs = {}
    for name, path in adapter_dirs.items():
        max_new_tokens = registry.adapters[name].metadata.generation.max_new_tokens
        outputs[name] = registry.generate(inputs_for(name), adapter=name)
        assert outputs[name] == alone_through_peft(path, inputs_for(name), max_new_tokens)
    assert outputs["desc"] != outputs["plain"]  # the adapters really differ, so the checks mean something


def test_hot_swap_round_trip_is_exact(registry):
    registry.set_adapter("desc")
    first = registry.generate(INPUTS)
    first_logits = registry.forward(INPUTS, targets=["a", "b", "c"]).logits
    registry.set_adapter("plain")
    other = registry.generate(INPUTS)
    registry.set_adapter("desc")
    assert registry.active_adapter == "desc"
    assert registry.generate(INPUTS) == first
    assert torch.equal(registry.forward(INPUTS, targets=["a", "b", "c"]).logits, first_logits)
    assert other != first


def test_mixed_batch_equals_per_adapter_runs(registry):
    rows = [("desc", INPUTS[0]), ("ctx", RECORDS[0]), ("plain", INPUTS[1]), ("desc", INPUTS[2]),
            ("ctx", RECORDS[1]), ("plain", INPUTS[2])]
    names = [n for n, _ in rows]
    mixed = registry.generate([x for _, x in rows], adapter=names)
    for i, (name, item) in enumerate(rows):
        assert mixed[i] == registry.generate([item], adapter=name)[0], f"row {i} ({name})"

    # The logits too, not only the decoded text (max_new_tokens differ between adapters: 6 vs 8).
    targets = ["a config backup"] * len(rows)
    mixed_logits = registry.forward([x for _, x in rows], adapter=names, targets=targets).logits
    for i, (name, item) in enumerate(rows):
        alone = registry.forward([item], adapter=name, targets=targets[:1]).logits
        torch.testing.assert_close(mixed_logits[i], alone[0], rtol=1e-4, atol=1e-4)


def test_mixed_batch_with_beams(registry):
    names = ["desc", "plain", "desc"]
    mixed = registry.generate(INPUTS, adapter=names, num_beams=3, max_new_tokens=5)
    for i, name in enumerate(names):
        assert mixed[i] == registry.generate([INPUTS[i]], adapter=name, num_beams=3, max_new_tokens=5)[0]


def test_raw_records_are_formatted_by_each_adapter(registry):
    with pytest.raises(DataError, match=r"needs the fields \['file', 'directory'\]"):
        registry.generate(["run.sh"], adapter="ctx")
    with pytest.raises(DataError, match="input 1: field 'directory' is missing"):
        registry.generate([RECORDS[0], {"file": "x"}], adapter="ctx")
    with pytest.raises(DataError, match="2 inputs but 1 adapter names"):
        registry.generate(INPUTS[:2], adapter=["desc"])
    with pytest.raises(DataError, match="not a single one"):
        registry.generate("backup.json", adapter="desc")
    # A record with extra fields is fine: the adapter takes the fields it needs.
    assert registry.generate([{"filename": "a.py", "other": "x"}], adapter="desc") == registry.generate(["a.py"], adapter="desc")


def test_list_set_and_delete(registry, adapter_dirs):
    assert [a["name"] for a in registry.list_adapters()] == ["desc", "ctx", "plain"]
    info = registry.adapters["ctx"].describe()
    assert info["input_fields"] == ["file", "directory"] and info["fusion_mode"] == "prefix"
    assert registry.active_adapter == "desc"  # the first loaded
    registry.delete_adapter("desc")
    assert "desc" not in registry and registry.active_adapter == "ctx"
    with pytest.raises(AdapterError, match=r"no adapter named 'desc' is loaded \(loaded: ctx, plain\)"):
        registry.generate(INPUTS, adapter="desc")
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        registry.set_adapter("nope")
    registry.delete_adapter("ctx")
    registry.delete_adapter("plain")
    assert len(registry) == 0 and registry.active_adapter is None
    assert registry.router._hooks == {}
    with pytest.raises(AdapterError, match="no adapter is loaded"):
        registry.generate(INPUTS)
    registry.load_adapter(adapter_dirs["plain"])  # reloads under its dir name
    assert registry.generate(INPUTS) == registry.generate(INPUTS, adapter="plain")


def test_memory_is_the_saved_weights(registry, adapter_dirs):
    for name in adapter_dirs:
        loaded = registry.adapters[name]
        # Weights stay in the dtype they were saved in (float16, 2 bytes): memory is the file less its header.
        assert loaded.metadata.weights.dtype == "float16"
        assert loaded.memory_bytes == 2 * loaded.metadata.weights.parameters < loaded.file_bytes


def corrupt_copy(src, dst, how):
    shutil.copytree(src, dst)
    if how == "flip-byte":
        data = bytearray((dst / WEIGHTS_NAME).read_bytes())
        data[-10] ^= 0xFF
        (dst / WEIGHTS_NAME).write_bytes(bytes(data))
    elif how == "no-config":
        (dst / CONFIG_NAME).unlink()
    elif how == "no-weights":
        (dst / WEIGHTS_NAME).unlink()
    return dst


@pytest.mark.parametrize(
    "how, message",
    [("flip-byte", "checksum differs"), ("no-config", "adapter_config.json is missing"),
     ("no-weights", "adapter_model.safetensors is missing")],
)
def test_refused_loads_leave_the_registry_intact(registry, adapter_dirs, tmp_path, how, message):
    before = registry.generate(INPUTS, adapter=["desc", "plain", "desc"])
    listing = registry.list_adapters()
    bad = corrupt_copy(adapter_dirs["desc"], tmp_path / "bad", how)
    with pytest.raises(AdapterError, match=message):
        registry.load_adapter(bad)
    with pytest.raises(AdapterError, match=message):  # also when it would replace a loaded one
        registry.load_adapter(bad, name="desc", replace=True)
    assert registry.list_adapters() == listing
    assert registry.generate(INPUTS, adapter=["desc", "plain", "desc"]) == before


def test_refuses_other_base_bad_names_and_duplicates(registry, tmp_path):
    other = build_adapter(tmp_path / "other", template="Describe {filename}:", lexical_field="filename",
                          mode="add", r=4, seed=1, base_seed=7)
    listing = registry.list_adapters()
    with pytest.raises(AdapterError, match=r"different base \(weights differ: "):
        registry.load_adapter(other)
    for bad_name in ("../x", "a/b", ".hidden", "", "x" * 200, "a..b"):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            registry.load_adapter(other, name=bad_name)
    with pytest.raises(AdapterError, match="already loaded"):
        registry.load_adapter(tmp_path / "other", name="desc")
    assert registry.list_adapters() == listing
    assert len(registry.generate(INPUTS, adapter="desc")) == 3


def test_replace_swaps_weights_under_a_name(registry, adapter_dirs):
    plain_out = registry.generate(INPUTS, adapter="plain")
    registry.load_adapter(adapter_dirs["plain"], name="desc", replace=True)
    assert registry.generate(INPUTS, adapter="desc") == plain_out


@requires_shared_data()
def test_three_dataset_configs_train_tiny_and_hot_swap(tmp_path):
    """configs/{file_description,file_context_description,file_type}.yaml, each trained a few steps
    on a tiny base, then loaded together and swapped."""
    from lexlora.training.recipe import train

    overrides = [
        "model.random_init=true", "train.max_steps=3", "train.batch_size=4", "train.eval_batch_size=8", "train.log_every=1",
        "data.splits={train: '[:16]', validation: '[16:20]'}", "generation.max_new_tokens=4",
    ]
    names = {"file_description": "desc", "file_context_description": "ctx", "file_type": "type"}
    registry = LexLoRA.from_config(tiny_model_config())
    for config_name, name in names.items():
        config = load_config(
            ROOT / "configs" / f"{config_name}.yaml",
            [*overrides, f"data.path={ROOT.parent / 'shared/data/file-descriptions' / (config_name + '.jsonl')}",
             f"output_dir={tmp_path / name}"],
        )
        config.model.config_overrides = dict(TINY_T5)
        train(config)
        registry.load_adapter(tmp_path / name)
    assert registry.adapters["ctx"].spec.input_fields == ["file", "directory", "app"]

    desc_in = ["backup_config", "monitor_vscode"]
    ctx_in = [{"file": "run.sh", "directory": "scripts", "app": "Visual Studio Code"}] * 2
    type_in = ["backup_config.json", "monitor_vscode.sh"]
    alone = {
        "desc": registry.generate(desc_in, adapter="desc"),
        "ctx": registry.generate(ctx_in, adapter="ctx"),
        "type": registry.generate(type_in, adapter="type"),
    }
    registry.set_adapter("type")
    registry.set_adapter("desc")
    assert registry.generate(desc_in) == alone["desc"]
    mixed = registry.generate([desc_in[0], ctx_in[0], type_in[0]], adapter=["desc", "ctx", "type"])
    assert mixed == [alone["desc"][0], alone["ctx"][0], alone["type"][0]]


def test_disable_adapters_runs_the_base_on_the_adapters_prompts(registry):
    targets = ["a config backup"] * len(INPUTS)
    adapted = registry.forward(INPUTS, adapter="desc", targets=targets).logits
    with registry.disable_adapters():
        base_logits = registry.forward(INPUTS, adapter="desc", targets=targets).logits
        base_text = registry.generate(INPUTS, adapter="desc", max_new_tokens=5)
    prompts = registry.tokenizer([f"Describe {x}:" for x in INPUTS], return_tensors="pt", padding=True)
    labels = registry.tokenizer(text_target=targets, return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        expected = registry.base(**prompts, labels=labels).logits
        expected_ids = registry.base.generate(**prompts, max_new_tokens=5)
    torch.testing.assert_close(base_logits, expected, rtol=1e-6, atol=1e-6)
    assert base_text == [t.strip() for t in registry.tokenizer.batch_decode(expected_ids, skip_special_tokens=True)]
    assert not torch.allclose(adapted, base_logits)
    # Back on after the block.
    torch.testing.assert_close(registry.forward(INPUTS, adapter="desc", targets=targets).logits, adapted)


# ---- other bases: BART by path, a warm-started encoder-decoder trained through lexlora -----------------

from lexlora.config import ModelConfig  # noqa: E402
from tests.helpers import TINY_BERT, make_model_for, save_tiny_bart  # noqa: E402


def test_bart_adapters_on_one_base_match_peft(tmp_path):
    name = str(save_tiny_bart(tmp_path / "bart", "bart"))
    config = ModelConfig(name_or_path=name)
    dirs = {}
    for adapter, (mode, seed) in {"b1": ("add", 1), "b2": (None, 2)}.items():
        base = load_base_model(config)
        model = make_model_for(base, load_tokenizer(config), name, mode)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        dirs[adapter] = save_adapter(model, tmp_path / adapter, {"base": fingerprint(base, config),
                                                                 "generation": {"max_new_tokens": 5}})
    registry = LexLoRA.for_adapter(dirs["b1"])
    for adapter, path in dirs.items():
        registry.load_adapter(path)
        assert registry.generate(INPUTS, adapter=adapter) == alone_through_peft(path, INPUTS, 5)
    mixed = registry.generate(INPUTS, adapter=["b1", "b2", "b1"])
    assert mixed == [registry.generate([x], adapter=n)[0] for x, n in zip(INPUTS, ["b1", "b2", "b1"])]


def test_warm_start_trains_saves_hot_swaps_and_evaluates(tmp_path, stdlib_data):
    """configs/minilm_file_description.yaml on a tiny random warm start: lexlora.training saves the
    trained cross-attention with each adapter; the registry routes it per row, like PEFT alone."""
    from lexlora.evaluation.runner import run_evaluation
    from lexlora.training.recipe import train

    overrides = [
        "model.random_init=true", "train.max_steps=3", "train.batch_size=4", "train.eval_batch_size=8",
        "train.log_every=1", f"data.path={stdlib_data}", "data.target_field=description",
        "data.splits={train: '[:16]', validation: '[16:20]', test: '[20:24]'}", "generation.max_new_tokens=5",
        "lora.r=4",
    ]
    paths = {}
    for name, mode in (("ws-add", "add"), ("ws-prefix", "prefix")):
        config = load_config(ROOT / "configs" / "minilm_file_description.yaml",
                             [*overrides, f"fusion.mode={mode}", f"output_dir={tmp_path / name}"])
        config.model.config_overrides = dict(TINY_BERT)
        result = train(config)
        assert 0 < result.metrics["trainable_pct"] < 100
        paths[name] = result.output_dir
    saved = json.loads((paths["ws-add"] / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["crossattention", "predictions.transform"]
    assert saved["base_model_name_or_path"].startswith("encoder-decoder:")

    registry = LexLoRA.for_adapter(paths["ws-add"])
    for name, path in paths.items():
        registry.load_adapter(path)
        assert registry.adapters[name].lora.modules  # the cross-attention travels with the adapter
        assert registry.generate(INPUTS, adapter=name) == alone_through_peft(path, INPUTS, 5)
    names = ["ws-add", "ws-prefix", "ws-add"]
    targets = ["a"] * 3
    mixed = registry.forward(INPUTS, adapter=names, targets=targets).logits
    for i, name in enumerate(names):
        alone = registry.forward([INPUTS[i]], adapter=name, targets=targets[:1]).logits
        torch.testing.assert_close(mixed[i], alone[0], rtol=1e-4, atol=1e-4)

    result, out = run_evaluation(paths["ws-add"], split="test", out_dir=tmp_path / "eval")
    assert result.count == 4 and "rouge1" in result.adapter_scores and (out / "eval.json").is_file()


def test_a_pickle_adapter_loads_only_with_allow_pickle(registry, adapter_dirs, tmp_path):
    from safetensors.torch import load_file

    path = shutil.copytree(adapter_dirs["plain"], tmp_path / "old")
    torch.save(load_file(str(path / WEIGHTS_NAME)), path / "adapter_model.bin")
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=r"only a pickle adapter_model\.bin is present"):
        registry.load_adapter(path)
    assert "old" not in registry.adapters
    registry.load_adapter(path, allow_pickle=True)
    assert registry.generate(INPUTS, adapter="old") == registry.generate(INPUTS, adapter="plain")
