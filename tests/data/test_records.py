import json

import pytest

from lexlora.data.records import read_records
from lexlora.errors import ConfigError, DataError

FIELDS = ["filename", "file_desc"]


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = {"filename": "backup_config", "file_desc": "It likely stores backup settings."}


def test_reads_jsonl_with_line_numbers(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD, "", {**GOOD, "filename": "b", "extra": 1}]))
    records = read_records(path, FIELDS, "file_desc")
    assert [r.line for r in records] == [1, 3]
    assert records[1].fields == {"filename": "b", "file_desc": GOOD["file_desc"]}


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"filename": "a", "file_desc": "x"', r"d\.jsonl line 2: malformed JSON"),
        ({"file_desc": "x"}, r"d\.jsonl line 2: field 'filename' is missing"),
        ({"filename": None, "file_desc": "x"}, r"d\.jsonl line 2: field 'filename' is null"),
        ({"filename": 12, "file_desc": "x"}, r"d\.jsonl line 2: field 'filename' must be a string, got int"),
        ({"filename": "a", "file_desc": "   "}, r"d\.jsonl line 2: target field 'file_desc' is empty"),
        ('["not", "an", "object"]', r"d\.jsonl line 2: expected an object"),
    ],
)
def test_bad_jsonl_records_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD, row, GOOD]))
    with pytest.raises(DataError, match=message):
        read_records(path, FIELDS, "file_desc")


def test_skip_invalid_skips_and_counts(tmp_path, caplog):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD, "{broken", {"filename": 3, "file_desc": "x"}, GOOD]))
    records = read_records(path, FIELDS, "file_desc", skip_invalid=True)
    assert [r.line for r in records] == [1, 4]
    assert "skipped 2 invalid record(s)" in caplog.text


def test_all_problems_are_counted_in_one_error(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD] + [{"filename": "a"}] * 15))
    with pytest.raises(DataError, match=r"15 invalid record\(s\)[\s\S]*and 5 more"):
        read_records(path, FIELDS, "file_desc")


def test_bom_crlf_and_bad_utf8(tmp_path):
    text = ("\ufeff" + json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode("utf-8")
    assert len(read_records(write(tmp_path, "ok.jsonl", text), FIELDS, "file_desc")) == 2
    bad = json.dumps(GOOD).encode() + b"\n" + b'{"filename": "\xff", "file_desc": "x"}\n'
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid UTF-8"):
        read_records(write(tmp_path, "bad.jsonl", bad), FIELDS, "file_desc")


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("w.jsonl", "\n  \r\n\n"), ("e.csv", ""),
                                         ("e.json", ""), ("a.json", " [ ] ")])
def test_empty_file_is_named(tmp_path, name, text):
    with pytest.raises(DataError, match=rf"{name}: the file is empty \(no records\)"):
        read_records(write(tmp_path, name, text), FIELDS, "file_desc")


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"no valid records \(2 invalid, all skipped\)"):
        read_records(write(tmp_path, "e.jsonl", jsonl(["{", "[]"])), FIELDS, "file_desc", skip_invalid=True)
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.jsonl", FIELDS, "file_desc")


def test_json_array_keeps_line_numbers(tmp_path):
    text = "[\n" + json.dumps(GOOD) + ",\n" + json.dumps({"filename": "x"}) + "\n]\n"
    with pytest.raises(DataError, match=r"d\.json line 3: field 'file_desc' is missing"):
        read_records(write(tmp_path, "d.json", text), FIELDS, "file_desc")
    good = "[" + json.dumps(GOOD) + ", " + json.dumps(GOOD) + "]"
    assert len(read_records(write(tmp_path, "g.json", good), FIELDS, "file_desc")) == 2


def test_csv_keeps_strings_and_reports_missing_columns(tmp_path):
    path = write(tmp_path, "d.csv", "filename,file_desc\n123,A number-named file.\nb,\n")
    with pytest.raises(DataError, match=r"d\.csv line 3: target field 'file_desc' is empty"):
        read_records(path, FIELDS, "file_desc")
    records = read_records(path, FIELDS, "file_desc", skip_invalid=True)
    assert records[0].fields["filename"] == "123"
    with pytest.raises(DataError, match=r"column\(s\) 'file_desc' missing"):
        read_records(write(tmp_path, "m.csv", "filename\na\n"), FIELDS, "file_desc")


def test_saved_hf_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {"filename": "b", "file_desc": ""}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds row 1: target field 'file_desc' is empty"):
        read_records(tmp_path / "ds", FIELDS, "file_desc")
    assert len(read_records(tmp_path / "ds", FIELDS, "file_desc", skip_invalid=True)) == 1


@pytest.mark.parametrize(
    "row, message",
    [
        ("[" * 5000 + "]" * 5000, r"d\.jsonl line 2: malformed JSON: nested too deeply"),
        ('{"filename": "a", "file_desc": ' + "7" * 5000 + "}", r"d\.jsonl line 2: malformed JSON: Exceeds the limit"),
        ('{"filename": "a\\ud800", "file_desc": "x"}', r"d\.jsonl line 2: field 'filename' is not valid text"),
        ('{"filename": "a", "file_desc": "\\t\\n "}', r"d\.jsonl line 2: target field 'file_desc' is empty"),
        ("null", r"d\.jsonl line 2: expected an object with fields, got NoneType"),
        ('"just a string"', r"d\.jsonl line 2: expected an object with fields, got str"),
        ({"filename": ["a"], "file_desc": "x"}, r"d\.jsonl line 2: field 'filename' must be a string, got list"),
        ({"filename": "a", "file_desc": True}, r"d\.jsonl line 2: field 'file_desc' must be a string, got bool"),
    ],
)
def test_pathological_rows_are_problems_not_crashes(tmp_path, row, message):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD, row, GOOD]))
    with pytest.raises(DataError, match=message):
        read_records(path, FIELDS, "file_desc")
    assert len(read_records(path, FIELDS, "file_desc", skip_invalid=True)) == 2


def test_bad_utf8_in_json_and_csv_names_the_line(tmp_path):
    good = json.dumps(GOOD).encode()
    with pytest.raises(DataError, match=r"d\.json line 3: not valid UTF-8"):
        read_records(write(tmp_path, "d.json", b"[\n" + good + b",\n" + good[:-2] + b'\xc3"}\n]'), FIELDS, "file_desc")
    with pytest.raises(DataError, match=r"d\.csv line 3: not valid UTF-8 \(byte 2 of the line"):
        read_records(write(tmp_path, "d.csv", b"filename,file_desc\na,b\nc\xff,d\n"), FIELDS, "file_desc")


def test_csv_with_bom_crlf_quoted_newlines_and_a_short_row(tmp_path):
    text = '\ufefffilename,file_desc\r\na,"two\r\nlines"\r\nb,desc b\r\n'.encode("utf-8")
    records = read_records(write(tmp_path, "ok.csv", text), FIELDS, "file_desc")
    assert [r.fields for r in records] == [{"filename": "a", "file_desc": "two\r\nlines"},
                                           {"filename": "b", "file_desc": "desc b"}]
    with pytest.raises(DataError, match=r"short\.csv line 3: field 'file_desc' is missing"):
        read_records(write(tmp_path, "short.csv", "filename,file_desc\na,b\nc\n"), FIELDS, "file_desc")
    huge = "filename,file_desc\na," + "x" * 200_000 + "\n"
    with pytest.raises(DataError, match=r"huge\.csv line 2: malformed CSV \(field larger than field limit"):
        read_records(write(tmp_path, "huge.csv", huge), FIELDS, "file_desc")


def test_json_array_followed_by_text_or_unclosed(tmp_path):
    good = json.dumps(GOOD)
    with pytest.raises(DataError, match=r"t\.json line 2: malformed JSON: text after the closing"):
        read_records(write(tmp_path, "t.json", f"[{good}]\n[{good}]"), FIELDS, "file_desc")
    with pytest.raises(DataError, match=r"u\.json: malformed JSON: the array is not closed"):
        read_records(write(tmp_path, "u.json", f"[{good}, "), FIELDS, "file_desc")
    with pytest.raises(DataError, match=r"n\.json line 1: malformed JSON: nested too deeply"):
        read_records(write(tmp_path, "n.json", "[" * 5000), FIELDS, "file_desc")


def test_a_field_no_record_has_is_one_clear_error(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl([GOOD] * 30))
    with pytest.raises(DataError) as info:
        read_records(path, ["file", "directory", "file_desc"], "file_desc")
    message = str(info.value)
    assert "d.jsonl: field 'file' is missing from every record (so are 'directory')" in message
    assert "the records have: filename, file_desc" in message and "data.input_template" in message
    assert "line" not in message  # not thirty per-line copies


def test_a_directory_given_as_a_file(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: is a directory"):
        read_records(tmp_path / "d.jsonl", FIELDS, "file_desc", fmt="jsonl")


def rows_with_ids(ids):
    return jsonl([{"id": i, "filename": f"f{n}", "file_desc": f"d{n}"} for n, i in enumerate(ids)])


def test_duplicate_ids_are_kept_with_a_counted_warning_by_default(tmp_path, caplog):
    path = write(tmp_path, "d.jsonl", rows_with_ids(["0", "1", "0", 2, "2", "1", "0"]))
    records = read_records(path, FIELDS, "file_desc")
    assert len(records) == 7  # like datasets: every row is kept; 2 and "2" are different ids
    assert "3 record(s) repeat an earlier 'id', kept" in caplog.text
    assert 'id "0" on lines 1 and 3' in caplog.text and "data.on_duplicate_id=drop" in caplog.text


def test_duplicate_ids_drop_refuse_ignore_and_a_chosen_id_field(tmp_path, caplog):
    path = write(tmp_path, "d.jsonl", rows_with_ids(["a", "b", "a", "a"]))
    kept = read_records(path, FIELDS, "file_desc", on_duplicate_id="drop")
    assert [r.line for r in kept] == [1, 2] and "dropped 2 record(s)" in caplog.text
    with pytest.raises(DataError, match=r"2 record\(s\) repeat an earlier 'id' \(data.on_duplicate_id=refuse\): "
                                        r'id "a" on lines 1 and 3; id "a" on lines 1 and 4'):
        read_records(path, FIELDS, "file_desc", on_duplicate_id="refuse")
    caplog.clear()
    assert len(read_records(path, FIELDS, "file_desc", on_duplicate_id="ignore")) == 4
    assert "repeat" not in caplog.text
    # Another field as the id: file names repeat here, ids do not.
    twice = write(tmp_path, "f.jsonl", jsonl([{"id": 1, **GOOD}, {"id": 2, **GOOD}]))
    with pytest.raises(DataError, match=r"repeat an earlier 'filename'"):
        read_records(twice, FIELDS, "file_desc", id_field="filename", on_duplicate_id="refuse")
    with pytest.raises(DataError, match=r"data.id_field='uid', but no record has that field"):
        read_records(twice, FIELDS, "file_desc", id_field="uid")
    with pytest.raises(ConfigError, match="data.on_duplicate_id must be one of warn, drop, refuse, ignore; got 'sometimes'"):
        read_records(twice, FIELDS, "file_desc", on_duplicate_id="sometimes")


# ---- parquet files, dataset directories and Hugging Face dataset ids ---------------------------------

TEXT_LABEL = ["text", "label"]


def test_parquet_rows_are_validated_and_class_labels_become_names(tmp_path):
    from tests.data.conftest import imdb_like

    path = tmp_path / "train.parquet"
    imdb_like()["train"].to_parquet(str(path))
    records = read_records(path, TEXT_LABEL, "label")  # format auto from .parquet
    assert [r.fields["label"] for r in records[:3]] == ["neg", "pos", "neg"]
    assert [r.line for r in records[:2]] == [0, 1] and records[1].place == "row 1" and records[1].split is None


@pytest.mark.parametrize(
    "rows, message",
    [
        ([GOOD, {"filename": "b", "file_desc": " "}], r"d\.parquet row 1: target field 'file_desc' is empty"),
        ([GOOD, {"filename": None, "file_desc": "x"}], r"d\.parquet row 1: field 'filename' is null"),
    ],
)
def test_bad_parquet_rows_name_file_and_row(tmp_path, rows, message):
    import pandas

    path = tmp_path / "d.parquet"
    pandas.DataFrame(rows).to_parquet(path)
    with pytest.raises(DataError, match=message):
        read_records(path, FIELDS, "file_desc")
    assert len(read_records(path, FIELDS, "file_desc", skip_invalid=True)) == 1


def test_parquet_numbers_missing_columns_and_bad_bytes_are_refused(tmp_path):
    import pandas

    numbers = tmp_path / "n.parquet"
    pandas.DataFrame({"filename": ["a", "b"], "file_desc": [1, 2]}).to_parquet(numbers)  # a plain int, no ClassLabel
    with pytest.raises(DataError, match=r"n\.parquet row 0: field 'file_desc' must be a string, got int"):
        read_records(numbers, FIELDS, "file_desc")
    with pytest.raises(DataError, match=r"n\.parquet: column\(s\) 'directory' missing \(it has: filename, file_desc\)"):
        read_records(numbers, ["filename", "directory"], "filename")
    broken = write(tmp_path, "b.parquet", b"PAR1 not really")
    with pytest.raises(DataError, match=r"b\.parquet: not a readable parquet file"):
        read_records(broken, FIELDS, "file_desc")


def test_dataset_directory_reads_its_splits_with_class_names(tmp_path, offline_datasets):
    from tests.data.conftest import imdb_like, write_dataset_dir

    root = write_dataset_dir(tmp_path / "imdb", imdb_like())
    records = read_records(root, TEXT_LABEL, "label", source_splits={"train", "test"})  # auto: not a saved dataset
    assert [r.split for r in records] == ["train"] * 8 + ["test"] * 2
    assert records[-1].fields == {"text": "test review 1", "label": "neg"} and records[-1].place == "test row 1"
    # Read whole, the unsupervised split's -1 ("no label") is a problem of its row, not a label.
    with pytest.raises(DataError, match=r"imdb unsupervised row 0: field 'label' holds class id -1 \(-1 is datasets' "
                                        r"'no label'\), not one of its 2 ClassLabel names \(neg, pos\)"):
        read_records(root, TEXT_LABEL, "label")
    with pytest.raises(DataError, match=r"imdb has no split 'validation' \(named in data.splits\); "
                                        r"it has: (?=.*train)(?=.*test)(?=.*unsupervised)"):
        read_records(root, TEXT_LABEL, "label", source_splits={"train", "validation"})


def test_a_dataset_id_is_read_from_the_datasets_cache_offline(tmp_path, offline_datasets, monkeypatch):
    from tests.data.conftest import imdb_like, write_dataset_dir

    # load_dataset of a local directory caches it under the directory's name, as it would a Hub id:
    # read from elsewhere, "lexlora-imdb" is then only an id, found in the cache with the Hub offline.
    monkeypatch.chdir(tmp_path)
    write_dataset_dir(tmp_path / "lexlora-imdb", imdb_like())
    assert len(read_records("lexlora-imdb", TEXT_LABEL, "label", source_splits={"test"})) == 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    records = read_records("lexlora-imdb", TEXT_LABEL, "label", fmt="auto", source_splits={"train", "test"})
    assert len(records) == 10 and {r.fields["label"] for r in records} == {"neg", "pos"}


def test_a_dataset_missing_from_the_cache_offline_says_how_to_fix(tmp_path, offline_datasets, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        read_records("someorg/no-such-dataset", TEXT_LABEL, "label")
    message = str(caught.value)
    assert "data.path='someorg/no-such-dataset' is not a local file or directory" in message
    assert "not in the datasets cache" in message and "HF_HUB_OFFLINE" in message
    assert str(offline_datasets) in message and "datasets.load_dataset('someorg/no-such-dataset')" in message
    # A missing path with a data file's extension is a missing file, not a dataset id.
    with pytest.raises(DataError, match=r"^data file not found: data/train\.jsonl$"):
        read_records("data/train.jsonl", TEXT_LABEL, "label")


def test_hub_errors_other_than_offline_are_data_errors(monkeypatch):
    import datasets

    def not_found(name, subset=None):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(DataError, match=r"data.path='imdbb': no such Hugging Face dataset"):
        read_records("imdbb", TEXT_LABEL, "label", fmt="hub")

    def bad_subset(name, subset=None):
        raise ValueError(f"BuilderConfig '{subset}' not found. Available: ['plain_text']")

    monkeypatch.setattr(datasets, "load_dataset", bad_subset)
    with pytest.raises(DataError, match=r"data.subset='plain' of dataset 'imdb': BuilderConfig 'plain' not found. "
                                        r"Available: \['plain_text'\]"):
        read_records("imdb", TEXT_LABEL, "label", fmt="hub", subset="plain")


def test_saved_dataset_dict_keeps_its_splits_and_duplicates_name_them(tmp_path):
    import datasets

    row = {**GOOD, "id": 1}
    saved = datasets.DatasetDict(train=datasets.Dataset.from_list([row, {**row, "id": 2}]),
                                 test=datasets.Dataset.from_list([row]))
    saved.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"1 record\(s\) repeat an earlier 'id' \(data.on_duplicate_id=refuse\): "
                                        r"id 1 on train row 0 and test row 0"):
        read_records(tmp_path / "dd", FIELDS, "file_desc", on_duplicate_id="refuse")
    records = read_records(tmp_path / "dd", FIELDS, "file_desc", source_splits={"test"})
    assert [(r.split, r.line) for r in records] == [("test", 0)]
