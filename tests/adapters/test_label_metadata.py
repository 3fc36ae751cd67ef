"""lexlora.json's `labels`: written only when set, read back as written, and a malformed one refused
naming the key."""

import pytest

from lexlora.adapters.format import AdapterMetadata
from lexlora.errors import AdapterError

RAW = {"format_version": 1, "base": {}, "adapter": {}, "weights": {}}


def test_labels_round_trip_and_are_omitted_when_unset():
    meta = AdapterMetadata.from_dict({**RAW, "labels": ["a", "b c"]})
    assert meta.labels == ["a", "b c"]
    assert AdapterMetadata.from_dict(meta.to_dict()).labels == ["a", "b c"]
    plain = AdapterMetadata.from_dict(RAW)
    assert plain.labels is None and "labels" not in plain.to_dict()
    assert AdapterMetadata.from_dict({**RAW, "labels": None}).labels is None


@pytest.mark.parametrize("labels, message", [
    ("a", r"'labels' must be a non-empty list of strings or null, got 'a'"),
    ([], r"'labels' must be a non-empty list"),
    (["a", 3], r"'labels'\[1\] must be a string, got 3"),
    (["a", "b", "a"], r"'labels' lists a label twice: \['a'\]"),
])
def test_bad_labels_are_refused_naming_the_key(labels, message):
    with pytest.raises(AdapterError, match=message):
        AdapterMetadata.from_dict({**RAW, "labels": labels}, "x/lexlora.json")
