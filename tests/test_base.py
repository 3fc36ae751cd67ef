import importlib.util

import pytest
import torch

from lexlora.base import (
    check_quantization,
    default_target_modules,
    fingerprint,
    is_quantized,
    load_base_model,
    quantization_config,
)
from lexlora.config import ModelConfig
from lexlora.errors import ConfigError, ModelLoadError
from tests.conftest import tiny_model_config
from tests.helpers import make_model


def test_base_is_frozen_and_in_eval_mode(tiny_base):
    assert not any(p.requires_grad for p in tiny_base.parameters())
    assert not tiny_base.training


def test_random_init_is_reproducible_from_its_seed():
    a = fingerprint(load_base_model(tiny_model_config(seed=3)), tiny_model_config(seed=3))
    b = fingerprint(load_base_model(tiny_model_config(seed=3)), tiny_model_config(seed=3))
    c = fingerprint(load_base_model(tiny_model_config(seed=4)), tiny_model_config(seed=4))
    assert a == b
    assert a["architecture_sha256"] == c["architecture_sha256"] and a["weights_sha256"] != c["weights_sha256"]


def test_fingerprint_ignores_peft_wrapping(tiny_base, tokenizer):
    before = fingerprint(tiny_base, tiny_model_config())
    make_model(tiny_base, tokenizer)  # injects LoRA layers into tiny_base in place
    assert fingerprint(tiny_base, tiny_model_config()) == before


def test_missing_weights_are_an_error_that_says_what_to_do():
    try:
        load_base_model(ModelConfig(name_or_path="google/flan-t5-small"))
    except ModelLoadError as exc:
        assert "random_init=true" in str(exc) and "hf download" in str(exc)
    else:
        pytest.skip("the real flan-t5-small weights are available on this machine")


def test_config_overrides_need_random_init():
    with pytest.raises(ModelLoadError, match="only applies with model.random_init"):
        load_base_model(ModelConfig(config_overrides={"d_model": 8}))


def test_default_targets_per_architecture():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    assert default_target_modules("t5") == ["q", "k", "v", "o"]
    assert default_target_modules("mt5") == ["q", "k", "v", "o"]
    assert default_target_modules("bart") == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert default_target_modules("mbart") == ["q_proj", "k_proj", "v_proj", "out_proj"]
    # A type lexlora has no table entry for falls back to PEFT's own default for it.
    assert default_target_modules("gpt2") == PEFT_DEFAULTS["gpt2"]
    with pytest.raises(ModelLoadError, match="lora.target_modules"):
        default_target_modules("no-such-model-type")


# The tiny base's architecture digest as adapters saved before quantization support recorded it:
# logical shapes must leave the fingerprints of full-precision bases exactly as they were.
TINY_ARCHITECTURE_SHA256 = "b102f30354231a435b890f202805797bfa3fe74f88be6ba819c23ff3c1b155c1"


def test_fingerprint_of_a_full_precision_base_is_unchanged(tiny_base):
    assert fingerprint(tiny_base, tiny_model_config())["architecture_sha256"] == TINY_ARCHITECTURE_SHA256


def test_fingerprint_uses_logical_linear_shapes(tiny_base):
    """bitsandbytes stores a 4-bit Linear weight packed as (out * in / 2, 1) uint8: the fingerprint
    must see (out, in), as for the full-precision base, so a QLoRA adapter loads on either."""
    before = fingerprint(tiny_base, tiny_model_config())
    linear = tiny_base.encoder.block[0].layer[0].SelfAttention.q
    packed = torch.zeros(linear.out_features * linear.in_features // 2, 1, dtype=torch.uint8)
    linear.weight = torch.nn.Parameter(packed, requires_grad=False)
    assert fingerprint(tiny_base, tiny_model_config()) == before


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantization_without_cuda_fails_before_loading_anything(monkeypatch, quantization):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refuse_loading(monkeypatch)
    config = tiny_model_config()
    config.quantization = quantization
    with pytest.raises(ConfigError, match=f"model.quantization={quantization}.*no CUDA device"):
        load_base_model(config)
    with pytest.raises(ConfigError, match=f"model.quantization={quantization}"):
        check_quantization(config)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantization_without_bitsandbytes_fails_before_loading_anything(monkeypatch, quantization):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    _refuse_loading(monkeypatch)
    config = ModelConfig(quantization=quantization)
    with pytest.raises(ConfigError, match=f"model.quantization={quantization}.*pip install bitsandbytes"):
        load_base_model(config)


def test_no_quantization_needs_neither_cuda_nor_bitsandbytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_quantization(ModelConfig())
    assert quantization_config("none") is None
    assert not is_quantized(load_base_model(tiny_model_config()))


def test_quantization_configs():
    pytest.importorskip("transformers.utils.quantization_config")
    eight = quantization_config("8bit")
    four = quantization_config("4bit")
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16


def _refuse_loading(monkeypatch):
    import lexlora.base as base_module

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be loaded before the quantization check")

    monkeypatch.setattr(base_module.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(base_module.AutoModelForSeq2SeqLM, "from_pretrained", refuse)
    monkeypatch.setattr(base_module.AutoModelForSeq2SeqLM, "from_config", refuse)


needs_bitsandbytes_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs a CUDA GPU and bitsandbytes",
)


@needs_bitsandbytes_gpu
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_random_base_keeps_the_full_precision_fingerprint(quantization):
    full = fingerprint(load_base_model(tiny_model_config()), tiny_model_config())
    config = tiny_model_config()
    config.quantization = quantization
    base = load_base_model(config)
    assert is_quantized(base)
    assert next(base.parameters()).device.type == "cuda"
    assert not any(p.requires_grad for p in base.parameters()) and not base.training
    assert fingerprint(base, config) == full


@needs_bitsandbytes_gpu
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_qlora_trains_on_the_gpu_and_its_adapter_loads_on_the_full_precision_base(tmp_path, tokenizer, quantization):
    from lexlora.adapters import load_adapter, save_adapter
    from lexlora.model import enable_gradient_checkpointing
    from tests.helpers import batch, make_model

    config = tiny_model_config()
    config.quantization = quantization
    base = load_base_model(config)
    model = make_model(base, tokenizer).cuda()  # k-bit preparation happens in LexLoraModel.create
    enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, lexical, labels = (t.cuda() for t in batch(tokenizer))
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, mask, labels=labels, lexical_embeds=lexical).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    model.eval()
    path = save_adapter(model, tmp_path / "qlora", {"base": fingerprint(base, config)}, save_dtype="float32")
    loaded = load_adapter(path)  # onto the full-precision random base of the same seed, on the CPU
    assert not is_quantized(loaded.base_model)
    cpu_ids, cpu_mask, cpu_lexical, cpu_labels = batch(tokenizer)
    with torch.no_grad():
        logits = loaded(cpu_ids, cpu_mask, labels=cpu_labels, lexical_embeds=cpu_lexical).logits
    assert torch.isfinite(logits).all()


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="model.quantization must be one of none, 8bit, 4bit; got '3bit'"):
        check_quantization(ModelConfig(quantization="3bit"))
    with pytest.raises(ConfigError, match="must be one of"):
        quantization_config("3bit")
