"""The fusion projection: a lexical vector projected to the model width and injected into the
encoder input. Zero-initialised, so a fresh adapter computes exactly what the base computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lexlora.config import FUSION_MODES

# The fusion projection's keys in an adapter's weights file (beside PEFT's LoRA keys).
FUSION_PREFIX = "lexical_fusion."


def encoder_input_width(base: nn.Module) -> int:
    """The width of the vectors the fusion projection must produce: that of the base's encoder input
    embeddings, whatever the family calls it (T5 `d_model`, BART `d_model`, BERT-based encoder-decoders
    the encoder's `hidden_size`, which may differ from the decoder's)."""
    embeddings = base.get_input_embeddings()
    width = getattr(embeddings, "embedding_dim", None)
    if width is None:
        width = embeddings.weight.shape[-1]
    return int(width)


class LexicalFusion(nn.Module):
    """`Linear(embed_dim -> model_dim)` applied in one of three modes:

    - add:    added to every token embedding;
    - first:  added to the first token embedding only;
    - prefix: prepended as one extra leading encoder position, attention mask extended by one.
    """

    def __init__(self, embed_dim: int, model_dim: int, mode: str = "add"):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
        self.mode = mode
        self.embed_dim = embed_dim
        self.model_dim = model_dim
        self.proj = nn.Linear(embed_dim, model_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        lexical_embeds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq, d) token embeddings + (batch, embed_dim) vectors -> fused embeddings, mask."""
        return fuse(self.mode, self.proj.weight, self.proj.bias, inputs_embeds, attention_mask, lexical_embeds)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def fuse(
    mode: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    lexical_embeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fusion as a function of the projection's weights (computed in their dtype), so hot-swapped
    adapters can keep theirs as saved and cast them per call."""
    if lexical_embeds.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"lexical embeddings have {lexical_embeds.shape[-1]} dims; this fusion projection takes {weight.shape[1]}"
        )
    lexical = F.linear(lexical_embeds.to(weight.dtype), weight, bias).to(inputs_embeds.dtype)
    lexical = lexical.unsqueeze(1)  # (batch, 1, d)
    if mode == "add":
        return inputs_embeds + lexical, attention_mask
    if mode == "first":
        # Concatenate rather than write in place: autograd-friendly and leaves the input intact.
        first = inputs_embeds[:, :1] + lexical
        return torch.cat([first, inputs_embeds[:, 1:]], dim=1), attention_mask
    if mode == "prefix":
        ones = attention_mask.new_ones(attention_mask.shape[0], 1)
        return torch.cat([lexical, inputs_embeds], dim=1), torch.cat([ones, attention_mask], dim=1)
    raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
