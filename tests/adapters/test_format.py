"""lexlora.json as AdapterMetadata: one reader and writer, defaults from the config, unknown keys kept."""

import json

import pytest

from lexlora.adapters.format import META_NAME, AdapterMetadata, read_metadata, targeted, write_metadata
from lexlora.config import DataConfig, GenerationSettings
from lexlora.errors import AdapterError

MINIMAL = {"format_version": 1, "base": {"model_id": "m"}, "adapter": {"input_template": "{x}", "target_field": "y"},
           "weights": {"sha256": "ab"}}


def write(tmp_path, meta):
    (tmp_path / META_NAME).write_text(json.dumps(meta))
    return tmp_path


def test_missing_sections_take_the_config_defaults(tmp_path):
    meta = read_metadata(write(tmp_path, MINIMAL))
    assert meta.max_source_length == DataConfig().max_source_length == 128
    assert meta.generation == GenerationSettings()
    assert meta.weights.file == "adapter_model.safetensors" and meta.weights.sha256 == "ab"
    assert meta.dataset.path is None and meta.dataset.splits == {}


def test_recorded_settings_are_read_typed(tmp_path):
    raw = {**MINIMAL, "data": {"max_source_length": 64}, "generation": {"max_new_tokens": 9, "num_beams": 3},
           "dataset": {"path": "d.jsonl", "sha256": "cd", "splits": {"train": 4}}}
    meta = read_metadata(write(tmp_path, raw))
    assert (meta.max_source_length, meta.generation.max_new_tokens, meta.generation.num_beams) == (64, 9, 3)
    assert (meta.dataset.path, meta.dataset.sha256, meta.dataset.splits) == ("d.jsonl", "cd", {"train": 4})


def test_unknown_keys_survive_a_rewrite(tmp_path):
    raw = {**MINIMAL, "from_a_newer_lexlora": {"x": [1, 2]}, "generation": {"max_new_tokens": 5, "extra_knob": 1}}
    meta = read_metadata(write(tmp_path, raw))
    out = tmp_path / "out"
    out.mkdir()
    write_metadata(out, meta)
    written = json.loads((out / META_NAME).read_text())
    assert written["from_a_newer_lexlora"] == {"x": [1, 2]}
    assert written["generation"]["max_new_tokens"] == 5 and written["generation"]["extra_knob"] == 1
    assert AdapterMetadata.from_dict(written).to_dict() == written  # a fixed point


@pytest.mark.parametrize("section, value, message", [
    ({"generation": {"num_beams": "two"}}, None, r"'generation'\.num_beams must be an integer, got 'two'"),
    ({"generation": {"max_new_tokens": 0}}, None, r"'generation'\.max_new_tokens must be at least 1, got 0"),
    ({"dataset": {"splits": [1]}}, None, r"'dataset'\.splits must be an object"),
    ({"format_version": 2}, None, r"adapter format version 2 is newer than this lexlora understands \(1\)"),
    ({"weights": None}, None, r"key 'weights' is missing or not an object"),
])
def test_bad_sections_are_named(tmp_path, section, value, message):
    with pytest.raises(AdapterError, match=rf"lexlora\.json: {message}"):
        read_metadata(write(tmp_path, {**MINIMAL, **section}))


def test_peft_target_rule():
    assert targeted("encoder.block.0.layer.0.SelfAttention.q", ["q", "v"])
    assert not targeted("encoder.block.0.layer.0.SelfAttention.qq", ["q"])
    assert targeted("a.attention.self.query", r".*\.attention\.self\.(query|key)")
    assert not targeted("a.crossattention.self.query", r".*\.attention\.self\.(query|key)")
