import pytest
import torch

from tests.helpers import batch, make_model, perturb_


@pytest.mark.parametrize("mode", ["add", "first", None])
def test_fresh_adapter_computes_exactly_what_the_base_computes(tiny_base, tokenizer, mode):
    ids, mask, lexical, labels = batch(tokenizer)
    with torch.no_grad():
        expected = tiny_base(input_ids=ids, attention_mask=mask, labels=labels).logits
    model = make_model(tiny_base, tokenizer, mode).eval()
    with torch.no_grad():
        got = model(ids, mask, labels=labels, lexical_embeds=lexical if mode else None).logits
    assert torch.equal(got, expected)


def test_only_lora_and_fusion_parameters_train(tiny_base, tokenizer):
    model = make_model(tiny_base, tokenizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "lexical_fusion" in n for n in trainable)
    assert any("lexical_fusion" in n for n in trainable)
    trainable_count, total = model.parameter_counts()
    assert trainable_count == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert trainable_count < total


def test_fusion_changes_the_output_once_trained(tiny_base, tokenizer):
    ids, mask, lexical, labels = batch(tokenizer)
    model = make_model(tiny_base, tokenizer).eval()
    perturb_(model)
    with torch.no_grad():
        a = model(ids, mask, labels=labels, lexical_embeds=lexical).logits
        b = model(ids, mask, labels=labels, lexical_embeds=torch.zeros_like(lexical)).logits
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("mode", ["add", "first", "prefix"])
def test_greedy_generate_matches_step_by_step_decoding(tiny_base, tokenizer, mode):
    ids, mask, lexical, _ = batch(tokenizer)
    model = make_model(tiny_base, tokenizer, mode).eval()
    perturb_(model)
    out = model.generate(ids, mask, lexical, max_new_tokens=6, num_beams=1, do_sample=False)
    decoder = torch.full((2, 1), tiny_base.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(out.shape[1] - 1):
            logits = model(ids, mask, lexical_embeds=lexical, decoder_input_ids=decoder).logits
            decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for row in range(2):
        length = int((out[row] != tokenizer.pad_token_id).sum()) + 1
        assert out[row, :length].tolist() == decoder[row, :length].tolist()


def test_beam_search_is_batched_and_row_independent(tiny_base, tokenizer):
    ids, mask, lexical, _ = batch(tokenizer)
    model = make_model(tiny_base, tokenizer, "prefix").eval()
    perturb_(model)
    both = model.generate(ids, mask, lexical, max_new_tokens=6, num_beams=3, do_sample=False)
    alone = model.generate(ids[1:, : int(mask[1].sum())], mask[1:, : int(mask[1].sum())], lexical[1:],
                           max_new_tokens=6, num_beams=3, do_sample=False)
    assert both.shape[0] == 2
    assert both[1, : alone.shape[1]].tolist() == alone[0].tolist()


def test_generate_text_formats_raw_records(tiny_base, tokenizer):
    model = make_model(tiny_base, tokenizer, mode=None).eval()
    texts = model.generate_text(["backup_config", {"filename": "notes.txt"}], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    from lexlora.errors import DataError

    with pytest.raises(DataError, match="field 'filename'"):
        model.generate_text([{"name": "x"}])


def _loss_and_grads(tokenizer, mode, checkpointing):
    from lexlora.model.loading import load_base_model
    from lexlora.model.lora_model import enable_gradient_checkpointing
    from tests.conftest import tiny_model_config

    model = make_model(load_base_model(tiny_model_config()), tokenizer, mode)
    perturb_(model)  # non-zero LoRA B and fusion, so every trainable weight has a gradient
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()  # dropout on: the recomputation must replay the same masks
    ids, mask, lexical, labels = batch(tokenizer)
    torch.manual_seed(0)
    loss = model(ids, mask, labels=labels, lexical_embeds=lexical if mode else None).loss
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["add", None])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer, mode):
    plain, loss, grads = _loss_and_grads(tokenizer, mode, checkpointing=False)
    ckpt, ckpt_loss, ckpt_grads = _loss_and_grads(tokenizer, mode, checkpointing=True)
    assert not plain.gradient_checkpointing and ckpt.gradient_checkpointing
    assert torch.allclose(ckpt_loss, loss)
    assert grads.keys() == ckpt_grads.keys()
    assert any("lora_A" in n for n in grads) and (mode is None or any("lexical_fusion" in n for n in grads))
    for name, grad in grads.items():
        assert ckpt_grads[name] is not None, f"{name} got no gradient under checkpointing"
        assert grad.abs().sum() > 0, name
        assert torch.allclose(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_switch_changes_the_layers_and_back(tiny_base, tokenizer):
    from lexlora.model.lora_model import (
        disable_gradient_checkpointing,
        enable_gradient_checkpointing,
    )

    model = make_model(tiny_base, tokenizer)
    blocks = list(tiny_base.encoder.block) + list(tiny_base.decoder.block)
    assert not model.gradient_checkpointing and not any(b.gradient_checkpointing for b in blocks)
    # transformers' own flag too, under this version's name (the old one warns where both exist)
    flag = "is_activation_checkpointing" if hasattr(type(tiny_base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(tiny_base, flag) is False
    enable_gradient_checkpointing(model)
    assert model.gradient_checkpointing and all(b.gradient_checkpointing for b in blocks)
    assert getattr(tiny_base, flag) is True
    disable_gradient_checkpointing(model)
    assert not model.gradient_checkpointing and not any(b.gradient_checkpointing for b in blocks)
    assert getattr(tiny_base, flag) is False


def test_checkpointing_recomputes_in_backward(tiny_base, tokenizer, monkeypatch):
    """The checkpointed layers run twice per training step (forward, then again in backward), and
    only in training: evaluation forward passes and generation are untouched."""
    from lexlora.model.lora_model import enable_gradient_checkpointing

    model = make_model(tiny_base, tokenizer)
    enable_gradient_checkpointing(model)
    calls = []
    block = tiny_base.encoder.block[1]
    block.layer[0].register_forward_hook(lambda *args: calls.append(1))
    ids, mask, lexical, labels = batch(tokenizer)
    model.train()
    model(ids, mask, labels=labels, lexical_embeds=lexical).loss.backward()
    assert len(calls) == 2
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(ids, mask, labels=labels, lexical_embeds=lexical)
    assert len(calls) == 1


def test_training_forward_builds_no_decoder_cache(tiny_base, tokenizer):
    model = make_model(tiny_base, tokenizer)
    ids, mask, lexical, labels = batch(tokenizer)
    decoder = torch.full((2, 1), tiny_base.config.decoder_start_token_id)
    model.train()
    assert model(ids, mask, lexical_embeds=lexical, decoder_input_ids=decoder).past_key_values is None
    model.eval()
    with torch.no_grad():
        assert model(ids, mask, lexical_embeds=lexical, decoder_input_ids=decoder).past_key_values is not None


# ---- other families: BART, mBART, warm-started and saved BERT encoder-decoders -----------------------

from lexlora.config import LoraSettings, ModelConfig  # noqa: E402
from lexlora.model.loading import load_base_model, load_tokenizer
from lexlora.model.lora_model import build_lora_config
from tests.helpers import make_model_for, save_family_bases  # noqa: E402

FAMILIES = ["bart", "mbart", "warm-start", "bert2bert"]
EXPECTED_TARGETS = {
    "bart": {"q_proj", "k_proj", "v_proj", "out_proj"},
    "mbart": {"q_proj", "k_proj", "v_proj", "out_proj"},
    "warm-start": {"query", "key", "value", "dense"},
    "bert2bert": {"query", "key", "value", "dense"},
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return save_family_bases(tmp_path_factory.mktemp("families"))


def family(families, kind):
    config = ModelConfig(name_or_path=families[kind])
    return load_base_model(config), load_tokenizer(config), config


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("mode", ["add", None])
def test_fresh_adapter_computes_what_the_base_computes_in_every_family(families, kind, mode):
    base, tokenizer, config = family(families, kind)
    ids, mask, lexical, labels = batch(tokenizer)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, labels=labels).logits
    model = make_model_for(base, tokenizer, config.name_or_path, mode).eval()
    with torch.no_grad():
        got = model(ids, mask, labels=labels, lexical_embeds=lexical if mode else None).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_targets_and_fusion_width_per_family(families, kind):
    base, tokenizer, config = family(families, kind)
    width = base.get_input_embeddings().embedding_dim
    model = make_model_for(base, tokenizer, config.name_or_path, "add")
    assert model.lexical_fusion.proj.weight.shape == (width, 384)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert {path.rsplit(".", 1)[-1] for path in lora_layers} == EXPECTED_TARGETS[kind]
    # Cross-attention is never a LoRA target in a BERT encoder-decoder (the regex needs ".attention.").
    assert not any("crossattention" in path for path in lora_layers)
    if kind in ("warm-start", "bert2bert"):
        decoder_self = [p for p in lora_layers if ".model.decoder." in p and ".attention.self." in p]
        assert decoder_self, "the decoder's self-attention gets LoRA too"


@pytest.mark.parametrize("kind", FAMILIES)
def test_generate_runs_through_encoder_outputs_in_every_family(families, kind):
    base, tokenizer, config = family(families, kind)
    ids, mask, lexical, _ = batch(tokenizer)
    model = make_model_for(base, tokenizer, config.name_or_path, "prefix").eval()
    perturb_(model)
    out = model.generate(ids, mask, lexical, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= 6
    # Greedy decoding through precomputed encoder outputs equals decoding with the fused embeddings.
    embeds, fused_mask = model.encoder_inputs(ids, mask, lexical)
    again = model.peft_model.generate(inputs_embeds=embeds, attention_mask=fused_mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)


def test_warm_start_trains_its_new_cross_attention_in_full(families):
    base, tokenizer, config = family(families, "warm-start")
    full_size = sum(p.numel() for p in base.parameters())
    model = make_model_for(base, tokenizer, config.name_or_path, "add")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    full = [n for n in trainable if "lora_" not in n and "lexical_fusion" not in n]
    assert full and all(".modules_to_save.default." in n for n in full)
    assert any("crossattention" in n for n in full) and any("predictions.transform" in n for n in full)
    assert not any("word_embeddings" in n or "predictions.decoder" in n for n in full)
    trainable_count, total = model.parameter_counts()
    lora_and_fusion = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "lexical_fusion" in n)
    assert total == full_size + lora_and_fusion  # the frozen originals are not counted twice
    # The trained copies are saved with the adapter, under the base's own module paths.
    state = model.trainable_state_dict()
    assert any(k.endswith("crossattention.self.query.weight") for k in state)
    assert not any("modules_to_save" in k or "original_module" in k for k in state)


def test_modules_to_save_can_be_turned_off_or_chosen():
    from lexlora.model.families import base_config
    from tests.helpers import MINILM

    name = f"encoder-decoder:{MINILM}"
    config = base_config(name)
    assert build_lora_config(LoraSettings(), "encoder-decoder", name, config).modules_to_save == [
        "crossattention", "predictions.transform"]
    assert not build_lora_config(LoraSettings(extra={"modules_to_save": []}), "encoder-decoder", name, config).modules_to_save
    regex = build_lora_config(LoraSettings(target_modules=[".*\\.query"]), "encoder-decoder", name, config)
    assert regex.target_modules == ".*\\.query"  # one regex in the list: PEFT's whole-path match
    names = build_lora_config(LoraSettings(target_modules=["q", "v"]), "t5", "google/flan-t5-small")
    assert set(names.target_modules) == {"q", "v"} and names.modules_to_save is None


def test_warm_start_adapter_saves_and_loads_its_cross_attention(families, tmp_path):
    from lexlora.adapters.files import load_adapter, save_adapter
    from lexlora.adapters.fingerprint import fingerprint

    base, tokenizer, config = family(families, "warm-start")
    model = make_model_for(base, tokenizer, config.name_or_path, "first").eval()
    perturb_(model)
    ids, mask, lexical, labels = batch(tokenizer)
    with torch.no_grad():
        expected = model(ids, mask, labels=labels, lexical_embeds=lexical).logits
    path = save_adapter(model, tmp_path / "ws", {"base": fingerprint(base, config)}, save_dtype="float32")
    loaded = load_adapter(path)  # builds the base named in lexlora.json: encoder-decoder:<dir>, seed 0
    with torch.no_grad():
        got = loaded(ids, mask, labels=labels, lexical_embeds=lexical).logits
    assert torch.equal(got, expected)
    # The restored cross-attention is the trained one, not the fresh base's.
    query = "decoder.bert.encoder.layer.0.crossattention.self.query.weight"
    fresh = dict(load_base_model(config).named_parameters())[query]
    trained = loaded.trainable_state_dict()[f"base_model.model.{query}"]
    assert not torch.equal(trained, fresh)
