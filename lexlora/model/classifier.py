"""Classifier-head adapters (model.task=classification): a frozen encoder with PEFT LoRA on its
attention, the fusion projection on its input as for seq2seq, and a new head trained in full:

    fused token embeddings -> encoder (LoRA) -> pooling (mean or first position) -> dropout -> Linear -> logits

The head's weights are saved with the adapter under `classification_head.`; its label <-> id map
(labels sorted, id = index) and pooling go to lexlora.json's `classifier` section. Inference returns
the label and the probability of every label (`LabelPrediction`, as label-constrained seq2seq
adapters do); `classify` runs rows that may each use another adapter (the registry's mixed batches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from lexlora.config import POOLINGS, DataConfig
from lexlora.data.embeddings import LexicalEncoder
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError
from lexlora.model.generation import GenerationPipeline, RowPlan, check_input_list
from lexlora.model.label_scoring import LabelPrediction
from lexlora.model.lora_model import LexLoraModel

HEAD_PREFIX = "classification_head."  # the head's keys in the weights file (beside LoRA and fusion)
CLASSIFIER_SECTION = "classifier"  # lexlora.json's section: labels and pooling


@dataclass(frozen=True)
class ClassifierSpec:
    """What a classifier adapter predicts and how it reduces the encoder's states: saved with it."""

    labels: tuple[str, ...]
    pooling: str = "mean"

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "pooling": self.pooling}

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "ClassifierSpec":
        """lexlora.json's `classifier` section, checked (a hand-edited file fails here, naming the key)."""
        where = f"{source}: '{CLASSIFIER_SECTION}'"
        if not isinstance(raw, Mapping):
            raise AdapterError(f"{where} must be an object with labels and pooling")
        labels = raw.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise AdapterError(f"{where}.labels must list at least two non-empty label strings, got {labels!r}")
        if len(set(labels)) != len(labels):
            raise AdapterError(f"{where}.labels repeats a label: {labels!r}")
        pooling = raw.get("pooling", "mean")
        if pooling not in POOLINGS:
            raise AdapterError(f"{where}.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        return cls(tuple(labels), pooling)


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, width) encoder states -> (batch, width): the masked mean, or the first position."""
    if pooling == "first":
        return states[:, 0]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


class ClassificationHead(nn.Module):
    """Dropout, then Linear(width -> labels); trained in full, one per adapter."""

    def __init__(self, width: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(width, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(pooled))


class ClassifierBackend(Protocol):
    """What `classify` runs: rows' fused inputs and routing (as for generation), the encoder, and
    each row's head."""

    seq2seq: Any  # the model whose input embeddings the pipeline embeds with
    uses_fusion: bool

    def fused_inputs(self, plans, input_ids, attention_mask, lexical): ...

    def routed(self, plans): ...

    def encode(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def head_logits(self, plans: Sequence[RowPlan], states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]: ...


@torch.no_grad()
def classify(pipeline: GenerationPipeline, backend: ClassifierBackend, plans: Sequence[RowPlan],
             inputs: Sequence[str | Mapping[str, str]], *, batch_size: int = 32) -> list[LabelPrediction]:
    """One prediction per input over its plan's `labels`: records -> tokens -> fused embeddings (each
    row's adapter, as the generation pipeline does) -> encoder once (routed per row) -> each row's
    pooling and head."""
    out: list[LabelPrediction] = []
    for rows, chunk, embeds, mask in pipeline.encoded_chunks(backend, plans, inputs, batch_size):
        with backend.routed(chunk):
            states = backend.encode(embeds, mask)
        for plan, logits in zip(chunk, backend.head_logits(chunk, states, mask)):
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            names = plan.labels
            best = int(log_probs.argmax())
            out.append(LabelPrediction(names[best], dict(zip(names, log_probs.exp().tolist())),
                                       dict(zip(names, log_probs.tolist()))))
    return out


class LexClassifierModel(LexLoraModel):
    """A frozen encoder with LoRA, fusion and a classification head (one adapter, for training,
    evaluation and single-adapter use; many on one base: `lexlora.serving.registry.LexLoRA`)."""

    def __init__(self, peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, spec: AdapterSpec, fusion,
                 classifier: ClassifierSpec, head: ClassificationHead, encoder: LexicalEncoder | None = None,
                 max_source_length: int | None = None, class_weights: torch.Tensor | None = None):
        super().__init__(peft_model, tokenizer, spec, fusion, encoder, None, max_source_length)
        self.classifier = classifier
        self.classification_head = head
        # Loss weights per label (classifier.class_weights); not part of the adapter's weights.
        self.register_buffer("class_weights", class_weights, persistent=False)

    @classmethod
    def create_classifier(cls, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora_config: LoraConfig,
                          spec: AdapterSpec, classifier: ClassifierSpec, *, dropout: float = 0.1,
                          encoder: LexicalEncoder | None = None, max_source_length: int | None = None,
                          class_weights: torch.Tensor | None = None) -> "LexClassifierModel":
        """A fresh classifier adapter: LoRA B = 0 and zero fusion (the encoder computes what the base
        does), and a new head initialised from torch's global RNG (seed it first)."""
        from lexlora.model.encoders import hidden_width

        peft_model, fusion = cls.wrap_base(base, lora_config, spec)
        head = ClassificationHead(hidden_width(base), len(classifier.labels), dropout)
        head.to(base.get_input_embeddings().weight.device)
        return cls(peft_model, tokenizer, spec, fusion, classifier, head, encoder, max_source_length, class_weights)

    def own_modules(self) -> dict[str, nn.Module]:
        return {**super().own_modules(), HEAD_PREFIX: self.classification_head}

    @property
    def labels(self) -> tuple[str, ...]:
        return self.classifier.labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                lexical_embeds: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, lexical_embeds)
        logits = self.classification_head(pool(self.encode(embeds, mask), mask, self.classifier.pooling))
        loss = None
        if labels is not None:
            weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
            loss = F.cross_entropy(logits.float(), labels.to(logits.device), weight=weight)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def encode(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last states (LoRA applied: PEFT injected its layers into the base)."""
        return self.base_model(inputs_embeds=embeds, attention_mask=mask, return_dict=True).last_hidden_state

    def generate(self, *args: Any, **kwargs: Any):
        raise AdapterError("a classifier adapter predicts labels: use classify_text() (or generate_text() for the labels alone)")

    @torch.no_grad()
    def classify_text(self, inputs: Sequence[str | Mapping[str, str]], batch_size: int = 32,
                      max_source_length: int | None = None) -> list[LabelPrediction]:
        """The label and every label's probability, per raw input (a string or a record)."""
        plan = RowPlan(self.spec, max_source_length or self.max_source_length or DataConfig.max_source_length, 1, 1,
                       labels=self.labels)
        count = len(check_input_list(inputs))
        was_training = self.training
        self.eval()
        try:
            return classify(self.pipeline, self, [plan] * count, inputs, batch_size=batch_size)
        finally:
            self.train(was_training)

    def generate_labels(self, inputs: Sequence[str | Mapping[str, str]], batch_size: int = 32,
                        max_source_length: int | None = None) -> list[LabelPrediction]:
        """`classify_text` under the name a label-constrained seq2seq adapter uses."""
        return self.classify_text(inputs, batch_size, max_source_length)

    def generate_text(self, inputs: Sequence[str | Mapping[str, str]], batch_size: int = 32,
                      max_source_length: int | None = None, **ignored: Any) -> list[str]:
        """The predicted labels (what evaluation scores; generation settings do not apply)."""
        return [p.label for p in self.classify_text(inputs, batch_size, max_source_length)]

    # The ClassifierBackend protocol: this model's own LoRA, fusion and head for every row.
    def head_logits(self, plans: Sequence[RowPlan], states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return list(self.classification_head(pool(states, mask, self.classifier.pooling)))
