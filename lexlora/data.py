"""Prompts, deterministic splits, tokenization and the batch collator.

records -> prompts + targets -> token ids (no padding here) -> collator pads per batch.
"""

from __future__ import annotations

import logging
import random
import string
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from lexlora.config import DataConfig
from lexlora.errors import ConfigError, DataError
from lexlora.records import Record, long_target_error, read_records

logger = logging.getLogger(__name__)


class PromptTemplate:
    """A `str.format` template over named record fields, e.g. "Filename: {filename} Description:"."""

    def __init__(self, template: str):
        self.template = template
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigError(f"data.input_template {template!r} is not a valid template: {exc}") from None
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                raise ConfigError(
                    f"data.input_template {template!r}: {{{name}}} must name a record field, e.g. {{filename}}"
                )
            if name not in fields:
                fields.append(name)
        if not fields:
            raise ConfigError(f"data.input_template {template!r} names no field, e.g. {{filename}}")
        self.fields = tuple(fields)

    def format(self, record: Mapping[str, str]) -> str:
        return self.template.format(**{name: record[name] for name in self.fields})


def lexical_field_for(template: PromptTemplate, lexical_field: str | None) -> str:
    if lexical_field is not None:
        return lexical_field
    if len(template.fields) == 1:
        return template.fields[0]
    raise ConfigError(
        f"data.input_template uses several fields {template.fields}; "
        "set data.lexical_field to the one whose text feeds the fusion projection"
    )


def required_fields(data: DataConfig, fusion_enabled: bool) -> tuple[PromptTemplate, str | None, list[str]]:
    template = PromptTemplate(data.input_template)
    lexical = lexical_field_for(template, data.lexical_field) if fusion_enabled else None
    fields = list(template.fields)
    for extra in (data.target_field, lexical):
        if extra is not None and extra not in fields:
            fields.append(extra)
    return template, lexical, fields


def split_records(records: Sequence[Record], splits: Mapping[str, str], shuffle_seed: int | None, source: str = "data") -> dict[str, list[Record]]:
    """Slice the records with `datasets` split syntax (`[:85%]`, `[100:200]`), deterministically."""
    from datasets import ReadInstruction

    ordered = list(records)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
    result: dict[str, list[Record]] = {}
    for name, spec in splits.items():
        spec = spec.strip()
        text = spec if spec.startswith("all") else f"all{spec}" if spec.startswith("[") else spec
        try:
            instructions = ReadInstruction.from_spec(text).to_absolute({"all": len(ordered)})
        except (ValueError, AssertionError) as exc:
            raise DataError(
                f"data.splits.{name}={spec!r} is not a valid slice (e.g. '[:85%]', '[85%:95%]', '[:1000]', 'all'): {exc}"
            ) from None
        rows: list[Record] = []
        for instruction in instructions:
            rows.extend(ordered[instruction.from_ : instruction.to])
        if not rows:
            raise DataError(f"data.splits.{name}={spec!r} leaves the {name} split of {source} empty ({len(ordered)} records)")
        result[name] = rows
    return result


def load_splits(data: DataConfig, fusion_enabled: bool) -> tuple[dict[str, list[Record]], PromptTemplate, str | None]:
    template, lexical, fields = required_fields(data, fusion_enabled)
    records = read_records(data.path, fields, data.target_field, data.format, data.skip_invalid,
                           id_field=data.id_field, on_duplicate_id=data.on_duplicate_id)
    return split_records(records, data.splits, data.shuffle_seed, data.path), template, lexical


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
        """Per example, the tokens a batch pads it to: input + label ids (for length grouping)."""
        return [len(a) + len(b) for a, b in zip(self.input_ids, self.labels)]

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
