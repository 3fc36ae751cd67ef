"""The one generation path, shared by a single trained model (`LexLoraModel.generate_text`) and the
many-adapter registry (`lexlora.serving.registry.LexLoRA`):

    raw inputs -> records (each row's AdapterSpec) -> prompts -> tokens (each row truncated to its
    adapter's source length, then padded together) -> lexical vectors (one encode per embedding
    model) -> fused encoder inputs -> the encoder once -> decode from its outputs -> text

Decoding goes through `encoder_outputs=` because transformers' generate() cannot take the lexical
vectors itself (transformers #12844, #11530). What differs between callers is only how the rows'
adapters are applied: a `Backend` fuses each row's lexical vector into its token embeddings and
routes each row through its adapter's weights while the model runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lexlora.data.embeddings import LexicalEncoder
from lexlora.data.spec import AdapterSpec
from lexlora.errors import DataError


@dataclass(frozen=True)
class RowPlan:
    """How one input row is generated: its adapter's spec and settings; `adapter` is whatever the
    backend needs to route the row (rows with the same `adapter` share a fusion projection);
    `labels`, when set, the label set the row is constrained to."""

    spec: AdapterSpec
    max_source_length: int
    max_new_tokens: int
    num_beams: int
    adapter: Any = None
    labels: tuple[str, ...] | None = None  # set: the row is scored over these labels (label_scoring.py)


class Backend(Protocol):
    """What a caller of the pipeline provides: the seq2seq model to run and how rows get their adapters."""

    seq2seq: PreTrainedModel  # has get_input_embeddings(), get_encoder() and generate()
    uses_fusion: bool  # False: nothing to embed (e.g. adapters disabled)

    def fused_inputs(self, plans: Sequence[RowPlan], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     lexical: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def routed(self, plans: Sequence[RowPlan]) -> AbstractContextManager: ...


class GenerationPipeline:
    """Tokenize, embed, fuse, encode once and decode, for rows that may each use another adapter."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, encoder_for: Callable[[str], LexicalEncoder]):
        self.tokenizer = tokenizer
        self.encoder_for = encoder_for  # embedding model id -> its (shared, cached) encoder

    # ---- the stages ---------------------------------------------------------------------------------
    @staticmethod
    def records(plans: Sequence[RowPlan], inputs: Sequence[str | Mapping[str, str]]) -> list[dict[str, str]]:
        """Each raw input as a record of its adapter's fields (a string fills a single field)."""
        return [plan.spec.format_input(item, i) for i, (plan, item) in enumerate(zip(plans, inputs))]

    def lexical(self, backend: Backend, plans: Sequence[RowPlan], records: Sequence[dict[str, str]]) -> list[torch.Tensor | None]:
        """Each fusion row's lexical vector (None for rows without fusion), one encode per embedding model."""
        vectors: list[torch.Tensor | None] = [None] * len(records)
        if not backend.uses_fusion:
            return vectors
        by_model: dict[str, list[int]] = {}
        for row, plan in enumerate(plans):
            if plan.spec.fusion_enabled:
                by_model.setdefault(plan.spec.embedding_model or "", []).append(row)
        for model_id, rows in by_model.items():
            encoded = self.encoder_for(model_id).encode([records[i][plans[i].spec.lexical_field] for i in rows])
            for row, vector in zip(rows, encoded):
                vectors[row] = vector
        return vectors

    def token_ids(self, plans: Sequence[RowPlan], records: Sequence[dict[str, str]]) -> list[list[int]]:
        """Each row's prompt as token ids, truncated to its own adapter's source length."""
        return [
            self.tokenizer(p.spec.template.format(r), truncation=True, max_length=p.max_source_length)["input_ids"]
            for p, r in zip(plans, records)
        ]

    def embed_ids(self, backend: Backend, plans: Sequence[RowPlan], ids: Sequence[Sequence[int]],
                  lexical: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids padded together and embedded with each row's fusion."""
        enc = self.tokenizer.pad([{"input_ids": list(i)} for i in ids], return_tensors="pt").to(_device(backend.seq2seq))
        return backend.fused_inputs(plans, enc["input_ids"], enc["attention_mask"], lexical)

    def encoder_inputs(self, backend: Backend, plans: Sequence[RowPlan], records: Sequence[dict[str, str]],
                       lexical: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids, each row truncated to its own adapter's source length then padded together,
        embedded with each row's fusion."""
        return self.embed_ids(backend, plans, self.token_ids(plans, records), lexical)

    def encoded_chunks(self, backend: Backend, plans: Sequence[RowPlan], inputs: Sequence[str | Mapping[str, str]],
                       batch_size: int) -> Iterator[tuple[range, list[RowPlan], torch.Tensor, torch.Tensor]]:
        """The rows in chunks of `batch_size`, each as (its row indices, their plans, fused encoder
        input embeddings, mask): what scoring paths (label scores, classifier heads) run the encoder on."""
        records = self.records(plans, check_input_list(inputs))
        lexical = self.lexical(backend, plans, records)
        for start in range(0, len(records), batch_size):
            rows = range(start, min(start + batch_size, len(records)))
            chunk = [plans[i] for i in rows]
            embeds, mask = self.encoder_inputs(backend, chunk, [records[i] for i in rows], [lexical[i] for i in rows])
            yield rows, chunk, embeds, mask

    # ---- the whole path -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, backend: Backend, plans: Sequence[RowPlan], inputs: Sequence[str | Mapping[str, str]],
                 *, batch_size: int = 32, **generate_kwargs: Any) -> list[str]:
        """One output per input. Rows whose generation settings differ run in separate batches, so a
        row's output is the same as when its adapter runs alone."""
        records = self.records(plans, check_input_list(inputs))
        lexical = self.lexical(backend, plans, records)
        by_settings: dict[tuple[int, int], list[int]] = {}
        for row, plan in enumerate(plans):
            by_settings.setdefault((plan.max_new_tokens, plan.num_beams), []).append(row)
        outputs: list[str] = [""] * len(records)
        for (new_tokens, beams), rows in by_settings.items():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                chunk_plans = [plans[i] for i in chunk]
                embeds, mask = self.encoder_inputs(backend, chunk_plans, [records[i] for i in chunk], [lexical[i] for i in chunk])
                with backend.routed(chunk_plans):
                    ids = generate_from_embeds(backend.seq2seq, embeds, mask, max_new_tokens=new_tokens, num_beams=beams,
                                               **generate_kwargs)
                for row, text in zip(chunk, self.decode(ids)):
                    outputs[row] = text
        return outputs

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def encoder_for_id(current: LexicalEncoder | None, model_id: str, device: Any) -> LexicalEncoder:
    """A one-adapter model's lexical encoder: `current` when it embeds with `model_id` (a run's own,
    with its cache and batch size), else a new one by id (its model loads on first use)."""
    if current is not None and current.model_id == model_id:
        return current
    return LexicalEncoder(model_id, device=device)


def check_input_list(inputs: Any) -> Sequence[str | Mapping[str, str]]:
    """A list of inputs, not one (a lone string would otherwise run as one row per character)."""
    if isinstance(inputs, (str, Mapping)):
        raise DataError("inputs must be a list of strings or records, not a single one")
    return inputs


def generate_from_embeds(model: PreTrainedModel, embeds: torch.Tensor, mask: torch.Tensor, **generate_kwargs: Any) -> torch.Tensor:
    """Run the encoder once on the (fused) input embeddings and decode from its outputs (greedy or
    beam: `num_beams`, `max_new_tokens`, ... are passed to transformers)."""
    encoder_outputs = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    return model.generate(encoder_outputs=encoder_outputs, attention_mask=mask, **generate_kwargs)


def _device(model: PreTrainedModel) -> torch.device:
    return model.get_input_embeddings().weight.device
