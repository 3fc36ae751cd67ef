"""An adapter resident on a registry's base (`LoadedAdapter`), and the rule for adapter names."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lexlora.adapters.format import AdapterMetadata
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError
from lexlora.model.generation import RowPlan
from lexlora.serving.heads import HeadWeights
from lexlora.serving.routing import LoraWeights

MAX_ADAPTER_NAME = 128  # characters; names appear in URLs
ADAPTER_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ADAPTER_NAME - 1}}}$")
# A Hugging Face Hub repo id, optionally at a revision: org/name or org/name@v2 (lexlora serve --allow-hub).
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9][A-Za-z0-9._/-]{0,99})?$")


@dataclass
class LoadedAdapter:
    """An adapter resident on the registry's base."""

    name: str
    path: Path
    spec: AdapterSpec
    metadata: AdapterMetadata
    lora: LoraWeights
    fusion: dict[str, torch.Tensor] = field(default_factory=dict)  # proj.weight / proj.bias, as saved
    file_bytes: int = 0
    # Set once it is unloaded (delete_adapter): rows still running on it fail. A replaced adapter is
    # not unloaded: what runs on it finishes on its weights, as vLLM and LoRAX do.
    unloaded: bool = False
    head: HeadWeights | None = None  # a classifier adapter's head (lexlora.serving.heads)

    def plan(self, max_new_tokens: int | None = None, num_beams: int | None = None) -> RowPlan:
        """How a row through this adapter is generated: the caller's settings, else the adapter's own."""
        generation = self.metadata.generation
        return RowPlan(self.spec, self.metadata.max_source_length, max_new_tokens or generation.max_new_tokens,
                       num_beams or generation.num_beams, adapter=self, labels=self.labels)

    @property
    def labels(self) -> tuple[str, ...] | None:
        """A classifier's labels, or the label set a seq2seq adapter records (trained on a label task),
        to which its generation is constrained by default."""
        if self.head is not None:
            return self.head.classifier.labels
        return tuple(self.metadata.labels) if self.metadata.labels else None

    @functools.cached_property
    def memory_bytes(self) -> int:
        # Cached: its tensors never change, and a store sums this over every resident adapter.
        return self.lora.nbytes + sum(t.nbytes for t in self.fusion.values()) + (self.head.nbytes if self.head else 0)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "base": self.metadata.base.get("model_id"),
            "rank": self.metadata.lora.get("r"),
            "input_fields": self.spec.input_fields,
            "input_template": self.spec.input_template,
            "target_field": self.spec.target_field,
            "fusion_mode": self.spec.fusion_mode,
            "task": "classification" if self.head is not None else "seq2seq",
            "labels": list(self.labels) if self.labels else None,
            "file_bytes": self.file_bytes,
            "memory_bytes": self.memory_bytes,
            "metrics": self.metadata.scalar_metrics,
        }


def check_adapter_name(name: str, hub: bool = False) -> None:
    """Names are plain words: they appear in URLs and never reach outside an adapters dir. With `hub`,
    a Hub repo id (org/name, optionally @revision) is a name too."""
    if isinstance(name, str) and ".." not in name and (ADAPTER_NAME.match(name) or (hub and HUB_NAME.match(name))):
        return
    also = "; or a Hub repo id org/name[@revision]" if hub else ""
    raise AdapterError(
        f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' "
        f"(starting with a letter or digit, at most {MAX_ADAPTER_NAME} characters, no '..'){also}"
    )
