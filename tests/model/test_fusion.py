import pytest
import torch

from lexlora.model.fusion import LexicalFusion


def inputs(batch=2, seq=5, d=8, e=6):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, seq, d, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 3:] = 0
    return embeds, mask, torch.randn(batch, e, generator=g)


def trained(mode):
    fusion = LexicalFusion(6, 8, mode)
    with torch.no_grad():
        fusion.proj.weight.normal_()
        fusion.proj.bias.normal_()
    return fusion


@pytest.mark.parametrize("mode", ["add", "first", "prefix"])
def test_zero_init_changes_nothing_but_the_prefix_slot(mode):
    embeds, mask, lexical = inputs()
    fused, new_mask = LexicalFusion(6, 8, mode)(embeds, mask, lexical)
    offset = 1 if mode == "prefix" else 0
    assert torch.equal(fused[:, offset:], embeds)
    assert torch.equal(new_mask[:, offset:], mask)


def test_add_mode_adds_to_every_token():
    embeds, mask, lexical = inputs()
    fusion = trained("add")
    fused, new_mask = fusion(embeds, mask, lexical)
    assert fused.shape == embeds.shape and torch.equal(new_mask, mask)
    delta = fusion.proj(lexical).unsqueeze(1)
    assert torch.allclose(fused, embeds + delta)


def test_first_mode_changes_token_zero_only():
    embeds, mask, lexical = inputs()
    fusion = trained("first")
    fused, new_mask = fusion(embeds, mask, lexical)
    assert torch.allclose(fused[:, 0], embeds[:, 0] + fusion.proj(lexical))
    assert torch.equal(fused[:, 1:], embeds[:, 1:]) and torch.equal(new_mask, mask)


def test_prefix_mode_prepends_one_position_and_extends_the_mask():
    embeds, mask, lexical = inputs()
    fusion = trained("prefix")
    fused, new_mask = fusion(embeds, mask, lexical)
    assert fused.shape == (2, 6, 8) and new_mask.shape == (2, 6)
    assert torch.allclose(fused[:, 0], fusion.proj(lexical))
    assert torch.equal(fused[:, 1:], embeds)
    assert new_mask[:, 0].tolist() == [1, 1] and torch.equal(new_mask[:, 1:], mask)


def test_wrong_embedding_dim_is_refused():
    embeds, mask, _ = inputs()
    with pytest.raises(ValueError, match="takes 6"):
        LexicalFusion(6, 8)(embeds, mask, torch.zeros(2, 5))
