"""lexlora.model.factory: the one place a fresh LoRA + fusion model is built, for a run and from parts."""

import pytest
import torch

from lexlora.config import LoraSettings
from lexlora.data.embeddings import LexicalEncoder
from lexlora.data.prepare import PreparedData
from lexlora.data.spec import AdapterSpec
from lexlora.data.tokenization import EncodedSplit
from lexlora.model.factory import build_model, model_for_run, run_spec
from tests.conftest import EMBEDDING_MODEL, tiny_train_config
from tests.helpers import batch, save_tiny_bart


def prepared(encoder, dim=384):
    """Prepared data as `prepare_data` returns it, without rows (the factory reads its shape only)."""
    vectors = torch.zeros(0, dim) if dim else None
    return PreparedData({"train": EncodedSplit([], [], [], vectors)}, "filename" if dim else None, encoder, {})


def run_config(tmp_path, **train):
    config = tiny_train_config(tmp_path, tmp_path / "unused.jsonl", **train)
    config.lora.r, config.lora.alpha = 2, 4
    config.generation.max_new_tokens, config.data.max_source_length = 5, 48
    return config


def test_a_runs_model_follows_its_config_and_prepared_data(tmp_path, tiny_base, tokenizer):
    encoder = LexicalEncoder(EMBEDDING_MODEL, cache_dir=tmp_path)
    config = run_config(tmp_path, gradient_checkpointing=True)
    model = model_for_run(config, tiny_base, tokenizer, prepared(encoder))
    assert model.spec == AdapterSpec(
        input_template="Describe the file {filename}:", target_field="description", lexical_field="filename",
        fusion_mode="add", embedding_model=EMBEDDING_MODEL, embedding_dim=384,
    )
    lora = model.peft_model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (2, 4, {"q", "k", "v", "o"})
    assert lora.base_model_name_or_path == "google/flan-t5-small"
    assert model.lexical_encoder is encoder  # the run's own (its cache, its device)
    assert model.gradient_checkpointing
    assert (model.generation.max_new_tokens, model.max_source_length) == (5, 48)


def test_without_fusion_the_spec_has_no_embedding_model_and_the_model_no_projection(tmp_path, tiny_base, tokenizer):
    config = run_config(tmp_path)
    config.fusion.enabled = False
    spec = run_spec(config, prepared(None, dim=None))
    assert (spec.fusion_mode, spec.embedding_model, spec.lexical_field, spec.embedding_dim) == (None, None, None, None)
    model = model_for_run(config, tiny_base, tokenizer, prepared(None, dim=None))
    assert model.lexical_fusion is None and not model.gradient_checkpointing


def test_build_model_is_a_fresh_adapter_that_computes_what_the_base_computes(tiny_base, tokenizer):
    ids, mask, lexical, labels = batch(tokenizer)
    with torch.no_grad():
        expected = tiny_base(input_ids=ids, attention_mask=mask, labels=labels).logits
    spec = AdapterSpec("Describe {filename}:", "description", "filename", "add", EMBEDDING_MODEL, 384)
    model = build_model(tiny_base, tokenizer, spec, LoraSettings(r=4), base_id="google/flan-t5-small").eval()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, labels=labels, lexical_embeds=lexical).logits, expected)


def test_build_model_targets_the_bases_own_family(tmp_path, tokenizer):
    from lexlora.config import ModelConfig
    from lexlora.model.loading import load_base_model

    path = str(save_tiny_bart(tmp_path / "bart"))
    base = load_base_model(ModelConfig(name_or_path=path))
    spec = AdapterSpec("Describe {filename}:", "description", None, None, None, None)
    model = build_model(base, tokenizer, spec, LoraSettings(r=2), base_id=path)
    lora = model.peft_model.peft_config["default"]
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert any(".q_proj.lora_A." in name for name, _ in model.named_parameters())


def test_a_base_without_checkpointing_support_is_refused_by_the_factory(tiny_base, tokenizer, monkeypatch):
    from lexlora.errors import ConfigError

    monkeypatch.setattr(type(tiny_base), "supports_gradient_checkpointing", False)
    spec = AdapterSpec("Describe {filename}:", "description", None, None, None, None)
    with pytest.raises(ConfigError, match="train.gradient_checkpointing=true: .* does not support"):
        build_model(tiny_base, tokenizer, spec, LoraSettings(r=2), base_id="google/flan-t5-small", gradient_checkpointing=True)
