import pytest
import torch

from lexlora.config import DataConfig
from lexlora.data.prompts import PromptTemplate
from lexlora.data.records import Record
from lexlora.data.splits import load_splits, split_records
from lexlora.data.tokenization import LexicalCollator, encode_split
from lexlora.errors import ConfigError, DataError
from tests.conftest import FILE_DESCRIPTIONS, requires_shared_data

SEED_PROMPT = (
    "Given the following filename, generate a short description of what the file is likely about. "
    "Filename: {filename} Description:"
)


def records(n):
    return [Record(i + 1, {"filename": f"f{i}", "file_desc": f"d{i}"}) for i in range(n)]


def test_template_fields_and_format():
    template = PromptTemplate(SEED_PROMPT)
    assert template.fields == ("filename",)
    assert template.format({"filename": "backup_config"}).endswith("Filename: backup_config Description:")
    with pytest.raises(ConfigError, match="names no field"):
        PromptTemplate("no fields")
    with pytest.raises(ConfigError, match="must name a record field"):
        PromptTemplate("{0}")


def test_percent_and_count_splits_are_deterministic():
    rows = records(10)
    splits = split_records(rows, {"train": "[:80%]", "validation": "[80%:]"}, None)
    assert [r.line for r in splits["validation"]] == [9, 10]
    counts = split_records(rows, {"train": "[:3]", "test": "[-2:]"}, None)
    assert len(counts["train"]) == 3 and [r.line for r in counts["test"]] == [9, 10]
    a = split_records(rows, {"train": "[:5]"}, shuffle_seed=7)["train"]
    b = split_records(rows, {"train": "[:5]"}, shuffle_seed=7)["train"]
    assert a == b and a != rows[:5]


def test_bad_or_empty_split_is_refused():
    with pytest.raises(DataError, match="not a valid slice"):
        split_records(records(10), {"train": "[abc]"}, None)
    with pytest.raises(DataError, match="leaves the validation split .* empty"):
        split_records(records(10), {"train": "[:100%]", "validation": "[100%:]"}, None)


@requires_shared_data()
def test_seed_split_of_file_description_is_1707_201_100():
    data = DataConfig(
        path=str(FILE_DESCRIPTIONS / "file_description.jsonl"), input_template=SEED_PROMPT,
        target_field="file_desc", splits={"train": "[:85%]", "validation": "[85%:95%]", "test": "[95%:]"},
    )
    splits, template, lexical = load_splits(data, fusion_enabled=True)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1707, "validation": 201, "test": 100}
    assert lexical == "filename" and splits["test"][0].line == 1909


def test_template_field_missing_from_data_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"filename": "a", "file_desc": "b"}\n')
    data = DataConfig(path=str(path), input_template="{file} in {directory}", target_field="file_desc")
    with pytest.raises(DataError, match="field 'file' is missing"):
        load_splits(data, fusion_enabled=False)
    with pytest.raises(ConfigError, match="data.lexical_field"):
        load_splits(data, fusion_enabled=True)


def test_collator_pads_to_longest_and_masks_labels(tokenizer):
    rows = [Record(1, {"filename": "a", "file_desc": "short"}),
            Record(2, {"filename": "a_much_longer_file_name_here", "file_desc": "a much longer target text here"})]
    split = encode_split(rows, PromptTemplate("File: {filename}"), "file_desc", tokenizer, DataConfig(), torch.ones(2, 384))
    batch = LexicalCollator(tokenizer)([split[0], split[1]])
    assert batch["input_ids"].shape == (2, max(len(split.input_ids[0]), len(split.input_ids[1])))
    assert batch["attention_mask"][0].sum() == len(split.input_ids[0])
    n0 = len(split.labels[0])
    assert (batch["labels"][0, n0:] == -100).all() and (batch["labels"][0, :n0] != -100).all()
    assert batch["lexical_embeds"].shape == (2, 384)
    padded = LexicalCollator(tokenizer, pad_to_multiple_of=8)([split[0], split[1]])
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["labels"].shape[1] % 8 == 0


def test_long_targets_are_truncated_and_counted(tokenizer, caplog):
    rows = [Record(1, {"filename": "a", "file_desc": "word " * 200})]
    data = DataConfig(max_target_length=16)
    split = encode_split(rows, PromptTemplate("{filename}"), "file_desc", tokenizer, data, None)
    assert len(split.labels[0]) == 16 and "1 of 1 targets" in caplog.text


# ---- splits named by the source (a DatasetDict: train, test, ...) ------------------------------------

def split_source(train=8, test=3):
    return ([Record(i, {"filename": f"tr{i}", "file_desc": "d"}, "train", "row") for i in range(train)]
            + [Record(i, {"filename": f"te{i}", "file_desc": "d"}, "test", "row") for i in range(test)])


def test_values_may_name_the_sources_own_splits():
    rows = split_source()
    splits = split_records(rows, {"train": "train[:75%]", "validation": "train[75%:]", "test": "test"}, None, "imdb")
    assert [r.fields["filename"] for r in splits["validation"]] == ["tr6", "tr7"]
    assert [r.fields["filename"] for r in splits["test"]] == ["te0", "te1", "te2"]
    assert len(splits["train"]) == 6
    both = split_records(rows, {"train": "train[:2]+test[-1:]"}, None)["train"]
    assert [r.fields["filename"] for r in both] == ["tr0", "tr1", "te2"]
    # Shuffled within each source split: test stays test, and the same seed gives the same rows.
    a = split_records(rows, {"train": "train[:4]", "test": "test"}, shuffle_seed=3)
    b = split_records(rows, {"train": "train[:4]", "test": "test"}, shuffle_seed=3)
    assert a == b and {r.split for r in a["train"]} == {"train"} and len(a["test"]) == 3
    assert a["train"] != split_records(rows, {"train": "train[:4]"}, None)["train"]


def test_a_bare_slice_of_a_source_with_splits_takes_all_rows_and_warns(caplog):
    splits = split_records(split_source(), {"train": "[:10]", "test": "[10:]"}, None, "imdb")
    assert [r.fields["filename"] for r in splits["test"]] == ["te2"]
    assert "slices all 11 rows of imdb, its splits train, test one after another" in caplog.text


def test_a_split_the_source_lacks_is_named_with_those_it_has():
    with pytest.raises(DataError, match=r"data.splits.validation='validation' names the split 'validation', "
                                        r"which imdb lacks; it has: train, test"):
        split_records(split_source(), {"train": "train", "validation": "validation"}, None, "imdb")
    with pytest.raises(DataError, match=r"data.splits.train='train\[:90%\]' names the split 'train', but d.jsonl has "
                                        r"no splits of its own \(one file\)"):
        split_records(records(10), {"train": "train[:90%]"}, None, "d.jsonl")
    with pytest.raises(DataError, match=r"leaves the test split of imdb empty"):
        split_records(split_source(test=3), {"test": "test[3:]"}, None, "imdb")


def test_source_splits_are_what_the_values_read():
    from lexlora.data.splits import source_splits

    assert source_splits({"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}) == {"train", "test"}
    assert source_splits({"train": "train", "test": "[95%:]"}) is None  # a bare slice reads every split
    with pytest.raises(DataError, match="not a valid slice"):
        source_splits({"train": "train[abc]"})


def test_load_splits_of_a_dataset_directory_reads_only_the_named_splits(tmp_path, offline_datasets):
    from tests.data.conftest import imdb_like, write_dataset_dir

    # The unsupervised split's -1 labels would be errors: naming train and test leaves it unread.
    root = write_dataset_dir(tmp_path / "imdb", imdb_like())
    data = DataConfig(path=str(root), input_template="{text}", target_field="label",
                      splits={"train": "train[:75%]", "validation": "train[75%:]", "test": "test"})
    splits, template, lexical = load_splits(data, fusion_enabled=True)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validation": 2, "test": 2}
    assert lexical == "text" and [r.fields["label"] for r in splits["test"]] == ["pos", "neg"]
    data.splits = {"train": "train", "validation": "validation"}
    with pytest.raises(DataError, match=r"has no split 'validation' \(named in data.splits\)"):
        load_splits(data, fusion_enabled=False)
