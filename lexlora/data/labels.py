"""The label set of a label task (model.task=classification, or seq2seq label generation), checked
against the splits before any training, and class weights for imbalanced labels.

Labels are the target field's values compared after `strip()` (" pos" and "pos" are one label);
case is kept ("Pos" and "pos" are two). A label the model never saw in training is refused when it
appears in validation or test: the model could never predict it, and scoring it would be silently
wrong. torch is imported only by `class_weights`, so reading an adapter's label set stays torch-free.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lexlora.data.records import MAX_REPORTED_PROBLEMS, Record
from lexlora.errors import AdapterError, ConfigError, DataError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TRAIN = "train"
WEIGHT_MODES = ("none", "balanced")


@dataclass(frozen=True)
class LabelSet:
    """The labels of a task, sorted; a label's id is its index (the classifier head's row)."""

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if list(self.labels) != sorted(set(self.labels)):
            raise ValueError(f"LabelSet labels must be sorted and distinct; got {list(self.labels)}")

    def __len__(self) -> int:
        return len(self.labels)

    def id(self, label: str) -> int:
        """The id of `label` (stripped); a label outside the set is a DataError naming the set."""
        index = self._index.get(label.strip())
        if index is None:
            raise DataError(f"label {label!r} is not one of the {len(self.labels)} labels ({_shown(self.labels)})")
        return index

    @cached_property
    def _index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def to_dict(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "lexlora.json") -> "LabelSet":
        """The label set saved by `to_dict`; anything else is an AdapterError naming `source`."""
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list) or not all(isinstance(label, str) and label.strip() for label in labels):
            raise AdapterError(f"{source}: the label set must be {{'labels': [non-empty strings]}}; got {data!r}")
        if labels != sorted(set(labels)) or any(label != label.strip() for label in labels):
            raise AdapterError(f"{source}: the labels must be stripped, distinct and sorted; got {labels}")
        return cls(tuple(labels))


def label_set(splits: Mapping[str, Sequence[Record]], target_field: str, source: str) -> LabelSet:
    """The sorted labels of the train split's `target_field`, after checking every split:
    an empty label, fewer than two labels in train, or a label in another split that train lacks
    is a DataError naming `source`, the split, the line and the label; a train label with one row,
    or absent from validation, is a logged warning."""
    if TRAIN not in splits:
        raise DataError(f"{source}: a label task needs a train split; data.splits has {', '.join(splits) or 'none'}")
    labels = {name: [(record, record.fields[target_field].strip()) for record in rows] for name, rows in splits.items()}
    for name, pairs in labels.items():
        empty = [record.place for record, label in pairs if not label]
        if empty:
            more = f" and {len(empty) - MAX_REPORTED_PROBLEMS} more" if len(empty) > MAX_REPORTED_PROBLEMS else ""
            raise DataError(f"{source}: {len(empty)} empty label(s) in field {target_field!r} of the {name} split: "
                            f"{', '.join(empty[:MAX_REPORTED_PROBLEMS])}{more}")
    counts = Counter(label for _, label in labels[TRAIN])
    if len(counts) < 2:
        only = f"only the label {next(iter(counts))!r}" if counts else "no label"
        raise DataError(f"{source}: the train split has {only} in field {target_field!r} "
                        f"({len(labels[TRAIN])} rows); a classifier needs at least two labels")
    unseen: dict[tuple[str, str], Record] = {}  # (split, label) -> its first record
    for name, pairs in labels.items():
        if name != TRAIN:
            for record, label in pairs:
                if label not in counts:
                    unseen.setdefault((name, label), record)
    if unseen:
        shown = "; ".join(f"{label!r} in the {name} split ({record.place})"
                          for (name, label), record in list(unseen.items())[:MAX_REPORTED_PROBLEMS])
        raise DataError(
            f"{source}: {len(unseen)} label(s) of field {target_field!r} never occur in the train split, so the "
            f"model could never predict them: {shown}. Train has: {_shown(sorted(counts))}. Re-split the data "
            "(data.splits, data.shuffle_seed) or fix the labels"
        )
    rare = sorted(label for label, n in counts.items() if n < 2)
    if rare:
        logger.warning("%s: label(s) with a single train row (little to learn from): %s", source, _shown(rare))
    if "validation" in labels:
        seen = {label for _, label in labels["validation"]}
        absent = sorted(set(counts) - seen)
        if absent:
            logger.warning("%s: train label(s) absent from the validation split (not measured there): %s",
                           source, _shown(absent))
    return LabelSet(tuple(sorted(counts)))


def class_weights(labels: LabelSet, train: Sequence[Record], target_field: str, mode: str) -> "torch.Tensor | None":
    """Loss weights by label id: "balanced" gives n / (k * count) (sklearn's), float32; "none" None."""
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"classifier.class_weights must be one of {', '.join(WEIGHT_MODES)}; got {mode!r}")
    if mode == "none":
        return None
    import torch

    counts = Counter(labels.id(record.fields[target_field]) for record in train)
    missing = [labels.labels[i] for i in range(len(labels)) if not counts[i]]
    if missing:
        raise DataError(f"balanced class weights: label(s) {_shown(missing)} have no train row")
    n, k = sum(counts.values()), len(labels)
    return torch.tensor([n / (k * counts[i]) for i in range(k)], dtype=torch.float32)


def _shown(labels: Sequence[str]) -> str:
    more = f", ... ({len(labels)} in all)" if len(labels) > MAX_REPORTED_PROBLEMS else ""
    return ", ".join(map(repr, labels[:MAX_REPORTED_PROBLEMS])) + more
