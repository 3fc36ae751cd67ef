import pytest

from lexlora.base import default_target_modules, fingerprint, load_base_model
from lexlora.config import ModelConfig
from lexlora.errors import ModelLoadError
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
    assert default_target_modules("t5") == ["q", "k", "v", "o"]
    assert default_target_modules("bart") == ["q_proj", "k_proj", "v_proj", "out_proj"]
    with pytest.raises(ModelLoadError, match="lora.target_modules"):
        default_target_modules("gpt2")
