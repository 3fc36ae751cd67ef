"""Per-row LoRA routing over one frozen base: the same numbers as PEFT for one adapter, each row as
its own adapter alone in a mixed batch, and refusals for what this path cannot reproduce."""

import pytest
import torch

from lexlora.errors import AdapterError
from lexlora.model.fusion import FUSION_PREFIX
from lexlora.serving.routing import LoraRouter, LoraWeights
from tests.helpers import batch, make_model, perturb_


def lora_state(model):
    return {k: v for k, v in model.trainable_state_dict().items() if not k.startswith(FUSION_PREFIX)}


def weights_of(model, base, **kwargs):
    config = model.peft_model.peft_config["default"]
    return LoraWeights.from_peft_state(lora_state(model), config, base, "test", **kwargs)


@pytest.fixture()
def two_adapters(tiny_base, tokenizer):
    """Two PEFT-trained-like adapters (rank 4 and 6) and a clean base of the same weights to route on."""
    from lexlora.model.loading import load_base_model
    from tests.conftest import tiny_model_config

    first = make_model(load_base_model(tiny_model_config()), tokenizer, mode=None, r=4)
    second = make_model(load_base_model(tiny_model_config()), tokenizer, mode=None, r=6)
    perturb_(first, seed=1)
    perturb_(second, seed=2)
    return first, second, tiny_base


def attached(two_adapters):
    """A router on the clean base with both adapters attached."""
    first, second, base = two_adapters
    router = LoraRouter(base)
    a, b = weights_of(first, base), weights_of(second, base)
    router.attach(a)
    router.attach(b)
    return router, a, b


def logits(model, ids, mask, labels):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).logits


def test_one_adapter_matches_peft_exactly(two_adapters, tokenizer):
    first, _, base = two_adapters
    ids, mask, _, labels = batch(tokenizer)
    expected = logits(first.eval(), ids, mask, labels)
    router = LoraRouter(base)
    weights = weights_of(first, base)
    router.attach(weights)
    with router.route([weights, weights]):
        got = logits(base, ids, mask, labels)
    assert torch.equal(got, expected)
    # Outside a routed call the hooks do nothing: the base is untouched.
    plain = logits(base, ids, mask, labels)
    assert not torch.allclose(plain, expected)


def test_mixed_rows_match_each_adapter_alone(two_adapters, tokenizer):
    router, a, b = attached(two_adapters)
    base = router.base
    ids, mask, _, labels = batch(tokenizer)
    with router.route([a, a]):
        alone_a = logits(base, ids, mask, labels)
    with router.route([b, b]):
        alone_b = logits(base, ids, mask, labels)
    base_only = logits(base, ids, mask, labels)
    assert not torch.allclose(alone_a, alone_b)
    with router.route([a, b]):
        mixed = logits(base, ids, mask, labels)
    torch.testing.assert_close(mixed[0], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone_b[1], rtol=1e-5, atol=1e-5)
    with router.route([None, b]):  # None: that row runs on the base alone
        partial = logits(base, ids, mask, labels)
    torch.testing.assert_close(partial[0], base_only[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partial[1], alone_b[1], rtol=1e-5, atol=1e-5)


def test_beam_search_expands_rows(two_adapters, tokenizer):
    """Decoder layers see each row once per beam; every beam keeps its row's adapter."""
    router, a, b = attached(two_adapters)
    base = router.base
    ids, mask, _, _ = batch(tokenizer)
    kwargs = {"max_new_tokens": 5, "num_beams": 3, "do_sample": False}
    outs = {}
    for name, rows in {"a": [a, a], "b": [b, b], "mixed": [a, b]}.items():
        with router.route(rows), torch.no_grad():
            outs[name] = base.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert outs["mixed"][0].tolist() == outs["a"][0].tolist()
    assert outs["mixed"][1].tolist() == outs["b"][1].tolist()


def test_detach_removes_hooks_when_unused(two_adapters):
    router, a, b = attached(two_adapters)
    base = router.base
    router.detach(a)
    assert len(router._hooks) == len(b.deltas)
    router.detach(b)
    assert router._hooks == {}
    assert all(not m._forward_hooks for m in base.modules())


def test_weights_keep_their_saved_dtype(two_adapters):
    first, _, base = two_adapters
    state = {k: v.half() for k, v in lora_state(first).items()}
    weights = LoraWeights.from_peft_state(state, first.peft_model.peft_config["default"], base, "test")
    assert {d.A.dtype for d in weights.deltas.values()} == {torch.float16}
    assert weights.nbytes == sum(v.nbytes for v in state.values())


def test_refuses_what_it_cannot_reproduce(two_adapters):
    first, _, base = two_adapters
    config = first.peft_model.peft_config["default"]
    state = lora_state(first)
    some_key = next(iter(state))

    with pytest.raises(AdapterError, match="unexpected tensor"):
        LoraWeights.from_peft_state({**state, "base_model.model.encoder.x.lora_magnitude_vector": state[some_key]},
                                    config, base, "src")
    missing_b = {k: v for k, v in state.items() if not (k.startswith(some_key.rsplit(".lora_", 1)[0]) and "lora_B" in k)}
    with pytest.raises(AdapterError, match="not both lora_A and lora_B"):
        LoraWeights.from_peft_state(missing_b, config, base, "src")
    wrong_rank = {k: (v[:2] if "lora_A" in k else v) for k, v in state.items()}
    with pytest.raises(AdapterError, match="shapes"):
        LoraWeights.from_peft_state(wrong_rank, config, base, "src")
    renamed = {k.replace("SelfAttention.q", "SelfAttention.nope"): v for k, v in state.items()}
    with pytest.raises(AdapterError, match="not a Linear layer"):
        LoraWeights.from_peft_state(renamed, config, base, "src")
    config.use_dora = True
    with pytest.raises(AdapterError, match="DoRA"):
        LoraWeights.from_peft_state(state, config, base, "src")


# ---- adapters that train whole modules (a warm-started encoder-decoder's cross-attention) ----------

from lexlora.config import ModelConfig  # noqa: E402
from lexlora.model.loading import load_base_model, load_tokenizer
from tests.helpers import make_model_for, save_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def warm_start_name(tmp_path_factory):
    return f"encoder-decoder:{save_tiny_bert(tmp_path_factory.mktemp('bert') / 'bert')}"


@pytest.fixture()
def warm_adapters(warm_start_name):
    """Two warm-start adapters (LoRA + their own cross-attention and LM-head transform), trained-like,
    and a clean base of the same weights."""
    config = ModelConfig(name_or_path=warm_start_name)
    tokenizer = load_tokenizer(config)
    models = []
    for seed, r in ((1, 4), (2, 6)):
        model = make_model_for(load_base_model(config), tokenizer, warm_start_name, mode=None, r=r).eval()
        perturb_(model, seed=seed)
        models.append(model)
    return models[0], models[1], load_base_model(config), tokenizer


def test_modules_trained_in_full_route_like_peft(warm_adapters):
    first, second, base, tokenizer = warm_adapters
    ids, mask, _, labels = batch(tokenizer)
    a, b = weights_of(first, base), weights_of(second, base)
    assert any("crossattention" in path for path in a.modules)
    assert {m.kind for m in a.modules.values()} == {"linear", "layer_norm"}
    router = LoraRouter(base)
    router.attach(a)
    router.attach(b)
    alone_a, alone_b = logits(first, ids, mask, labels), logits(second, ids, mask, labels)
    base_only = logits(base, ids, mask, labels)
    with router.route([a, a]):
        torch.testing.assert_close(logits(base, ids, mask, labels), alone_a, rtol=1e-5, atol=1e-5)
    with router.route([a, b]):
        mixed = logits(base, ids, mask, labels)
    torch.testing.assert_close(mixed[0], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone_b[1], rtol=1e-5, atol=1e-5)
    with router.route([None, b]):
        partial = logits(base, ids, mask, labels)
    torch.testing.assert_close(partial[0], base_only[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partial[1], alone_b[1], rtol=1e-5, atol=1e-5)
    # Beams: each decoder row keeps its adapter's cross-attention.
    kwargs = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False}
    with router.route([a, b]), torch.no_grad():
        beams = base.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        expected_a = first.peft_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        expected_b = second.peft_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert beams[0].tolist()[: len(expected_a[0])] == expected_a[0].tolist()[: len(beams[0])]
    assert beams[1].tolist()[: len(expected_b[1])] == expected_b[1].tolist()[: len(beams[1])]
    router.detach(a)
    router.detach(b)
    assert all(not m._forward_hooks for m in base.modules())


def test_modules_trained_in_full_are_checked(warm_adapters):
    first, _, base, _ = warm_adapters
    config = first.peft_model.peft_config["default"]
    state = lora_state(first)
    key = next(k for k in state if k.endswith("crossattention.output.LayerNorm.weight"))
    with pytest.raises(AdapterError, match="has no weights for"):
        LoraWeights.from_peft_state({k: v for k, v in state.items() if not k.startswith(key.rsplit(".", 1)[0])},
                                    config, base, "src")
    with pytest.raises(AdapterError, match="this base's Linear"):
        LoraWeights.from_peft_state({**state, next(k for k in state if k.endswith("crossattention.self.query.weight")):
                                     torch.zeros(3, 3)}, config, base, "src")
    # A module that is not a Linear or LayerNorm (here the word embeddings) cannot be hot-swapped.
    config.modules_to_save = ["crossattention", "predictions.transform", "embeddings.word_embeddings"]
    extra = {"base_model.model.encoder.embeddings.word_embeddings.weight": base.encoder.embeddings.word_embeddings.weight}
    with pytest.raises(AdapterError, match="only Linear and LayerNorm layers can be hot-swapped"):
        LoraWeights.from_peft_state({**state, **extra}, config, base, "src")
