"""Classifier-head adapters on tiny BERT, BART and T5 encoders: a fresh one computes what the base
encoder computes, saving and reloading keeps its logits and probabilities, and bad metadata or the
wrong kind of base is refused with a clear message."""

import json

import pytest
import torch

from lexlora.adapters.files import load_adapter, save_adapter
from lexlora.adapters.fingerprint import fingerprint
from lexlora.adapters.format import META_NAME
from lexlora.config import ClassifierConfig, LoraSettings, ModelConfig
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError, ConfigError
from lexlora.model.classifier import HEAD_PREFIX, LexClassifierModel, pool
from lexlora.model.factory import build_classifier
from lexlora.model.loading import load_base_model, load_tokenizer
from tests.conftest import TINY_T5
from tests.helpers import MINILM, perturb_, save_tiny_bart, save_tiny_bert

LABELS = ("Markdown", "Python script", "Shell script")
INPUTS = ["backup_config.sh", "a much longer file name for padding.py", "README.md"]


@pytest.fixture(scope="module")
def family_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier-bases")
    return {
        "t5": ModelConfig(name_or_path="google/flan-t5-small", random_init=True, config_overrides=dict(TINY_T5),
                          task="classification"),
        "bart": ModelConfig(name_or_path=str(save_tiny_bart(root / "bart")), task="classification"),
        "bert": ModelConfig(name_or_path=str(save_tiny_bert(root / "bert")), task="classification"),
    }


def spec(mode="add"):
    return AdapterSpec(input_template="{filename}", target_field="type", lexical_field="filename",
                       fusion_mode=mode, embedding_model=MINILM if mode else None, embedding_dim=384 if mode else None)


def make_classifier(config, mode="add", seed=0, pooling="mean", labels=LABELS) -> LexClassifierModel:
    base = load_base_model(config)
    torch.manual_seed(seed)
    return build_classifier(base, load_tokenizer(config), spec(mode), LoraSettings(r=4, alpha=8), labels,
                            base_id=config.name_or_path, classifier=ClassifierConfig(pooling=pooling))


def tokens(model, texts=INPUTS):
    enc = model.tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("kind", ["t5", "bart", "bert"])
def test_fresh_classifier_encodes_as_the_base_does(family_configs, kind):
    config = family_configs[kind]
    model = make_classifier(config)
    base = load_base_model(config)
    ids, mask = tokens(model)
    with torch.no_grad():
        embeds, fused_mask = model.encoder_inputs(ids, mask, torch.randn(len(INPUTS), 384))
        ours = model.encode(embeds, fused_mask)
        theirs = base(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    assert model.base_model.config.model_type == {"t5": "t5", "bart": "bart", "bert": "bert"}[kind]
    assert not hasattr(model.base_model, "decoder")  # the encoder alone


@pytest.mark.parametrize("kind", ["t5", "bart", "bert"])
def test_head_adapter_saves_and_reloads_with_identical_logits(family_configs, kind, tmp_path):
    config = family_configs[kind]
    model = make_classifier(config)
    perturb_(model)
    model.eval()
    path = save_adapter(model, tmp_path / kind, {"base": fingerprint(model.base_model, config)}, save_dtype="float32")
    meta = json.loads((path / META_NAME).read_text())
    assert meta["classifier"] == {"labels": list(LABELS), "pooling": "mean"}
    assert meta["base"]["task"] == "classification"
    assert json.loads((path / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    reloaded = load_adapter(path)
    assert isinstance(reloaded, LexClassifierModel) and reloaded.labels == LABELS
    ids, mask = tokens(model)
    lexical = torch.randn(len(INPUTS), 384, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask, lexical_embeds=lexical).logits,
                                   model(ids, mask, lexical_embeds=lexical).logits, rtol=0, atol=0)
    before, after = model.classify_text(INPUTS), reloaded.classify_text(INPUTS)
    assert [p.scores for p in after] == [p.scores for p in before]
    for prediction in after:
        assert set(prediction.scores) == set(LABELS)
        assert prediction.label == max(prediction.scores, key=prediction.scores.get)
        assert sum(prediction.scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert reloaded.generate_text(INPUTS) == [p.label for p in after]


def test_the_head_is_trained_in_full_and_saved(family_configs):
    model = make_classifier(family_configs["bert"], mode=None)
    state = model.trainable_state_dict()
    head = {k for k in state if k.startswith(HEAD_PREFIX)}
    assert head == {HEAD_PREFIX + "out_proj.weight", HEAD_PREFIX + "out_proj.bias"}
    assert state[HEAD_PREFIX + "out_proj.weight"].shape == (len(LABELS), 32)
    assert all(p.requires_grad for p in model.classification_head.parameters())
    # LoRA on every self-attention projection of a BERT-like encoder (PEFT's default is query, value)
    lora_modules = {k.split(".lora_")[0].rsplit(".", 2)[-2:][0] for k in state if ".lora_" in k}
    assert {"self", "output"} <= lora_modules
    assert any(".attention.self.key." in k for k in state) and any(".attention.output.dense." in k for k in state)


def test_training_step_moves_lora_and_head(family_configs):
    model = make_classifier(family_configs["t5"])
    model.train()
    ids, mask = tokens(model)
    out = model(ids, mask, labels=torch.tensor([2, 1, 0]), lexical_embeds=torch.randn(3, 384))
    assert out.loss.ndim == 0 and out.logits.shape == (3, len(LABELS))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())  # LoRA A, fusion, head
    assert model.lexical_fusion.proj.weight.grad.abs().sum() > 0
    assert model.classification_head.out_proj.weight.grad.abs().sum() > 0


def test_class_weights_change_the_loss(family_configs):
    model = make_classifier(family_configs["bert"], mode=None)
    perturb_(model)
    model.eval()
    ids, mask = tokens(model)
    labels = torch.tensor([2, 1, 0])
    plain = model(ids, mask, labels=labels).loss
    model.class_weights = torch.tensor([1.0, 1.0, 5.0])
    weighted = model(ids, mask, labels=labels).loss
    logits = model(ids, mask).logits
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([1.0, 1.0, 5.0]))
    torch.testing.assert_close(weighted, expected)
    assert not torch.isclose(plain, weighted)


def test_pooling():
    states = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(states, mask, "first"), states[:, 0])
    torch.testing.assert_close(pool(states, mask, "mean")[0], states[0, :2].mean(0))
    torch.testing.assert_close(pool(states, mask, "mean")[1], states[1].mean(0))


def test_classifier_refuses_generation_and_a_warm_start(family_configs):
    model = make_classifier(family_configs["bert"], mode=None)
    with pytest.raises(AdapterError, match="predicts labels"):
        model.generate(*tokens(model))
    with pytest.raises(ConfigError, match="one encoder"):
        load_base_model(ModelConfig(name_or_path=f"encoder-decoder:{MINILM}", task="classification"))


def test_bad_classifier_section_is_named(family_configs, tmp_path):
    config = family_configs["bert"]
    model = make_classifier(config, mode=None)
    path = save_adapter(model, tmp_path / "c", {"base": fingerprint(model.base_model, config)}, save_dtype="float32")
    meta = json.loads((path / META_NAME).read_text())
    meta["classifier"]["labels"] = ["only one"]
    (path / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=r"'classifier'.labels must list at least two"):
        load_adapter(path)


def test_a_classifier_does_not_load_onto_a_seq2seq_base(family_configs, tmp_path):
    config = family_configs["t5"]
    model = make_classifier(config, mode=None)
    path = save_adapter(model, tmp_path / "c", {"base": fingerprint(model.base_model, config)}, save_dtype="float32")
    seq2seq = ModelConfig(name_or_path=config.name_or_path, random_init=True, config_overrides=dict(TINY_T5))
    with pytest.raises(AdapterError, match="classifier-head adapter.*serves seq2seq adapters only"):
        load_adapter(path, base=load_base_model(seq2seq), base_config=seq2seq)


def test_export_refuses_a_classifier(family_configs, tmp_path):
    from lexlora.export.writer import export_adapter

    config = family_configs["bert"]
    model = make_classifier(config, mode=None)
    path = save_adapter(model, tmp_path / "c", {"base": fingerprint(model.base_model, config)}, save_dtype="float32")
    with pytest.raises(AdapterError, match="classifier-head adapter; lexlora export writes merged seq2seq"):
        export_adapter(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plain_peft_loads_the_lora_part(family_configs, tmp_path):
    from peft import PeftModel

    config = family_configs["bert"]
    model = make_classifier(config, mode=None)
    perturb_(model)
    path = save_adapter(model, tmp_path / "c", {"base": fingerprint(model.base_model, config)}, save_dtype="float32")
    plain = PeftModel.from_pretrained(load_base_model(config), str(path))
    ours = dict(model.peft_model.named_parameters())
    lora = {k: p for k, p in plain.named_parameters() if ".lora_" in k}
    assert lora and all(torch.equal(p, ours[k]) for k, p in lora.items())
