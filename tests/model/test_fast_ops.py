import dataclasses

import pytest
import torch
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation

from lexlora.model.fast_ops import FastDropout, keep_mask, use_fast_ops
from lexlora.model.loading import load_base_model
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_and_reports_its_exact_rate(p):
    torch.manual_seed(0)
    keep, rate = keep_mask(torch.Size([1000, 1001]), p)  # numel not a multiple of 4
    assert keep.dtype == torch.bool and keep.shape == (1000, 1001)
    assert rate == pytest.approx(1 - p, abs=1 / 65536)
    assert keep.float().mean().item() == pytest.approx(rate, abs=0.002)
    # no position in the 4-value packing is biased (the int64's top bits are random too)
    per_lane = keep.flatten()[: 1000 * 1000].view(-1, 4).float().mean(0)
    assert torch.allclose(per_lane, torch.full((4,), rate), atol=0.004)


def test_fast_dropout_drops_rescales_and_backpropagates_through_the_same_mask():
    torch.manual_seed(0)
    drop = FastDropout(0.25).train()
    x = torch.randn(64, 128, requires_grad=True)
    out = drop(x)
    kept = out != 0
    assert 0.70 < kept.float().mean().item() < 0.80
    scale = 65536 / (65536 - 16384)
    assert torch.allclose(out[kept], x.detach()[kept] * scale)
    out.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], scale))


def test_fast_dropout_is_reproducible_from_the_torch_seed_and_an_identity_in_eval():
    x = torch.randn(32, 32)
    drop = FastDropout(0.1).train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    torch.manual_seed(6)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_the_base_loads_with_fast_ops_and_computes_what_the_stock_modules_compute():
    fast = load_base_model(tiny_model_config())
    stock = load_base_model(dataclasses.replace(tiny_model_config(), fast_ops=False))
    kinds = lambda m: {type(x) for x in m.modules()}  # noqa: E731
    assert FastDropout in kinds(fast) and GELUTanh in kinds(fast) and NewGELUActivation not in kinds(fast)
    assert nn.Dropout in kinds(stock) and NewGELUActivation in kinds(stock) and FastDropout not in kinds(stock)
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[4, 3, 1], [2, 1, -100]])
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=mask, labels=labels).logits
        b = stock(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert torch.allclose(a, b, atol=1e-5)  # the C tanh-GELU equals gelu_new up to rounding


def test_use_fast_ops_counts_what_it_swapped_and_leaves_other_modules_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), NewGELUActivation(), nn.Sequential(nn.Dropout(0.1)), nn.ReLU())
    assert use_fast_ops(model) == {"dropout": 2, "gelu": 1}
    assert isinstance(model[1], FastDropout) and model[1].p == 0.3 and model[3][0].p == 0.1
    assert isinstance(model[2], GELUTanh) and isinstance(model[0], nn.Linear) and isinstance(model[4], nn.ReLU)
    assert use_fast_ops(model) == {"dropout": 0, "gelu": 0}  # idempotent: FastDropout is not swapped again


def test_swapped_modules_keep_the_train_or_eval_mode_of_the_ones_they_replace():
    model = nn.Sequential(nn.Dropout(0.5), NewGELUActivation()).eval()
    use_fast_ops(model)
    assert isinstance(model[0], FastDropout) and not model[0].training and not model[1].training
    x = torch.randn(8, 8)
    assert torch.equal(model[0](x), x)  # an eval-mode base drops nothing after the swap


def test_fast_dropout_handles_empty_transposed_and_bf16_inputs():
    drop = FastDropout(0.5).train()
    assert drop(torch.empty(0, 5)).shape == (0, 5)
    x = torch.randn(3, 4).t()  # not contiguous
    out = drop(x)
    assert out.shape == (4, 3) and torch.all((out == 0) | torch.isclose(out, x * 2))
    assert drop(torch.randn(2, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
