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
    from lexlora.base import load_base_model
    from lexlora.model import enable_gradient_checkpointing
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
    from lexlora.model import disable_gradient_checkpointing, enable_gradient_checkpointing

    model = make_model(tiny_base, tokenizer)
    blocks = list(tiny_base.encoder.block) + list(tiny_base.decoder.block)
    assert not model.gradient_checkpointing and not any(b.gradient_checkpointing for b in blocks)
    enable_gradient_checkpointing(model)
    assert model.gradient_checkpointing and all(b.gradient_checkpointing for b in blocks)
    assert tiny_base.is_activation_checkpointing if hasattr(tiny_base, "is_activation_checkpointing") else True
    disable_gradient_checkpointing(model)
    assert not model.gradient_checkpointing and not any(b.gradient_checkpointing for b in blocks)


def test_checkpointing_recomputes_in_backward(tiny_base, tokenizer, monkeypatch):
    """The checkpointed layers run twice per training step (forward, then again in backward), and
    only in training: evaluation forward passes and generation are untouched."""
    from lexlora.model import enable_gradient_checkpointing

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
