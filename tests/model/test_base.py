import importlib.util

import pytest
import torch

from lexlora.adapters.fingerprint import fingerprint
from lexlora.config import ModelConfig
from lexlora.errors import ConfigError, ModelLoadError
from lexlora.model.families import default_target_modules
from lexlora.model.loading import (
    check_quantization,
    is_quantized,
    load_base_model,
    quantization_config,
)
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
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS,
    )

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
    import lexlora.model.loading as base_module

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
    from lexlora.adapters.files import load_adapter, save_adapter
    from lexlora.model.lora_model import enable_gradient_checkpointing
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


# ---- other families: BART / mBART by path, warm-started and saved encoder-decoders -----------------

from lexlora.model.families import (
    BERT_LIKE_TARGETS,
    base_config,
    default_modules_to_save,
    parse_encoder_decoder,
)
from lexlora.model.loading import load_tokenizer
from tests.helpers import MINILM, save_tiny_bart, save_tiny_bert, save_tiny_bert2bert  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    bert = save_tiny_bert(root / "bert")
    return {
        "bart": save_tiny_bart(root / "bart", "bart"),
        "mbart": save_tiny_bart(root / "mbart", "mbart"),
        "bert": bert,
        "bert2bert": save_tiny_bert2bert(root / "bert2bert", bert),
    }


def test_encoder_decoder_names():
    assert parse_encoder_decoder("encoder-decoder:a/b+c/d") == ("a/b", "c/d")
    assert parse_encoder_decoder("encoder-decoder: a/b ") == ("a/b", "a/b")
    assert parse_encoder_decoder("google/flan-t5-small") is None
    for bad in ("encoder-decoder:", "encoder-decoder:a+b+c", "encoder-decoder:a+"):
        with pytest.raises(ConfigError, match="ENCODER_ID\\+DECODER_ID"):
            parse_encoder_decoder(bad)


@pytest.mark.parametrize("kind", ["bart", "mbart"])
def test_bart_family_loads_by_path_like_a_hub_id(tiny_dirs, kind):
    config = ModelConfig(name_or_path=str(tiny_dirs[kind]))
    base = load_base_model(config)
    assert base.config.model_type == kind and not base.training
    assert not any(p.requires_grad for p in base.parameters())
    fp = fingerprint(base, config)
    assert fp["model_type"] == kind and fp["vocab_size"] == base.config.vocab_size
    assert fingerprint(load_base_model(config), config) == fp


def test_warm_start_is_deterministic_from_its_seed_and_generates_bert_style(tiny_dirs):
    name = f"encoder-decoder:{tiny_dirs['bert']}"
    a = load_base_model(ModelConfig(name_or_path=name, init_seed=1))
    b = load_base_model(ModelConfig(name_or_path=name, init_seed=1))
    c = load_base_model(ModelConfig(name_or_path=name, init_seed=2))
    assert a.config.model_type == "encoder-decoder" and a.name_or_path == name
    fa, fb, fc = (fingerprint(m, ModelConfig(name_or_path=name, init_seed=s)) for m, s in ((a, 1), (b, 1), (c, 2)))
    assert fa == fb and fa["init_seed"] == 1
    # The encoder's weights are the checkpoint's; the new cross-attention differs by seed, and so does the digest.
    assert torch.equal(a.encoder.embeddings.word_embeddings.weight, c.encoder.embeddings.word_embeddings.weight)
    assert fa["architecture_sha256"] == fc["architecture_sha256"] and fa["weights_sha256"] != fc["weights_sha256"]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=name))
    for holder in (a.config, a.generation_config):
        assert holder.decoder_start_token_id == tokenizer.cls_token_id
        assert holder.eos_token_id == tokenizer.sep_token_id and holder.pad_token_id == tokenizer.pad_token_id
    enc = tokenizer(["backup_config"], return_tensors="pt")
    ids = a.generate(**enc, max_new_tokens=4, do_sample=False)
    assert ids[0, 0].item() == tokenizer.cls_token_id and ids.shape[1] <= 5


def test_a_saved_encoder_decoder_loads_by_path(tiny_dirs):
    config = ModelConfig(name_or_path=str(tiny_dirs["bert2bert"]))
    base = load_base_model(config)
    assert type(base).__name__ == "EncoderDecoderModel"
    assert base.generation_config.decoder_start_token_id == load_tokenizer(config).cls_token_id
    assert fingerprint(base, config)["vocab_size"] == base.config.decoder.vocab_size
    # A trained bert2bert already has its cross-attention: nothing is trained in full by default.
    assert default_modules_to_save("encoder-decoder", str(tiny_dirs["bert2bert"]), base.config) is None


def test_encoder_decoder_defaults_train_the_new_cross_attention():
    config = base_config(f"encoder-decoder:{MINILM}")
    assert default_target_modules("encoder-decoder", config) == BERT_LIKE_TARGETS
    assert default_modules_to_save("encoder-decoder", f"encoder-decoder:{MINILM}", config) == [
        "crossattention", "predictions.transform"]
    with pytest.raises(ModelLoadError, match="lora.target_modules"):
        default_target_modules("encoder-decoder", None)


def test_random_init_warm_start_for_tests_and_benchmarks():
    config = ModelConfig(name_or_path=f"encoder-decoder:{MINILM}", random_init=True,
                         config_overrides={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "intermediate_size": 32})
    base = load_base_model(config)
    assert base.config.encoder.hidden_size == 16 and base.config.decoder.add_cross_attention
    assert fingerprint(base, config) == fingerprint(load_base_model(config), config)


def test_warm_start_refuses_quantization_and_overrides_without_random_init(tiny_dirs, monkeypatch):
    import lexlora.model.loading as base_module

    monkeypatch.setattr(base_module, "check_quantization", lambda model: None)  # as if CUDA + bitsandbytes
    with pytest.raises(ConfigError, match="not supported for a warm-started"):
        load_base_model(ModelConfig(name_or_path=f"encoder-decoder:{tiny_dirs['bert']}", quantization="8bit"))
    with pytest.raises(ModelLoadError, match="only applies with model.random_init"):
        load_base_model(ModelConfig(name_or_path=f"encoder-decoder:{tiny_dirs['bert']}", config_overrides={"hidden_size": 8}))


def test_encoder_and_decoder_tokenizers_must_agree(tiny_dirs):
    with pytest.raises(ModelLoadError, match="share a vocabulary"):
        load_tokenizer(ModelConfig(name_or_path=f"encoder-decoder:{tiny_dirs['bert']}+{tiny_dirs['bart']}"))


@pytest.mark.parametrize("model_type", ["pegasus", "marian", "m2m_100", "blenderbot", "blenderbot-small", "plbart"])
def test_bart_derived_families_have_their_targets(model_type):
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from lexlora.config import LoraSettings
    from lexlora.model.lora_model import build_lora_config

    config = AutoConfig.for_model(model_type, vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=0)
    base = AutoModelForSeq2SeqLM.from_config(config)
    model = get_peft_model(base, build_lora_config(LoraSettings(r=2), model_type, "tiny"))
    targeted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_a_warm_start_training_step_raises_no_transformers_loss_warning(tiny_dirs):
    """EncoderDecoderModel warns on every forward with labels (its v4.12 loss change): lexlora's own
    training call must not surface it, a T5 forward is left alone."""
    import warnings

    from lexlora.config import LoraSettings
    from lexlora.data.spec import AdapterSpec
    from lexlora.model.factory import build_model

    config = ModelConfig(name_or_path=f"encoder-decoder:{tiny_dirs['bert']}")
    tokenizer = load_tokenizer(config)
    model = build_model(load_base_model(config), tokenizer, AdapterSpec("{x}", "y"), LoraSettings(r=2),
                        base_id=config.name_or_path)
    model.train()
    enc = tokenizer(["backup_config"], return_tensors="pt")
    labels = tokenizer(text_target=["a config"], return_tensors="pt").input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(enc["input_ids"], enc["attention_mask"], labels=labels).loss.backward()
    assert not [w for w in caught if "v4.12.0" in str(w.message)], [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:  # the warning is real: transformers raises it directly
        warnings.simplefilter("always")
        model.peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    assert [w for w in caught if "v4.12.0" in str(w.message)]
