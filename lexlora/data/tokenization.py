"""Tokenization and the batch collator: records -> token ids (no padding here) -> padded per batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from lexlora.config import DataConfig
from lexlora.data.prompts import PromptTemplate
from lexlora.data.records import Record, long_target_error
from lexlora.errors import DataError

logger = logging.getLogger(__name__)


class EncodedSplit(Dataset):
    """Token ids (unpadded) + targets + optional lexical vectors for one split."""

    def __init__(
        self,
        records: Sequence[Record],
        input_ids: list[list[int]],
        labels: list[list[int]],
        lexical_embeds: torch.Tensor | None,
    ):
        self.records = list(records)
        self.input_ids = input_ids
        self.labels = labels
        self.lexical_embeds = lexical_embeds

    def __len__(self) -> int:
        return len(self.input_ids)

    def token_lengths(self) -> list[int]:
        """Per example, the tokens a batch pads it to: input + label ids (for length grouping; a
        classifier's label is one id)."""
        return [len(a) + (len(b) if isinstance(b, list) else 1) for a, b in zip(self.input_ids, self.labels)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
        if self.lexical_embeds is not None:
            item["lexical_embeds"] = self.lexical_embeds[index]
        return item


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated_targets: int


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_source_length: int,
    max_target_length: int,
) -> Tokenized:
    sources = tokenizer(list(prompts), truncation=True, max_length=max_source_length)
    # Tokenized twice to count truncations: transformers 5 tokenizers no longer expose
    # build_inputs_with_special_tokens to finish a manually truncated sequence; targets are short.
    full = tokenizer(text_target=list(targets), truncation=False)
    labels = tokenizer(text_target=list(targets), truncation=True, max_length=max_target_length)
    truncated = sum(len(a) > len(b) for a, b in zip(full["input_ids"], labels["input_ids"]))
    return Tokenized(sources["input_ids"], labels["input_ids"], truncated)


def encode_split(
    records: Sequence[Record],
    template: PromptTemplate,
    target_field: str,
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    lexical_embeds: torch.Tensor | None,
    name: str = "train",
) -> EncodedSplit:
    prompts = [template.format(r.fields) for r in records]
    targets = [r.fields[target_field] for r in records]
    tokens = tokenize(tokenizer, prompts, targets, data.max_source_length, data.max_target_length)
    if tokens.truncated_targets and data.on_long_target == "refuse":
        lengths = [len(ids) for ids in tokenizer(text_target=targets, truncation=False)["input_ids"]]
        raise long_target_error(data.path, name, records, lengths, data.max_target_length)
    if tokens.truncated_targets:
        logger.warning(
            "%s split: %d of %d targets are longer than data.max_target_length=%d tokens and were truncated",
            name, tokens.truncated_targets, len(targets), data.max_target_length,
        )
    return EncodedSplit(records, tokens.input_ids, tokens.labels, lexical_embeds)


def encode_class_split(
    records: Sequence[Record],
    template: PromptTemplate,
    target_field: str,
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    label_ids: dict[str, int],
) -> EncodedSplit:
    """A classifier's split: prompts as token ids, each target (stripped) as its label id."""
    prompts = [template.format(r.fields) for r in records]
    input_ids = tokenizer(prompts, truncation=True, max_length=data.max_source_length)["input_ids"]
    labels = [label_ids[r.fields[target_field].strip()] for r in records]
    return EncodedSplit(records, input_ids, labels, None)


class ClassificationCollator:
    """Pads input ids to the longest in the batch (transformers' DataCollatorWithPadding), stacks the
    label ids and the lexical vectors."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorWithPadding

        self.padding = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.padding([{"input_ids": f["input_ids"]} for f in features]))
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        if "lexical_embeds" in features[0]:
            batch["lexical_embeds"] = torch.stack([torch.as_tensor(f["lexical_embeds"]) for f in features])
        return batch


class LexicalCollator:
    """Pads input ids and labels to the longest in the batch (labels with -100, optionally to a
    multiple of `pad_to_multiple_of`) via transformers' DataCollatorForSeq2Seq, and stacks the
    lexical vectors as (batch, dim)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        self.seq2seq = DataCollatorForSeq2Seq(
            tokenizer,
            label_pad_token_id=-100,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="pt",
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lexical = [f["lexical_embeds"] for f in features if "lexical_embeds" in f]
        rest = [{k: v for k, v in f.items() if k != "lexical_embeds"} for f in features]
        batch = dict(self.seq2seq(rest))
        if lexical:
            if len(lexical) != len(features):
                raise DataError("some examples in the batch have lexical embeddings and some do not")
            batch["lexical_embeds"] = torch.stack([torch.as_tensor(v) for v in lexical])
        return batch
