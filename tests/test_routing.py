"""Per-row LoRA routing over one frozen base: the same numbers as PEFT for one adapter, each row as
its own adapter alone in a mixed batch, and refusals for what this path cannot reproduce."""

import pytest
import torch

from lexlora.errors import AdapterError
from lexlora.model import FUSION_PREFIX
from lexlora.routing import LoraRouter, LoraWeights
from tests.helpers import batch, make_model, perturb_


def lora_state(model):
    return {k: v for k, v in model.trainable_state_dict().items() if not k.startswith(FUSION_PREFIX)}


def weights_of(model, base, **kwargs):
    config = model.peft_model.peft_config["default"]
    return LoraWeights.from_peft_state(lora_state(model), config, base, "test", **kwargs)


@pytest.fixture()
def two_adapters(tiny_base, tokenizer):
    """Two PEFT-trained-like adapters (rank 4 and 6) and a clean base of the same weights to route on."""
    from lexlora.base import load_base_model
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
