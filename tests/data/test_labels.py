import logging

import pytest
import torch

from lexlora.data.labels import LabelSet, class_weights, label_set
from lexlora.data.records import Record
from lexlora.errors import AdapterError, ConfigError, DataError


def rows(labels, start=1, split=None, unit="line"):
    return [Record(start + i, {"text": f"t{i}", "label": label}, split, unit) for i, label in enumerate(labels)]


def test_label_set_is_sorted_stripped_and_ids_are_indices():
    splits = {"train": rows(["pos", " neg", "pos\n", "neg", "Neutral", "Neutral"]), "validation": rows(["neg", "pos", "Neutral"])}
    labels = label_set(splits, "label", "d.jsonl")
    assert labels.labels == ("Neutral", "neg", "pos")  # case kept: "Neutral" sorts first
    assert [labels.id(x) for x in ("Neutral", " neg ", "pos")] == [0, 1, 2] and len(labels) == 3
    with pytest.raises(DataError, match=r"label 'neutral' is not one of the 3 labels \('Neutral', 'neg', 'pos'\)"):
        labels.id("neutral")


def test_to_dict_round_trips_and_bad_saved_sets_are_adapter_errors():
    labels = LabelSet(("neg", "pos"))
    assert labels.to_dict() == {"labels": ["neg", "pos"]}
    assert LabelSet.from_dict(labels.to_dict()) == labels
    with pytest.raises(AdapterError, match=r"a/lexlora.json: the label set must be"):
        LabelSet.from_dict({"labels": ["neg", ""]}, source="a/lexlora.json")
    with pytest.raises(AdapterError, match="stripped, distinct and sorted"):
        LabelSet.from_dict({"labels": ["pos", "neg"]})
    with pytest.raises(AdapterError, match="the label set must be"):
        LabelSet.from_dict(["neg", "pos"])
    with pytest.raises(ValueError, match="sorted and distinct"):
        LabelSet(("b", "a"))


def test_empty_labels_name_the_split_and_lines():
    splits = {"train": rows(["pos", "neg"]), "test": rows(["pos", "  ", "", "neg"])}
    with pytest.raises(DataError, match=r"d.jsonl: 2 empty label\(s\) in field 'label' of the test split: line 2, line 3"):
        label_set(splits, "label", "d.jsonl")


def test_one_label_in_train_is_refused():
    with pytest.raises(DataError, match=r"d.jsonl: the train split has only the label 'pos' in field 'label' "
                                        r"\(3 rows\); a classifier needs at least two labels"):
        label_set({"train": rows(["pos", "pos ", "pos"])}, "label", "d.jsonl")
    with pytest.raises(DataError, match="needs a train split"):
        label_set({"validation": rows(["a", "b"])}, "label", "d.jsonl")


def test_a_label_train_lacks_is_named_with_its_split_and_first_line():
    splits = {"train": rows(["pos", "neg", "pos", "neg"]),
              "validation": rows(["pos", "meh", "meh"], start=5),
              "test": rows(["neg", "angry"], split="test", unit="row", start=0)}
    with pytest.raises(DataError) as caught:
        label_set(splits, "label", "imdb")
    message = str(caught.value)
    assert "imdb: 2 label(s) of field 'label' never occur in the train split" in message
    assert "'meh' in the validation split (line 6)" in message and "'angry' in the test split (test row 1)" in message
    assert "Train has: 'neg', 'pos'" in message


def test_rare_train_labels_and_labels_absent_from_validation_are_warned(caplog):
    splits = {"train": rows(["pos", "neg", "pos", "neg", "odd"]), "validation": rows(["pos", "pos"])}
    with caplog.at_level(logging.WARNING, logger="lexlora.data.labels"):
        labels = label_set(splits, "label", "d.jsonl")
    assert labels.labels == ("neg", "odd", "pos")
    assert "d.jsonl: label(s) with a single train row (little to learn from): 'odd'" in caplog.text
    assert "train label(s) absent from the validation split (not measured there): 'neg', 'odd'" in caplog.text
    caplog.clear()
    label_set({"train": rows(["a", "b", "a", "b"]), "validation": rows(["a", "b"])}, "label", "d.jsonl")
    assert caplog.text == ""


def test_balanced_class_weights_follow_sklearn():
    train = rows(["pos"] * 6 + ["neg"] * 2 + [" odd"])
    labels = label_set({"train": train}, "label", "d.jsonl")
    weights = class_weights(labels, train, "label", "balanced")
    # n / (k * count): 9 / (3 * 2), 9 / (3 * 1), 9 / (3 * 6) for neg, odd, pos
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor([1.5, 3.0, 0.5]))
    assert class_weights(labels, train, "label", "none") is None
    with pytest.raises(ConfigError, match="classifier.class_weights must be one of none, balanced"):
        class_weights(labels, train, "label", "inverse")
    with pytest.raises(DataError, match=r"label\(s\) 'odd' have no train row"):
        class_weights(labels, train[:8], "label", "balanced")
