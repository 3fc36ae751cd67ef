"""Classifier heads of the adapters on one encoder base (lexlora.model.classifier), applied per row:
a mixed batch runs the encoder once with each row's LoRA and fusion (the router and the fused
inputs, as for generation), then each row's pooling and head, grouped by adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lexlora.errors import AdapterError
from lexlora.model.classifier import HEAD_PREFIX, ClassifierSpec, pool


@dataclass
class HeadWeights:
    """One adapter's head as saved: Linear(width -> labels) and how it pools."""

    classifier: ClassifierSpec
    weight: torch.Tensor  # (labels, width)
    bias: torch.Tensor  # (labels,)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.bias.nbytes


def split_head(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the head's tensors, without their prefix; everything else)."""
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return head, {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}


def build_head(head: dict[str, torch.Tensor], classifier: ClassifierSpec, width: int, source: str,
               device: torch.device) -> HeadWeights:
    """The head's weights checked against its labels and the base's width."""
    weight, bias = head.get("out_proj.weight"), head.get("out_proj.bias")
    expected = (len(classifier.labels), width)
    if weight is None or bias is None or tuple(weight.shape) != expected or tuple(bias.shape) != expected[:1]:
        found = {k: tuple(v.shape) for k, v in head.items()} or "nothing"
        raise AdapterError(
            f"{source}: the classifier head must be {HEAD_PREFIX}out_proj.weight {expected} and "
            f"{HEAD_PREFIX}out_proj.bias ({expected[0]},) for {expected[0]} labels on this base; found {found}"
        )
    return HeadWeights(classifier, weight.to(device), bias.to(device))


def head_logits(heads: Sequence[HeadWeights | None], states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's logits over its own adapter's labels (rows grouped by head)."""
    out: list[torch.Tensor | None] = [None] * len(heads)
    groups: dict[int, list[int]] = {}
    for row, head in enumerate(heads):
        if head is None:
            raise AdapterError(f"row {row}: its adapter has no classifier head")
        groups.setdefault(id(head), []).append(row)
    for rows in groups.values():
        head = heads[rows[0]]
        index = torch.tensor(rows, device=states.device)
        pooled = pool(states.index_select(0, index), mask.index_select(0, index), head.classifier.pooling)
        logits = F.linear(pooled, head.weight.to(pooled.dtype), head.bias.to(pooled.dtype))
        for row, value in zip(rows, logits):
            out[row] = value
    return out  # type: ignore[return-value]
