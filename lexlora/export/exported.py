"""An export dir loaded back with its fusion working: the merged transformers model, the fusion
projection from model.safetensors, and the adapter's input settings, generating through lexlora's
one pipeline (`lexlora.model.generation`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from lexlora.data.embeddings import LexicalEncoder
from lexlora.data.spec import AdapterSpec
from lexlora.errors import AdapterError
from lexlora.export.layout import FUSION_KEY_PREFIX, MODEL_WEIGHTS_NAME, ExportMetadata
from lexlora.model.fusion import LexicalFusion, encoder_input_width
from lexlora.model.generation import (
    GenerationPipeline,
    RowPlan,
    check_input_list,
    encoder_for_id,
)


class ExportedModel:
    """A merged model with its fusion projection (None: fusion off) and input settings; the
    generation `Backend` for it (one adapter, already merged: nothing to route)."""

    def __init__(self, seq2seq: PreTrainedModel, tokenizer, spec: AdapterSpec, fusion: LexicalFusion | None,
                 max_new_tokens: int, num_beams: int, max_source_length: int):
        self.seq2seq = seq2seq
        self.tokenizer = tokenizer
        self.spec = spec
        self.fusion = fusion
        self.max_new_tokens, self.num_beams, self.max_source_length = max_new_tokens, num_beams, max_source_length
        self.lexical_encoder: LexicalEncoder | None = None  # loaded by spec.embedding_model on first use
        self.pipeline = GenerationPipeline(tokenizer, self._encoder_for)

    @property
    def uses_fusion(self) -> bool:
        return self.fusion is not None

    def fused_inputs(self, plans, input_ids: torch.Tensor, attention_mask: torch.Tensor, lexical):
        embeds = self.seq2seq.get_input_embeddings()(input_ids)
        if self.fusion is None:
            return embeds, attention_mask
        vectors = torch.stack(list(lexical)).to(input_ids.device)
        return self.fusion(embeds, attention_mask, vectors)

    def routed(self, plans) -> AbstractContextManager:
        return nullcontext()

    def to(self, device) -> ExportedModel:
        self.seq2seq.to(device)
        if self.fusion is not None:
            self.fusion.to(device)
        return self

    def plan(self, max_new_tokens: int | None = None, num_beams: int | None = None,
             max_source_length: int | None = None) -> RowPlan:
        return RowPlan(spec=self.spec, max_source_length=max_source_length or self.max_source_length,
                       max_new_tokens=max_new_tokens or self.max_new_tokens, num_beams=num_beams or self.num_beams)

    def _encoder_for(self, model_id: str) -> LexicalEncoder:
        self.lexical_encoder = encoder_for_id(self.lexical_encoder, model_id, self.seq2seq.device)
        return self.lexical_encoder

    @torch.no_grad()
    def generate_text(self, inputs: Sequence[str | Mapping[str, str]], batch_size: int = 32,
                      max_source_length: int | None = None, max_new_tokens: int | None = None,
                      num_beams: int | None = None, **generate_kwargs: Any) -> list[str]:
        """One output per raw input (a string or a record of the adapter's fields), as the adapter
        would give it; settings not given are the adapter's recorded ones."""
        plans = [self.plan(max_new_tokens, num_beams, max_source_length)] * len(check_input_list(inputs))
        return self.pipeline.generate(self, plans, inputs, batch_size=batch_size, **generate_kwargs)


def read_fusion(weights: Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The fusion projection's tensors from the export's weights file, without the rest."""
    try:
        with safe_open(str(weights), "pt") as handle:
            present = set(handle.keys())
            missing = [k for k in keys if k not in present]
            if missing:
                raise AdapterError(f"{weights}: the fusion projection's {missing[0]} is missing")
            return {k.removeprefix(FUSION_KEY_PREFIX): handle.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None


def load_export(directory: str | Path, dtype: torch.dtype | None = None) -> ExportedModel:
    """An export dir (`lexlora export`) with fusion working: `load_export(OUT).generate_text([...])`.
    The merged model is loaded in its saved dtype unless `dtype` is given."""
    directory = Path(directory)
    return open_export(directory, ExportMetadata.read(directory), dtype)


def open_export(directory: Path, meta: ExportMetadata, dtype: torch.dtype | None = None) -> ExportedModel:
    """`load_export` with the metadata already in hand (the exporter checks its staging dir so)."""
    try:
        spec = AdapterSpec(**meta.adapter)
    except TypeError as exc:
        raise AdapterError(f"{directory}: 'adapter' in its export metadata is not valid ({exc})") from None
    verbosity = hf_logging.get_verbosity()
    if meta.fusion_keys:
        hf_logging.set_verbosity_error()  # its load report lists the fusion keys, which are read below
    try:
        seq2seq = AutoModelForSeq2SeqLM.from_pretrained(str(directory), dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{directory}: transformers cannot load it ({type(exc).__name__}: {exc})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    seq2seq.requires_grad_(False)
    seq2seq.eval()
    fusion = None
    if spec.fusion_enabled:
        state = read_fusion(directory / MODEL_WEIGHTS_NAME, meta.fusion_keys)
        assert spec.embedding_dim is not None
        fusion = LexicalFusion(spec.embedding_dim, encoder_input_width(seq2seq), spec.fusion_mode or "add")
        try:
            fusion.load_state_dict(state)
        except RuntimeError as exc:
            raise AdapterError(f"{directory}: the fusion projection does not fit the model ({exc})") from None
        fusion.to(seq2seq.dtype).requires_grad_(False).eval()
    return ExportedModel(seq2seq, tokenizer, spec, fusion, max_new_tokens=int(meta.generation["max_new_tokens"]),
                         num_beams=int(meta.generation["num_beams"]), max_source_length=meta.max_source_length)
